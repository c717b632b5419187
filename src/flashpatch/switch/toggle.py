"""The ways to switch flashpatch on and off: enable() / disable() blocks and decorators, and install().

The state they change is `flashpatch.switch.state`'s; this module is its public face. A block is in force in
the thread or asyncio task that entered it. As a decorator it also covers coroutine, generator and
async-generator functions, one resumption at a time: the caller's code between two resumptions runs as the
caller's own blocks say.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, TypeVar, overload

from flashpatch.switch import interception, state
from flashpatch.switch.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

interception.ensure_listening()  # the targets get bound the first time any block holds them


class Toggle:
    """What enable() and disable() return: a block (`with`) and a decorator, re-entrant and reusable.

    Each `with` opens a frame of its own in the calling thread or task, so one object can be entered again
    inside itself, in sequence, or in several threads and tasks at once; each exit leaves this object's
    innermost frame in the calling thread or task.
    """

    def __init__(self, settings: Settings | None) -> None:
        self.settings = settings
        self._open: weakref.WeakSet[state.Frame] = weakref.WeakSet()  # for messages only; never keeps one alive

    def __repr__(self) -> str:
        if self.settings is None:
            return "flashpatch.disable()"
        return f"flashpatch.enable({self.settings.backend!r}, verify={self.settings.verify})"

    def __enter__(self) -> Settings | None:
        self._open.add(state.enter(self.settings, opener=self))
        return self.settings

    def __exit__(self, *exc_info: object) -> None:
        frames = state.open_frames()
        mine = next((frame for frame in reversed(frames) if frame.opener is self), None)
        if mine is None:
            elsewhere = sorted({frame.owner.label for frame in self._open if frame.owner is not None})
            where = f"; it is open on {', '.join(elsewhere)}" if elsewhere else ""
            raise RuntimeError(
                f"flashpatch: {self!r} was left on {state.Owner.here().label}, where it is not open{where}. "
                "Leave a block in the thread and asyncio task that entered it, as often as it was entered; "
                "nothing was changed."
            )
        state.leave(mine)

    def __call__(self, fn: F) -> F:
        """Decorate `fn`: each call (each resumption of a coroutine or generator) runs inside the block."""
        if not callable(fn):
            raise TypeError(f"{self!r} decorates a function; got {fn!r}")
        if inspect.isasyncgenfunction(fn):
            return self._async_generator(fn)  # type: ignore[return-value]
        if inspect.iscoroutinefunction(fn):
            return self._coroutine(fn)  # type: ignore[return-value]
        if inspect.isgeneratorfunction(fn):
            return self._generator(fn)  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    def _generator(self, fn: Callable[..., Generator]) -> Callable[..., Generator]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Generator:
            return (yield from _run_steps(state.Segment(self.settings), fn(*args, **kwargs)))

        return run

    def _coroutine(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> Any:
            return await _Steps(_run_steps(state.Segment(self.settings), fn(*args, **kwargs)))

        return run

    def _async_generator(self, fn: Callable[..., AsyncIterator]) -> Callable[..., AsyncIterator]:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> AsyncIterator:
            agen = fn(*args, **kwargs)
            segment = state.Segment(self.settings)
            try:
                value: Any = None
                error: BaseException | None = None
                while True:
                    step = agen.asend(value) if error is None else agen.athrow(error)
                    try:
                        item = await _Steps(_steps(segment, step))
                    except StopAsyncIteration:
                        return
                    try:
                        value, error = (yield item), None
                    except GeneratorExit:
                        await _Steps(_steps(segment, agen.aclose()))
                        raise
                    except BaseException as err:
                        value, error = None, err
            finally:
                segment.finish()

        return run


class _Steps:
    """An awaitable over a step driver (`_steps`), so a coroutine can `await` it."""

    def __init__(self, steps: Generator) -> None:
        self._steps = steps

    def __await__(self) -> Generator:
        return self._steps


def _steps(segment: state.Segment, target: Any) -> Generator:
    """Drive `target` (a generator, coroutine, or an async generator's step) one step at a time, each inside
    `segment`; yield what it yields, pass in what is sent or thrown, return what it returns."""
    send, value = True, None
    while True:
        segment.resume()
        try:
            item = target.send(value) if send else target.throw(value)
        except StopIteration as stop:
            return stop.value
        finally:
            segment.suspend()
        try:
            value, send = (yield item), True
        except GeneratorExit:
            segment.resume()
            try:
                target.close()
            finally:
                segment.suspend()
            raise
        except BaseException as error:
            value, send = error, False


def _run_steps(segment: state.Segment, target: Any) -> Generator:
    """`_steps` over the whole life of `target`; the segment's frames are closed when it ends, however it ends."""
    try:
        return (yield from _steps(segment, target))
    finally:
        segment.finish()


@overload
def enable(backend: F, *, verify: bool = False) -> F: ...
@overload
def enable(backend: str = "auto", *, verify: bool = False) -> Toggle: ...


def enable(backend: str | Callable[..., Any] = "auto", *, verify: bool = False) -> Toggle | Callable[..., Any]:
    """Patch openpi's attention in this thread or asyncio task for the duration of the block (or decorated call).

    Nestable: the innermost block wins and leaving it restores what was there before. Other threads and tasks
    are unaffected (they follow their own blocks, else the process default, see `install`); a task created
    inside the block starts with it in force, as context variables do. Functions jitted inside retrace when
    the settings differ from those they were traced with. As a decorator it covers coroutine, generator and
    async-generator functions one resumption at a time; `@flashpatch.enable` with no parentheses decorates a
    function with the default settings.
    """
    if callable(backend):
        return Toggle(Settings(verify=verify))(backend)
    return Toggle(Settings(backend=backend, verify=verify))


@overload
def disable(fn: F) -> F: ...
@overload
def disable(fn: None = None) -> Toggle: ...


def disable(fn: Callable[..., Any] | None = None) -> Toggle | Callable[..., Any]:
    """Run openpi's original attention in this thread or task for the duration of the block (or decorated call).

    It also wins over models patched with `flashpatch.patch` / `patch_model` called inside it.
    """
    block = Toggle(None)
    return block if fn is None else block(fn)


def install(backend: str = "auto", *, verify: bool = False) -> None:
    """Patch openpi's attention process-wide (every thread and task without a block of its own)."""
    state.set_default(Settings(backend=backend, verify=verify))


def uninstall() -> None:
    """Undo `install`. Harmless when nothing is installed."""
    state.set_default(None)


def installed() -> Settings | None:
    """The process-wide settings, or None."""
    return state.default()


__all__ = ["Toggle", "disable", "enable", "install", "installed", "uninstall"]
