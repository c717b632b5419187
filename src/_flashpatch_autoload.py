"""Interpreter-start hook, imported by flashpatch_autoload.pth only when FLASHPATCH is set.

It reads the FLASHPATCH* variables at once, so that a typo is reported when the process starts (a
FlashpatchWarning, and again when openpi's Gemma is imported), never found out days into a training
run. It imports no JAX: it registers post-import hooks on openpi's Gemma modules, and only when one of
them is imported does flashpatch install itself process-wide. Any failure becomes one warning; the
interpreter always starts.

PYTEST_DONT_REWRITE: pytest marks every module of a plugin's distribution for assertion rewriting and
warns about those already imported; this one is imported before pytest starts, and has no asserts.
"""

import contextlib
import os
import sys
import warnings

#: flashpatch.switch.settings.OFF_SPELLINGS, copied: importing it would load flashpatch while FLASHPATCH is off
#: (tests/test_autoload.py checks that the two agree).
_OFF = ("", "0", "false", "off", "no")
_warned = set()


def _warn(message, category=UserWarning, at_user_line=False):
    """Warn once, at no source line (this module's lines mean nothing to a user), or, when openpi's import
    triggered it, at the line that imported openpi.

    Where the warning filters turn it into an exception (`python -W error`), the message still goes out as one
    line on stderr: an exception here would reach site.py, which prints every traceback it chains.
    """
    if message in _warned:
        return
    _warned.add(message)
    try:
        try:
            from flashpatch import diagnostics
        except Exception:  # flashpatch does not load: say so without its help
            warnings.warn_explicit(message, category, "flashpatch", 0, module="flashpatch")
            return
        diagnostics.warn(message, category, at_user_line=at_user_line)
    except Exception:
        with contextlib.suppress(Exception):  # no stderr at all: startup still goes on
            sys.stderr.write(f"{category.__name__}: {message}\n")


def _main():
    if os.environ.get("FLASHPATCH", "").strip().lower() in _OFF:
        return
    try:
        import wrapt

        from flashpatch import openpi_sites
        from flashpatch.diagnostics import FlashpatchWarning
        from flashpatch.switch import settings
    except Exception as err:  # a broken install must not stop the interpreter
        _warn(f"flashpatch: FLASHPATCH is set but flashpatch cannot load ({err!r}); openpi will run unpatched")
        return
    try:
        chosen = settings.from_env()
    except ValueError as err:
        message = f"flashpatch is OFF in this process: {err}. Fix the variable, or unset FLASHPATCH to run without it"
        _warn(message, FlashpatchWarning)

        def still_off(module):
            _warn(f"openpi imported, but {message}", FlashpatchWarning, at_user_line=True)  # once, whichever first

        for name in openpi_sites.modules():
            wrapt.register_post_import_hook(still_off, name)
        return

    def switch_on(module):
        try:
            import flashpatch

            if flashpatch.installed() is None:
                flashpatch.install(backend=chosen.backend, verify=chosen.verify)
        except Exception as err:
            _warn(
                f"flashpatch: could not switch on when {module.__name__} was imported ({err!r})",
                FlashpatchWarning,
                at_user_line=True,
            )

    for name in openpi_sites.modules():
        wrapt.register_post_import_hook(switch_on, name)


try:
    _main()
except Exception as _err:  # pragma: no cover - the last guard: startup never breaks
    _warn(f"flashpatch: the interpreter-start hook failed ({_err!r}); openpi will run unpatched")
