"""The attention classes of openpi that flashpatch patches: (module, class, kind). Imports nothing.

One list for the targets (`flashpatch.targets`) and the interpreter-start hook, which must know the
modules to wait for without importing JAX.
"""

from __future__ import annotations

OPENPI: tuple[tuple[str, str, str], ...] = (
    ("openpi.models.gemma", "Attention", "gemma"),
    ("openpi.models.gemma_fast", "Attention", "gemma_fast"),
)


def modules() -> tuple[str, ...]:
    return tuple(dict.fromkeys(module for module, _, _ in OPENPI))
