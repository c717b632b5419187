"""Each thread, asyncio task and decorated coroutine or generator has its own blocks.

An openpi policy server is an asyncio websocket server: one task per connection. These tests hold that one
task's block never reaches another task, that a decorated coroutine or generator is patched only while its
own code runs, and that a block left in the wrong place, or never left, cannot leave the process patched.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import pytest
from patching import ZeroBackend, ran_patched, tiny_attention

import flashpatch
from flashpatch import backends
from flashpatch.switch import interception, jit_key, state
from flashpatch.switch.settings import Settings

XLA = Settings("xla")


def current() -> Settings | None:
    return state.current()


def _in_thread(fn: Callable[[], Any]) -> Any:
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run, name="other")
    thread.start()
    thread.join(timeout=60)
    if errors:
        raise errors[0]
    return result[0]


# --- threads ----------------------------------------------------------------------------------------------


def test_blocks_are_per_thread_and_new_threads_start_from_the_process_default() -> None:
    entered, seen = threading.Barrier(2, timeout=30), {}

    def enabled() -> None:
        with flashpatch.enable("xla"):
            entered.wait()  # both threads are now past their start
            seen["enabled"] = current()
            entered.wait()

    def plain() -> None:
        entered.wait()
        seen["plain"] = current()
        entered.wait()

    threads = [threading.Thread(target=enabled), threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == {"enabled": XLA, "plain": None}
    with flashpatch.enable("xla"):
        assert _in_thread(current) is None  # a block is not inherited by a new thread
    flashpatch.install("reference")
    try:
        with flashpatch.enable("xla"):
            assert _in_thread(current) == Settings("reference")
    finally:
        flashpatch.uninstall()
    assert _in_thread(current) is None


def test_install_reaches_running_threads_without_their_own_block() -> None:
    installed, read = threading.Event(), {}

    def follower() -> None:
        installed.wait(30)
        read["follower"] = current()

    def own_block() -> None:
        with flashpatch.disable():
            installed.wait(30)
            read["disabled"] = current()
        with flashpatch.enable("xla"):
            read["enabled"] = current()

    threads = [threading.Thread(target=follower), threading.Thread(target=own_block)]
    for thread in threads:
        thread.start()
    flashpatch.install("reference")
    try:
        installed.set()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        flashpatch.uninstall()
    assert read == {"follower": Settings("reference"), "disabled": None, "enabled": XLA}


def test_one_block_object_on_several_threads_at_once() -> None:
    block = flashpatch.enable("xla")
    inside = threading.Barrier(3, timeout=30)
    seen: dict[str, Settings | None] = {}

    def worker(name: str) -> None:
        with block:
            inside.wait()
            seen[name] = current()
            inside.wait()
        seen[name + " after"] = current()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    with block:
        inside.wait()
        inside.wait()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == {"a": XLA, "b": XLA, "a after": None, "b after": None}
    assert not interception.bound_targets()


def test_leaving_a_block_on_another_thread_raises_and_changes_nothing() -> None:
    """The block stays open (and patched) where it was entered; that thread can still leave it."""
    tiny = tiny_attention()
    with backends.override("xla", ZeroBackend()):
        run = jax.jit(lambda params: tiny(params))
        block = flashpatch.enable("xla")
        block.__enter__()
        assert ran_patched(run(tiny.params))
        elsewhere = r"was left on thread 'other', where it is not open; it is open on thread"
        with pytest.raises(RuntimeError, match=elsewhere):
            _in_thread(lambda: block.__exit__(None, None, None))
        assert current() == XLA and ran_patched(run(tiny.params)), "the failed exit changed the entering thread"
        block.__exit__(None, None, None)
        assert current() is None and not ran_patched(run(tiny.params))
    assert not interception.bound_targets()


def test_a_thread_that_ends_inside_a_block_releases_its_hold() -> None:
    def leave_it_open() -> None:
        flashpatch.enable("xla").__enter__()
        assert interception.bound_targets()

    _in_thread(leave_it_open)
    gc.collect()
    assert state.holders() == 0 and not interception.bound_targets(), "the ended thread's block kept targets patched"


# --- asyncio tasks -----------------------------------------------------------------------------------------


def test_a_block_held_across_an_await_stays_in_its_task() -> None:
    """Task A holds enable('xla') across an await; task B, which enabled nothing, runs the original."""
    seen: dict[str, Settings | None] = {}

    async def a(entered: asyncio.Event, done: asyncio.Event) -> None:
        with flashpatch.enable("xla"):
            entered.set()
            await done.wait()
            seen["a"] = current()

    async def b(entered: asyncio.Event, done: asyncio.Event) -> None:
        await entered.wait()
        seen["b"] = current()
        done.set()

    async def main() -> None:
        entered, done = asyncio.Event(), asyncio.Event()
        await asyncio.gather(a(entered, done), b(entered, done))

    asyncio.run(main())
    assert seen == {"a": XLA, "b": None}


def test_interleaved_blocks_of_two_tasks_each_close_cleanly() -> None:
    """Two tasks whose blocks open and close interleaved (A in, B in, A out, B out): no error, nothing left."""
    order: list[str] = []

    async def task(name: str, backend: str, gates: dict[str, asyncio.Event]) -> None:
        with flashpatch.enable(backend):
            order.append(f"{name} in")
            gates[f"{name} in"].set()
            await gates[f"{name} may leave"].wait()
            assert current() == Settings(backend)
        order.append(f"{name} out")
        gates[f"{name} out"].set()

    async def main() -> None:
        gates = {k: asyncio.Event() for k in ("a in", "b in", "a out", "b out", "a may leave", "b may leave")}
        tasks = [asyncio.create_task(task("a", "xla", gates)), asyncio.create_task(task("b", "reference", gates))]
        await gates["a in"].wait()
        await gates["b in"].wait()
        gates["a may leave"].set()
        await gates["a out"].wait()
        gates["b may leave"].set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert order == ["a in", "b in", "a out", "b out"]
    assert current() is None and state.holders() == 0 and not interception.bound_targets()


def test_a_task_created_inside_a_block_starts_with_it_and_cannot_leave_it() -> None:
    seen: dict[str, Any] = {}

    async def child(block: Any) -> None:
        seen["child"] = current()
        try:
            block.__exit__(None, None, None)
        except RuntimeError as err:
            seen["error"] = str(err)

    async def main() -> None:
        block = flashpatch.enable("xla")
        with block:
            await asyncio.create_task(child(block), name="child")
            seen["parent"] = current()

    asyncio.run(main())
    assert seen["child"] == XLA and seen["parent"] == XLA
    assert "asyncio task 'child'" in seen["error"] and "nothing was changed" in seen["error"]
    assert current() is None and state.holders() == 0


def test_a_task_traced_under_another_tasks_jit_key_is_told() -> None:
    """JAX keys its caches per thread: when task B traces while task A holds a block across an await, B follows
    its own (empty) stack and flashpatch says once why its compile cache may be shared."""
    tiny = tiny_attention(seq=5)
    seen: dict[str, bool] = {}

    async def a(entered: asyncio.Event, done: asyncio.Event) -> None:
        with flashpatch.enable("xla"):
            entered.set()
            await done.wait()

    async def b(entered: asyncio.Event, done: asyncio.Event) -> None:
        await entered.wait()
        seen["b patched"] = ran_patched(jax.jit(lambda p: tiny(p))(tiny.params))
        done.set()

    async def main() -> None:
        entered, done = asyncio.Event(), asyncio.Event()
        await asyncio.gather(a(entered, done), b(entered, done))

    with backends.override("xla", ZeroBackend()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
    assert seen == {"b patched": False}
    messages = [str(w.message) for w in caught if issubclass(w.category, flashpatch.FlashpatchWarning)]
    assert any("another task holds this thread's JAX cache key" in m for m in messages), messages


# --- decorated coroutines, generators and async generators ----------------------------------------------------


def test_a_decorated_coroutine_is_patched_only_while_it_runs() -> None:
    seen: dict[str, Any] = {}

    @flashpatch.enable("xla")
    async def serve(entered: asyncio.Event, done: asyncio.Event) -> str:
        seen["serve before"] = (current(), jit_key.current())
        entered.set()
        await done.wait()
        seen["serve after"] = current()
        return "served"

    async def other(entered: asyncio.Event, done: asyncio.Event) -> None:
        await entered.wait()
        seen["other"] = (current(), jit_key.current())  # serve is suspended: its key is not on the thread
        done.set()

    async def main() -> None:
        entered, done = asyncio.Event(), asyncio.Event()
        seen["result"], _ = await asyncio.gather(serve(entered, done), other(entered, done))

    asyncio.run(main())
    assert seen == {
        "serve before": (XLA, XLA.cache_key),
        "other": (None, None),
        "serve after": XLA,
        "result": "served",
    }
    assert state.holders() == 0 and not interception.bound_targets()


def test_a_decorated_coroutine_passes_exceptions_and_cancellation_through() -> None:
    @flashpatch.enable("xla")
    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("inside")

    @flashpatch.enable("xla")
    async def waits_forever() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        with pytest.raises(KeyError, match="inside"):
            await fails()
        task = asyncio.create_task(waits_forever())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert state.holders() == 0 and not interception.bound_targets()


def test_a_decorated_generator_is_patched_only_while_it_runs() -> None:
    @flashpatch.enable("xla")
    def steps():
        got = yield current()
        with flashpatch.enable("reference"):  # a block of its own, held across a yield, goes with it
            yield (got, current())
        yield current()
        return "done"

    gen = steps()
    assert next(gen) == XLA
    assert current() is None, "the caller ran patched while the generator was paused"
    assert gen.send("hello") == ("hello", Settings("reference"))
    assert current() is None and jit_key.current() is None
    with flashpatch.disable():
        assert next(gen) == XLA
        assert current() is None
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == "done"
    assert state.holders() == 0 and not interception.bound_targets()


def test_a_decorated_generator_closed_early_leaves_nothing() -> None:
    closed: list[Settings | None] = []

    @flashpatch.enable("xla")
    def steps():
        try:
            with flashpatch.enable("reference"):
                yield 1
                yield 2
        finally:
            closed.append(current())

    gen = steps()
    assert next(gen) == 1
    gen.close()
    assert closed == [XLA], "the generator's cleanup did not run inside its block"
    assert state.open_frames() == () and state.holders() == 0 and not interception.bound_targets()


def test_a_decorated_async_generator_is_patched_only_while_it_runs() -> None:
    @flashpatch.enable("xla")
    async def stream():
        for i in range(2):
            await asyncio.sleep(0)
            received = yield (i, current())
            assert received is None

    async def main() -> list[Any]:
        seen = []
        async for item in stream():
            seen.append((item, current()))
        return seen

    assert asyncio.run(main()) == [((0, XLA), None), ((1, XLA), None)]
    assert state.holders() == 0 and not interception.bound_targets()


def test_a_plain_with_block_in_a_generator_covers_the_caller_while_paused() -> None:
    """What the decorator is for: a plain `with` in a generator shares the caller's context (as Python's own
    decimal contexts do, PEP 568), so while the generator is paused inside it, the caller's code runs patched."""

    def steps():
        with flashpatch.enable("xla"):
            yield

    gen = steps()
    next(gen)
    assert current() == XLA
    gen.close()
    assert current() is None and state.holders() == 0
