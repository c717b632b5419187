"""Interpreter-start hook (imported by flashpatch_autoload.pth). Does nothing unless FLASHPATCH is set.

It imports no JAX: it registers post-import hooks on openpi's Gemma modules, and only when one
of them is imported does it import flashpatch and install it process-wide. Any error becomes a
single warning; the interpreter always starts.
"""

import os

_TARGET_MODULES = ("openpi.models.gemma", "openpi.models.gemma_fast")
_warned = False


def _warn(err: BaseException) -> None:
    global _warned
    if not _warned:
        _warned = True
        import warnings

        warnings.warn(f"flashpatch: FLASHPATCH is set but flashpatch could not switch on: {err!r}", stacklevel=2)


def _on_openpi_import(module) -> None:
    try:
        import flashpatch

        flashpatch.install_from_env()
    except Exception as err:
        _warn(err)


def _main() -> None:
    try:
        if os.environ.get("FLASHPATCH", "").strip().lower() in ("", "0", "false", "off", "no"):
            return
        import wrapt

        for name in _TARGET_MODULES:
            wrapt.register_post_import_hook(_on_openpi_import, name)
    except Exception as err:
        _warn(err)


_main()
