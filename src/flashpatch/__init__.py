"""flashpatch: flash attention for openpi's Gemma models, switched on at run time, no source edits.

with flashpatch.enable():            # this thread, this block
    ...
flashpatch.install()                 # the whole process (what FLASHPATCH=1 does)

@flashpatch.patch                    # every model the factory returns
def make_model(config, rng): ...
"""

from __future__ import annotations

from collections.abc import Mapping

from flashpatch.core import attention
from flashpatch.diagnostics import FlashpatchWarning
from flashpatch.settings import BACKEND_NAMES, Settings
from flashpatch.settings import from_env as _settings_from_env
from flashpatch.targets import register as register_target
from flashpatch.toggles import disable, enable, install, installed, patch, patch_model, uninstall

__version__ = "0.1.0"


def install_from_env(environ: Mapping[str, str] | None = None) -> Settings | None:
    """Install process-wide as FLASHPATCH / FLASHPATCH_BACKEND / FLASHPATCH_VERIFY ask; None if off."""
    chosen = _settings_from_env(environ)
    if chosen is not None:
        install(backend=chosen.backend, verify=chosen.verify)
    return chosen


__all__ = [
    "BACKEND_NAMES",
    "FlashpatchWarning",
    "Settings",
    "attention",
    "disable",
    "enable",
    "install",
    "install_from_env",
    "installed",
    "patch",
    "patch_model",
    "register_target",
    "uninstall",
]
