"""What flashpatch should do right now: per thread, with a process-wide default.

Imports no JAX: the interpreter-start hook parses the environment with it before anything heavy loads.

`enable()` pushes settings for the calling thread (like JAX's own config contexts, which are
thread-local); the process-wide default comes from `FLASHPATCH*` environment variables or
`flashpatch.set_default()`, and is what threads see when they have pushed nothing.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping

from flashpatch import backends

#: What FLASHPATCH and FLASHPATCH_VERIFY accept, any case, surrounding spaces ignored.
ON_SPELLINGS = ("1", "true", "on", "yes")
OFF_SPELLINGS = ("0", "false", "off", "no", "")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One activation of flashpatch. Frozen and hashable: it keys JAX's compilation caches."""

    backend: str = "auto"
    verify: bool = False

    def __post_init__(self) -> None:
        allowed = backends.choices()
        if self.backend not in allowed:
            raise ValueError(f"backend must be one of {', '.join(allowed)}; got {self.backend!r}")
        if not isinstance(self.verify, bool):
            raise TypeError(f"verify must be a bool; got {self.verify!r}")

    @property
    def cache_key(self) -> str:
        return f"flashpatch:{self.backend}:verify={int(self.verify)}"


_default: Settings | None = None
_local = threading.local()


def _stack() -> list[Settings | None]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current() -> Settings | None:
    """The settings in force on this thread; None means flashpatch is off here."""
    stack = _stack()
    return stack[-1] if stack else _default


def push(settings: Settings | None) -> int:
    stack = _stack()
    stack.append(settings)
    return len(stack)


def pop(depth: int) -> None:
    """Leave the block pushed at `depth` (blocks close innermost first: flashpatch.toggles sees to it)."""
    stack = _stack()
    if len(stack) != depth:
        raise RuntimeError(f"flashpatch: settings stack at depth {len(stack)}, asked to leave depth {depth}")
    stack.pop()


def get_default() -> Settings | None:
    return _default


def swap_default(settings: Settings | None) -> Settings | None:
    global _default
    previous, _default = _default, settings
    return previous


def parse_flag(name: str, value: str) -> bool:
    """An on/off environment variable; the error lists every spelling accepted, so no typo needs a guess."""
    low = value.strip().lower()
    if low in ON_SPELLINGS:
        return True
    if low in OFF_SPELLINGS:
        return False
    on = ", ".join(ON_SPELLINGS)
    off = ", ".join(s for s in OFF_SPELLINGS if s)
    raise ValueError(f"environment variable {name} must be one of {on} (on) or {off}, or empty (off); got {value!r}")


def from_env(environ: Mapping[str, str] | None = None) -> Settings | None:
    """Settings asked for by FLASHPATCH, FLASHPATCH_BACKEND and FLASHPATCH_VERIFY (None: off)."""
    env = os.environ if environ is None else environ
    if not parse_flag("FLASHPATCH", env.get("FLASHPATCH", "")):
        return None
    backend = env.get("FLASHPATCH_BACKEND", "auto").strip().lower() or "auto"
    allowed = backends.choices()
    if backend not in allowed:
        raise ValueError(
            f"environment variable FLASHPATCH_BACKEND must be one of {', '.join(allowed)}; got {backend!r}"
        )
    return Settings(backend=backend, verify=parse_flag("FLASHPATCH_VERIFY", env.get("FLASHPATCH_VERIFY", "")))
