"""openpi-compatible Gemma modules and mask builders, written for flashpatch's tests, examples and benchmarks.

They have openpi's call signatures, parameter trees and math (openpi is not on PyPI), so every
claim flashpatch makes about openpi can be checked without it. `register()` makes flashpatch
patch them as it patches openpi.
"""

from __future__ import annotations


def register() -> None:
    """Make flashpatch patch these modules' Attention classes like openpi's."""
    import flashpatch

    flashpatch.register_target("flashpatch.testing.gemma", "Attention", kind="gemma")
    flashpatch.register_target("flashpatch.testing.gemma_fast", "Attention", kind="gemma_fast")
