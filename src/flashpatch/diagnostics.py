"""One-time messages: which backend ran where, why a fast path was not taken, verify results."""

from __future__ import annotations

import logging
import threading
import warnings

logger = logging.getLogger("flashpatch")


class FlashpatchWarning(UserWarning):
    """flashpatch took the original computation somewhere, or could not patch a target."""


_seen: set[tuple] = set()
_lock = threading.Lock()


def _first(key: tuple) -> bool:
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
        return True


def warn_once(key: tuple, message: str) -> None:
    """Warn the first time `key` is seen in this process."""
    if _first(("warn", *key)):
        warnings.warn(f"flashpatch: {message}", FlashpatchWarning, stacklevel=3)


def info_once(key: tuple, message: str) -> None:
    """Log at INFO the first time `key` is seen in this process."""
    if _first(("info", *key)):
        logger.info("flashpatch: %s", message)


def forget() -> None:
    """Let every message be said once more (for tests and long-lived servers that re-configure)."""
    with _lock:
        _seen.clear()
