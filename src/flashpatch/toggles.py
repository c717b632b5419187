"""The ways to switch flashpatch on and off: enable()/disable() blocks and the process default (install).

The state they change is `flashpatch.switch`'s; this module is the public face of it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar, overload

from flashpatch import switch
from flashpatch.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])


class Block:
    """What enable() and disable() return: a context manager and a decorator, re-entrant and reusable.

    Each `with` opens a frame of its own on the calling thread, so one object can be entered again inside
    itself, in sequence, or on several threads at once; each exit leaves the calling thread's innermost
    frame of this object. Leaving it on a thread where it is not open is an error (see `switch.leave`).
    """

    def __init__(self, settings: Settings | None) -> None:
        self.settings = settings
        self._frames: list[switch.Frame] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        if self.settings is None:
            return "flashpatch.disable()"
        return f"flashpatch.enable({self.settings.backend!r}, verify={self.settings.verify})"

    def __enter__(self) -> Settings | None:
        frame = switch.enter(self.settings)
        with self._lock:
            self._frames.append(frame)
        return self.settings

    def __exit__(self, *exc_info: object) -> None:
        switch.leave(self._take())

    def _take(self) -> switch.Frame:
        """The frame this exit leaves: the calling thread's latest of this object.

        With none here but some on another thread, the latest of those, left where it is: `switch.leave`
        turns it off and raises, and its own thread may still leave it (then a no-op).
        """
        here = threading.current_thread()
        with self._lock:
            mine = [frame for frame in self._frames if frame.thread is here]
            if mine:
                self._frames.remove(mine[-1])
                return mine[-1]
            if self._frames:
                return self._frames[-1]
        raise RuntimeError(f"{self!r} was left more often than it was entered")

    def __call__(self, fn: F) -> F:
        """Decorate `fn`: each call runs inside a block of its own."""
        if not callable(fn):
            raise TypeError(f"{self!r} decorates a function; got {fn!r}")

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]


@overload
def enable(backend: F, *, verify: bool = False) -> F: ...
@overload
def enable(backend: str = "auto", *, verify: bool = False) -> Block: ...


def enable(backend: str | Callable[..., Any] = "auto", *, verify: bool = False) -> Block | Callable[..., Any]:
    """Patch openpi's attention on this thread for the duration of the block (or decorated call).

    Nestable: the innermost block wins and leaving it restores what was there before. Other threads are
    unaffected (they follow the process default, see `install`). Functions jitted inside retrace when the
    settings differ from those they were traced with. `@flashpatch.enable` with no parentheses decorates a
    function with the default settings.
    """
    if callable(backend):
        return Block(Settings(verify=verify))(backend)
    return Block(Settings(backend=backend, verify=verify))


@overload
def disable(fn: F) -> F: ...
@overload
def disable(fn: None = None) -> Block: ...


def disable(fn: Callable[..., Any] | None = None) -> Block | Callable[..., Any]:
    """Run the original attention on this thread for the duration of the block (or decorated call)."""
    block = Block(None)
    return block if fn is None else block(fn)


def install(backend: str = "auto", *, verify: bool = False) -> None:
    """Patch openpi's attention process-wide (every thread without its own enable()/disable())."""
    switch.set_default(Settings(backend=backend, verify=verify))


def uninstall() -> None:
    """Undo `install`. Harmless when nothing is installed."""
    switch.set_default(None)


def installed() -> Settings | None:
    """The process-wide settings, or None."""
    return switch.default()
