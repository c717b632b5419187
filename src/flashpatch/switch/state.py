"""flashpatch's on/off state: a stack of frames per context, the process default, and who holds the targets.

A frame is one open block: an `enable()` / `disable()` block or decorated call, a patched model's call, or
one pass of the drift guard. It carries the settings it asks for, the mode the gate runs in under it, and
its hold on the patched targets. The stack lives in a `contextvars.ContextVar`, as Python's `decimal`
contexts and OpenTelemetry's context do, so each thread and each asyncio task has its own (a task starts
from a copy of its creator's, as every context variable does). A coroutine or generator function decorated
with `@flashpatch.enable` keeps its frame in a `Segment`, on the stack only while its code runs. Where a
context has no open frame, the process default (`install`) is in force.

Every change of the frame in force also sets JAX's jit-cache key on the thread (`jit_key`), so a function
compiled under one frame is never reused under another. JAX keeps that key per thread, not per task: a plain
`with` block held across an `await` keys the thread for the other tasks that run meanwhile. The gate notices
such a trace (`key_mismatch`) and says so; a decorated coroutine never leaves its key behind.

Holds: while any frame or the default is on, the targets stay patched. The switch counts holders and tells
its listeners (`flashpatch.switch.interception` registers one) when the first arrives and the last leaves.
A frame whose context ends without leaving it (a thread that exits inside a block) gives its hold back when
Python collects it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import sys
import threading
import weakref
from collections.abc import Callable, Iterator

from flashpatch.switch import jit_key
from flashpatch.switch.settings import Settings


class Mode(enum.Enum):
    """What a target's gate does under a frame."""

    OFF = "off"  # the original runs, untouched
    ON = "on"  # the replacement runs, through the attention core with the frame's settings
    TRACE_ORIGINAL = "trace-original"  # the drift guard traces the original (the gate stands aside)
    TRACE_REPLACEMENT = "trace-replacement"  # the drift guard traces the replacement, with a shape-only core


class Source(enum.Enum):
    """Who opened a frame: the user (a block), a patched model's entry point, the drift guard, or `install`."""

    BLOCK = "block"
    MODEL = "model"
    GUARD = "guard"
    DEFAULT = "default"


@dataclasses.dataclass(eq=False)
class Frame:
    """One entry on a context's stack; `closed` once left."""

    settings: Settings | None
    mode: Mode
    source: Source
    #: Where it was entered (thread, and asyncio task if any), to refuse leaving it elsewhere; None: anywhere.
    owner: Owner | None = None
    #: The object that opened it (an enable()/disable() block), to find its frame when it is left.
    opener: object = None
    closed: bool = False
    _give_back: Callable[[], None] | None = dataclasses.field(default=None, repr=False)

    @property
    def key(self) -> str | None:
        """What JAX's jit cache sees while the frame is in force: settings and mode, never a stale mix."""
        if self.source is Source.DEFAULT:
            return None  # the process-wide key (`set_default`)
        if self.mode is Mode.OFF:
            return "off"
        assert self.settings is not None
        suffix = "" if self.mode is Mode.ON else f":{self.mode.value}"
        return self.settings.cache_key + suffix

    @property
    def holds(self) -> bool:
        """Whether the frame keeps the targets patched (every mode but OFF goes through the gate)."""
        return self.mode is not Mode.OFF


@dataclasses.dataclass(frozen=True)
class Owner:
    """The thread and asyncio task a frame was entered on (compared), with their names (for messages)."""

    thread: int
    task: int | None
    thread_name: str = dataclasses.field(compare=False)
    task_name: str | None = dataclasses.field(compare=False)

    @classmethod
    def here(cls) -> Owner:
        thread = threading.current_thread()
        task = _current_task()
        return cls(thread.ident or 0, None if task is None else id(task), thread.name, task and task.get_name())

    @property
    def label(self) -> str:
        task = "" if self.task_name is None else f", asyncio task {self.task_name!r}"
        return f"thread {self.thread_name!r}{task}"


