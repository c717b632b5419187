"""The attention core a patched call runs: input checks, which backend computes it, openpi's edge cases.

    attention.py   attention(q, k, v, mask, backend=...): checks, the backend's run, the exact in-graph fallback
    selection.py   which backend runs a call (the name asked for, or auto's rules) and the exact fallback
    verify.py      verify mode: the original beside the fast path, the difference logged

It reads no on/off state: the switch (`flashpatch.switch`) tells it which backend to use.
"""
