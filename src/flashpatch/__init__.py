"""flashpatch: flash attention for openpi's Gemma models, switched on at run time, no source edits.

    with flashpatch.enable():            # this thread, this block
        ...
    flashpatch.install()                 # the whole process (what FLASHPATCH=1 does)

    @flashpatch.patch                    # every model the factory returns
    def make_model(config, rng): ...

Names load on first use, so `import flashpatch` imports no JAX (the interpreter-start hook relies on
it). PYTEST_DONT_REWRITE: that hook may import this package before pytest starts, and pytest would
otherwise warn that it cannot rewrite a module of a plugin's distribution.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from flashpatch.core import attention
    from flashpatch.diagnostics import FlashpatchWarning
    from flashpatch.model_patch import patch, patch_model
    from flashpatch.settings import Settings
    from flashpatch.targets import register as register_target
    from flashpatch.toggles import disable, enable, install, installed, uninstall

#: public name -> (module, attribute); attribute None: the module itself.
_LAZY: dict[str, tuple[str, str | None]] = {
    "attention": ("flashpatch.core", "attention"),
    "FlashpatchWarning": ("flashpatch.diagnostics", "FlashpatchWarning"),
    "Settings": ("flashpatch.settings", "Settings"),
    "register_target": ("flashpatch.targets", "register"),
    "disable": ("flashpatch.toggles", "disable"),
    "enable": ("flashpatch.toggles", "enable"),
    "install": ("flashpatch.toggles", "install"),
    "installed": ("flashpatch.toggles", "installed"),
    "patch": ("flashpatch.model_patch", "patch"),
    "patch_model": ("flashpatch.model_patch", "patch_model"),
    "uninstall": ("flashpatch.toggles", "uninstall"),
}
_SUBMODULES = (
    "backends",
    "bench",
    "cli",
    "core",
    "diagnostics",
    "doctor",
    "drift",
    "interception",
    "jit_cache",
    "masks",
    "meshes",
    "model_patch",
    "openpi_sites",
    "selection",
    "settings",
    "switch",
    "targets",
    "testing",
    "toggles",
    "verify",
    "versions",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"flashpatch.{name}")
    else:
        raise AttributeError(f"module 'flashpatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


def backend_names() -> tuple[str, ...]:
    """Every registered backend, built-in ones first (as `flashpatch.backends.names()`)."""
    from flashpatch import backends

    return backends.names()


def backend_choices() -> tuple[str, ...]:
    """What `enable(backend=...)` and FLASHPATCH_BACKEND accept: 'auto' and every registered backend."""
    from flashpatch import backends

    return backends.choices()


__all__ = [
    "FlashpatchWarning",
    "Settings",
    "__version__",
    "attention",
    "backend_choices",
    "backend_names",
    "disable",
    "enable",
    "install",
    "installed",
    "patch",
    "patch_model",
    "register_target",
    "uninstall",
]