def _current_task():
    """The running asyncio task on this thread, or None (without importing asyncio for programs that never did)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None or asyncio._get_running_loop() is None:
        return None
    return asyncio.current_task()


_frames: contextvars.ContextVar[tuple[Frame, ...]] = contextvars.ContextVar("flashpatch_frames", default=())
_default = Frame(None, Mode.OFF, Source.DEFAULT)
_default_lock = threading.Lock()


# --- holders and listeners ------------------------------------------------------------------------------

_holds_lock = threading.RLock()
_holders = 0
_listeners: list[Callable[[bool], None]] = []


def add_listener(listener: Callable[[bool], None]) -> None:
    """Call `listener(True)` when the first holder arrives and `listener(False)` when the last leaves.

    Called at once with True where holders are already there. A listener that raises on arrival makes the
    frame (or default) that was being entered fail, whole.
    """
    with _holds_lock:
        _listeners.append(listener)
        if _holders:
            listener(True)


def holders() -> int:
    """How many frames and defaults hold the targets now."""
    return _holders


def _acquire() -> None:
    global _holders
    with _holds_lock:
        if _holders == 0:
            for listener in _listeners:
                listener(True)
        _holders += 1


def _release() -> None:
    global _holders
    with _holds_lock:
        if _holders == 0:
            raise RuntimeError("flashpatch: a hold was given back twice")
        _holders -= 1
        if _holders == 0:
            for listener in _listeners:
                listener(False)


def _hold(frame: Frame) -> None:
    """Take a hold for `frame`, given back once: when it is left, or when Python collects it unleft."""
    _acquire()
    frame._give_back = weakref.finalize(frame, _release)


def _give_back(frame: Frame) -> None:
    give_back, frame._give_back = frame._give_back, None
    if give_back is not None:
        give_back()


# --- reading the stack ------------------------------------------------------------------------------------


def top() -> Frame:
    """The frame in force here: this context's innermost open one, else the process default (the gate's read)."""
    for frame in reversed(_frames.get()):
        if not frame.closed:
            return frame
    return _default


def current() -> Settings | None:
    """The settings the replacement runs with here; None where the original runs."""
    frame = top()
    return frame.settings if frame.mode in (Mode.ON, Mode.TRACE_REPLACEMENT) else None


def open_frames() -> tuple[Frame, ...]:
    """This context's open frames, innermost last."""
    return tuple(frame for frame in _frames.get() if not frame.closed)


def in_block() -> bool:
    """Whether an enable()/disable() block of the user's is open here (a patched model's frame then defers to it)."""
    return any(frame.source is Source.BLOCK for frame in open_frames())


def key_mismatch() -> str | None:
    """Why JAX's jit key on this thread is not the key of the frame in force here, or None when it is.

    It differs when a block of another asyncio task on this thread is held across an `await`: JAX keys its
    caches per thread, flashpatch's frames are per task.
    """
    want, have = top().key, jit_key.current()
    if want is None:
        want = jit_key.global_key()
    if want == have:
        return None
    return f"JAX's jit cache is keyed {have!r} on this thread, but the block in force here asks for {want!r}"


def _sync_key() -> None:
    jit_key.apply(top().key)


# --- entering and leaving -----------------------------------------------------------------------------------


def enter(
    settings: Settings | None, mode: Mode | None = None, source: Source = Source.BLOCK, opener: object = None
) -> Frame:
    """Open a frame here: hold the targets, push it, key JAX's caches on it. All of it, or nothing."""
    mode = (Mode.OFF if settings is None else Mode.ON) if mode is None else mode
    if mode is not Mode.OFF and settings is None:
        raise ValueError(f"mode {mode.name} needs settings")
    frame = Frame(settings, mode, source, Owner.here() if source is Source.BLOCK else None, opener)
    with contextlib.ExitStack() as undo:
        if frame.holds:
            _hold(frame)
            undo.callback(_give_back, frame)
        token = _frames.set((*_frames.get(), frame))
        undo.callback(_frames.reset, token)
        _sync_key()
        undo.pop_all()
    return frame


