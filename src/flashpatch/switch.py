"""flashpatch's on/off state, in one place: a stack of frames per thread, and the process default.

A frame is one open enable()/disable() block (or one pass of the drift guard): the settings it asks for,
the mode the gate runs in under it, its key in JAX's jit cache and its hold on the patched targets.
`enter` takes all three or, when a step fails, none (one save/restore frame, as torch's `sdpa_kernel`
does); `leave` gives them back. A thread without frames follows the process default (`install`).

Frames belong to the thread that entered them, as JAX's own config contexts do. Leaving one from another
thread is an error that still turns it off: its hold is released at once and JAX's compiled functions
are dropped (the entering thread's jit key cannot be changed from here); the entering thread drops the
frame's key the next time it enters or leaves a block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
from collections.abc import Iterator

from flashpatch import jit_cache
from flashpatch.settings import Settings


class Mode(enum.Enum):
    """What a target's gate does on a thread."""

    OFF = "off"  # the original runs, untouched
    ON = "on"  # the replacement runs, through the attention core with the frame's settings
    TRACE_ORIGINAL = "trace-original"  # the drift guard traces the original (the gate stands aside)
    TRACE_REPLACEMENT = "trace-replacement"  # the drift guard traces the replacement, with a shape-only core


@dataclasses.dataclass(eq=False)
class Frame:
    """One entry on a thread's stack; `closed` once left (from any thread)."""

    settings: Settings | None
    mode: Mode
    thread: threading.Thread | None  # None: the process default
    closed: bool = False
    _stack: list[Frame] = dataclasses.field(default_factory=list, repr=False)  # its thread's stack
    _key_scope: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def key(self) -> str:
        """What JAX's jit cache sees while the frame is in force: settings and mode, never a stale mix."""
        if self.mode is Mode.OFF:
            return "off"
        assert self.settings is not None
        suffix = "" if self.mode is Mode.ON else f":{self.mode.value}"
        return self.settings.cache_key + suffix

    @property
    def holds(self) -> bool:
        """Whether the frame keeps the targets patched (every mode but OFF goes through the gate)."""
        return self.mode is not Mode.OFF


def _mode(settings: Settings | None) -> Mode:
    return Mode.OFF if settings is None else Mode.ON


_default = Frame(None, Mode.OFF, None)
_default_lock = threading.Lock()
_close_lock = threading.Lock()
_local = threading.local()


def _stack() -> list[Frame]:
    stack = getattr(_local, "frames", None)
    if stack is None:
        stack = _local.frames = []
    return stack


def top() -> Frame:
    """The frame in force on this thread: its innermost open one, else the process default (the gate's read)."""
    stack = getattr(_local, "frames", None)
    if stack:
        for frame in reversed(stack):
            if not frame.closed:
                return frame
    return _default


def current() -> Settings | None:
    """The settings the replacement runs with on this thread; None where the original runs."""
    frame = top()
    return frame.settings if frame.mode in (Mode.ON, Mode.TRACE_REPLACEMENT) else None


def open_frames() -> tuple[Frame, ...]:
    """This thread's stack, innermost last (frames closed from another thread included until dropped)."""
    return tuple(_stack())


def enter(settings: Settings | None, mode: Mode | None = None) -> Frame:
    """Open a frame on this thread: hold the targets, key JAX's caches, push. All of it, or nothing."""
    from flashpatch import interception  # it reads this module's frames (its gate); imported when first needed

    stack = _stack()
    _drop_closed(stack)
    frame = Frame(settings, _mode(settings) if mode is None else mode, threading.current_thread(), _stack=stack)
    if frame.mode is not Mode.OFF and settings is None:
        raise ValueError(f"mode {frame.mode.name} needs settings")
    with contextlib.ExitStack() as undo:
        if frame.holds:
            interception.acquire()
            undo.callback(interception.release)
        frame._key_scope.enter_context(jit_cache.keyed(frame.key))
        undo.callback(frame._key_scope.close)
        stack.append(frame)
        undo.pop_all()
    return frame


def leave(frame: Frame) -> None:
    """Close `frame` and every frame opened above it on its thread, innermost first.

    Raises RuntimeError (after closing them) when the frame was not the innermost, or when this is not
    the thread that entered it. Leaving a frame already left is a no-op.
    """
    here = threading.current_thread()
    if frame.thread is not here:
        _leave_from(here, frame)
        return
    stack = _stack()
    if frame not in stack:
        return  # already closed: a block around it was left first
    index = stack.index(frame)
    leaving = stack[index:]
    inner = [f for f in leaving[1:] if not f.closed]
    closed_elsewhere = any(f.closed for f in leaving)
    del stack[index:]
    for open_frame in reversed(leaving):
        try:
            open_frame._key_scope.close()
        finally:
            _release(open_frame)
    if closed_elsewhere:
        jit_cache.drop_compiled()  # traced while their keys were still set here, under other frames' settings
    _drop_closed(stack)
    if inner:
        raise RuntimeError(
            "flashpatch: enable()/disable() blocks were left out of order (an outer block ended while an inner "
            "one was open); both are now closed on this thread. Leave nested blocks innermost first."
        )


@contextlib.contextmanager
def entered(settings: Settings | None, mode: Mode | None = None) -> Iterator[Frame]:
    """`enter` ... `leave` as a with-block."""
    frame = enter(settings, mode)
    try:
        yield frame
    finally:
        leave(frame)


def _release(frame: Frame) -> None:
    """Mark `frame` closed and give back its hold, once, whichever thread gets here first."""
    from flashpatch import interception

    with _close_lock:
        if frame.closed:
            return
        frame.closed = True
    if frame.holds:
        interception.release()


def _leave_from(here: threading.Thread, frame: Frame) -> None:
    """`frame` left on a thread that did not enter it: turn it (and what its thread opened above it) off."""
    owner = frame.thread
    assert owner is not None, "the process default is not left"
    if not frame.closed:
        stack = list(frame._stack)  # the owner's list, read once (the owner may be pushing to it right now)
        above = stack[stack.index(frame) :] if frame in stack else [frame]
        for open_frame in reversed(above):
            _release(open_frame)
        jit_cache.drop_compiled()
    raise RuntimeError(
        f"flashpatch: an enable()/disable() block entered on thread {owner.name!r} was left on thread "
        f"{here.name!r}. A block belongs to the thread that entered it; it is now closed ({owner.name!r} runs "
        "as it did before the block, and functions compiled under it were dropped). Leave blocks on the thread "
        "that entered them."
    )


def _drop_closed(stack: list[Frame]) -> None:
    """Drop the frames closed from another thread off the top of this thread's stack, with their jit keys."""
    if not stack or not stack[-1].closed:
        return
    while stack and stack[-1].closed:
        stack.pop()._key_scope.close()
    jit_cache.drop_compiled()


# --- the process default --------------------------------------------------------------------------------


def default() -> Settings | None:
    """The process-wide settings (what threads without frames follow), or None."""
    return _default.settings


def set_default(settings: Settings | None) -> None:
    """Make `settings` the process default: hold the targets while it is on, key JAX's caches on it."""
    from flashpatch import interception

    global _default
    with _default_lock:
        old = _default
        new = Frame(settings, _mode(settings), None)
        if new.settings == old.settings:
            return
        with contextlib.ExitStack() as undo:
            if new.holds and not old.holds:
                interception.acquire()
                undo.callback(interception.release)
            jit_cache.set_global_key(settings.cache_key if settings else None)
            undo.pop_all()
        _default = new
        if old.holds and not new.holds:
            interception.release()
