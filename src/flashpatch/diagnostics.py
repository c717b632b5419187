"""One-time messages: which backend ran where, why a fast path was not taken, verify results."""

from __future__ import annotations

import logging
import os
import sys
import threading
import types
import warnings

logger = logging.getLogger("flashpatch")


class FlashpatchWarning(UserWarning):
    """flashpatch took the original computation somewhere, or could not patch a target."""


_seen: set[tuple] = set()
_lock = threading.Lock()

#: Code a warning must not point into: flashpatch itself and what runs a patched call between the user's line and
#: flashpatch (JAX's tracing, flax's interception, wrapt's import hooks, the start-up hook, Python's site and
#: context managers). A line in any of them tells the user nothing.
_INTERNAL_MODULES = ("jax", "jaxlib", "flax", "wrapt", "_flashpatch_autoload", "site", "contextlib")


def _internal_paths() -> tuple[str, ...]:
    paths = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    for name in _INTERNAL_MODULES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if not path:
            continue
        path = os.path.abspath(path)
        is_package = os.path.basename(path) == "__init__.py"
        paths.append(os.path.dirname(path) + os.sep if is_package else path)
    return tuple(paths)


def _user_frame() -> types.FrameType | None:
    """The innermost frame outside flashpatch and the libraries it runs under; None if there is none."""
    internal = _internal_paths()
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith("<frozen ") and not os.path.abspath(filename).startswith(internal):
            return frame
        frame = frame.f_back
    return None


def warn(message: str, category: type[Warning] = FlashpatchWarning, *, at_user_line: bool = True) -> None:
    """Warn at the user's line: the innermost caller outside flashpatch, JAX and flax (as if that line had called
    `warnings.warn`), or at no line where there is none or `at_user_line` is False (interpreter start-up).
    Warning filters apply as usual."""
    frame = _user_frame() if at_user_line else None
    if frame is None:
        warnings.warn_explicit(message, category, "flashpatch", 0, module="flashpatch")
        return
    module_globals = frame.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=module_globals.get("__name__", "<string>"),
        registry=registry,
    )


def _first(key: tuple) -> bool:
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
        return True


def said_by_flashpatch(message: str) -> str:
    """`message` with "flashpatch: " in front, unless it already starts by naming flashpatch or its public
    `flashpatch.attention` (no "flashpatch: flashpatch...")."""
    if message.startswith(("flashpatch:", "flashpatch ", "flashpatch.attention:")):
        return message
    return f"flashpatch: {message}"


def warn_once(key: tuple, message: str) -> None:
    """Warn the first time `key` is seen in this process, at the user's line (see `warn`)."""
    if _first(("warn", *key)):
        warn(said_by_flashpatch(message))


def info_once(key: tuple, message: str) -> None:
    """Log at INFO the first time `key` is seen in this process."""
    if _first(("info", *key)):
        logger.info("%s", said_by_flashpatch(message))


def forget() -> None:
    """Let every message be said once more (for tests and long-lived servers that re-configure)."""
    with _lock:
        _seen.clear()