def leave(frame: Frame) -> None:
    """Close `frame`: take it off this context's stack, give back its hold, key JAX's caches on what is left.

    Frames opened above it stay open and in force. Raises RuntimeError, changing nothing, where `frame` is
    not open in this context (it was entered in another thread or task).
    """
    stack = _frames.get()
    if frame.closed:
        return
    here = Owner.here()
    if frame not in stack or (frame.owner is not None and frame.owner != here):
        where = "another thread or task" if frame.owner is None else frame.owner.label
        raise RuntimeError(
            f"flashpatch: a block entered on {where} was left on {here.label}. A block belongs to the thread "
            "and asyncio task that entered it; nothing was changed (it is still open there). Leave it where it "
            "was entered, or decorate the coroutine or function with @flashpatch.enable(...) instead."
        )
    frame.closed = True
    try:
        _frames.set(tuple(f for f in stack if f is not frame))
    finally:
        try:
            _give_back(frame)
        finally:
            _sync_key()


@contextlib.contextmanager
def entered(settings: Settings | None, mode: Mode | None = None, source: Source = Source.BLOCK) -> Iterator[Frame]:
    """`enter` ... `leave` as a with-block."""
    frame = enter(settings, mode, source)
    try:
        yield frame
    finally:
        leave(frame)


class Segment:
    """The frame of one decorated coroutine or generator, on the stack only while its code runs.

    `resume` before each step of it (the first opens the frame), `suspend` after: the frame, and those its
    code opened above it and has not left yet, come off the stack and go back on at the next `resume`, on top
    of whatever stack is there then. `finish`, after the last step, closes them all, innermost first, each one
    even where another fails.
    """

    def __init__(self, settings: Settings | None) -> None:
        self.settings = settings
        self._frame: Frame | None = None
        self._saved: tuple[Frame, ...] = ()  # the segment's frames while its code is suspended

    def resume(self) -> None:
        if self._frame is None:
            self._frame = enter(self.settings)
            self._frame.owner = None  # the segment leaves it, wherever its last step ran
            return
        here = Owner.here()
        for frame in self._saved[1:]:  # blocks the code opened: they move with it to where it runs now
            if frame.owner is not None:
                frame.owner = here
        frames, self._saved = self._saved, ()
        _frames.set((*_frames.get(), *frames))
        _sync_key()

    def suspend(self) -> None:
        stack = _frames.get()
        at = next((i for i, frame in enumerate(stack) if frame is self._frame), None)
        if at is None:
            return
        self._saved = stack[at:]
        _frames.set(stack[:at])
        _sync_key()

    def finish(self) -> None:
        frames, self._saved = self._saved, ()
        _close_all(list(reversed(frames)))


def _close_all(frames: list[Frame]) -> None:
    """Close each of `frames` (not on any stack now), every one even where one step raises."""
    if not frames:
        return
    frame, rest = frames[0], frames[1:]
    try:
        frame.closed = True
        _give_back(frame)
    finally:
        _close_all(rest)


# --- the process default ----------------------------------------------------------------------------------


def default() -> Settings | None:
    """The process-wide settings (what contexts without frames follow), or None."""
    return _default.settings


def set_default(settings: Settings | None) -> None:
    """Make `settings` the process default: hold the targets while it is on, key JAX's caches on it."""
    global _default
    with _default_lock:
        old = _default
        if settings == old.settings:
            return
        new = Frame(settings, Mode.OFF if settings is None else Mode.ON, Source.DEFAULT)
        with contextlib.ExitStack() as undo:
            if new.holds:
                _hold(new)
                undo.callback(_give_back, new)
            jit_key.set_global(None if settings is None else settings.cache_key)
            undo.pop_all()
        _default = new
        _give_back(old)
