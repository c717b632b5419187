"""What flashpatch can be asked to do: the Settings value, and the FLASHPATCH* variables that ask for it.

Imports no JAX: the interpreter-start hook parses the environment with it before anything heavy loads.
Which settings are in force where (per context, and the process default that `flashpatch.install()` sets
and FLASHPATCH asks for) is `flashpatch.switch.state`'s.
"""

from __future__ import annotations

import dataclasses
import os
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
        object.__setattr__(self, "backend", backends.canonical(self.backend))  # 'XLA', ' xla ' -> 'xla'
        if not isinstance(self.verify, bool):
            raise TypeError(f"verify must be a bool; got {self.verify!r}")

    @property
    def cache_key(self) -> str:
        return f"flashpatch:{self.backend}:verify={int(self.verify)}"


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
    try:
        backend = backends.canonical(env.get("FLASHPATCH_BACKEND", "").strip() or "auto")
    except ValueError:
        allowed = ", ".join(backends.choices())
        raise ValueError(
            f"environment variable FLASHPATCH_BACKEND must be one of {allowed}; got {env['FLASHPATCH_BACKEND']!r}"
        ) from None
    return Settings(backend=backend, verify=parse_flag("FLASHPATCH_VERIFY", env.get("FLASHPATCH_VERIFY", "")))
