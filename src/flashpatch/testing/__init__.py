"""openpi-compatible Gemma modules and mask builders, written for flashpatch's tests, examples and benchmarks.

They have openpi's call signatures, parameter trees and math (openpi is not on PyPI), so every
claim flashpatch makes about openpi can be checked without it. `register()` makes flashpatch
patch them as it patches openpi.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def fresh_state() -> Iterator[None]:
    """Around one test: every message unsaid at the start; at the end, the process default as it was,
    no enable() block left open and (without a session-wide install) nothing patched."""
    import flashpatch
    from flashpatch import diagnostics
    from flashpatch.switch import interception
    from flashpatch.switch import state as switch

    diagnostics.forget()
    session_default = switch.default()
    yield
    if switch.default() != session_default:
        flashpatch.uninstall()
        if session_default is not None:
            flashpatch.install(backend=session_default.backend, verify=session_default.verify)
    assert not switch.open_frames(), "a test left an enable() block open"
    if session_default is None:
        assert not interception.bound_targets(), "a test left targets patched"


def register() -> None:
    """Make flashpatch patch these modules' Attention classes like openpi's."""
    import flashpatch

    flashpatch.register_target("flashpatch.testing.gemma", "Attention", kind="gemma")
    flashpatch.register_target("flashpatch.testing.gemma_fast", "Attention", kind="gemma_fast")
