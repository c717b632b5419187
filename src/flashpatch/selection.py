"""Which backend computes a given problem: the user's choice, or `auto`'s, with the reason why.

`auto` walks a small table of rules per platform; each rule names the measurement behind it. The
first backend of the first matching rule that can run the problem wins; where none can, the
original einsum runs. A backend the user asked for by name that cannot run falls back to the
original einsum with one warning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flashpatch import backends
from flashpatch.backends.base import Problem

#: On CPU the einsum beats the blockwise path while the logits are small; past this many (query,
#: key) pairs per head the blockwise path is chosen for its O(T) memory. See docs/selection.md.
CPU_MIN_PAIRS_FOR_XLA = 1536 * 1536


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    fallback: bool = False  # the asked-for backend could not run this problem


@dataclasses.dataclass(frozen=True)
class Rule:
    platform: str
    applies: Callable[[Problem], bool]
    backends: tuple[str, ...]
    why: str


RULES: tuple[Rule, ...] = (
    Rule(
        "gpu",
        lambda p: p.q_len == 1,
        ("reference",),
        "one-token decode: its logits are (B, N, 1, S), small, and no flash path has been timed faster on the GPU",
    ),
    Rule(
        "gpu",
        lambda p: True,
        ("cudnn", "kvax", "xla"),
        "H100, bf16, 8/1 heads, head_dim 256, B=2, T=S=4096 (benchmarks/results/h100-2026-11-25-call3): "
        "cudnn 1.34x einsum forward, 1.43x forward+backward; kvax 1.21x and 0.55x; all three keep memory O(T)",
    ),
    Rule(
        "cpu",
        lambda p: p.q_len * p.kv_len < CPU_MIN_PAIRS_FOR_XLA,
        ("reference",),
        f"CPU: the einsum is faster while T*S < {CPU_MIN_PAIRS_FOR_XLA} (docs/selection.md)",
    ),
    Rule("cpu", lambda p: True, ("xla",), "CPU: blockwise attention keeps memory O(T) at large T*S"),
)


def _auto(problem: Problem) -> Choice:
    skipped = []
    for rule in RULES:
        if rule.platform != problem.platform or not rule.applies(problem):
            continue
        for name in rule.backends:
            reason = backends.get(name).unsupported(problem)
            if reason is None:
                note = f"; passed over: {'; '.join(skipped)}" if skipped else ""
                return Choice(name, f"auto: {rule.why}{note}")
            skipped.append(f"{name} ({reason})")
        break
    tail = f" (passed over: {'; '.join(skipped)})" if skipped else ""
    return Choice("reference", f"auto: no faster path known for {problem.platform}{tail}")


def choose(asked: str, problem: Problem) -> Choice:
    """Resolve `asked` ('auto' or a backend name) for `problem`, falling back where it cannot run."""
    if asked == "auto":
        return _auto(problem)
    reason = backends.get(asked).unsupported(problem)
    if reason is None:
        return Choice(asked, "asked for")
    return Choice("reference", f"{asked} cannot run this call ({reason}); the original einsum runs", True)
