"""Toggling flashpatch retraces jitted functions: no stale path in either direction, per thread.

The patched path is read off the output: the `xla` backend is swapped for one whose attention is
all zeros (`patching.ZeroBackend`), so a patched Attention returns exact zeros and the original
never does. Every check holds whatever JAX has cached before it (a stale entry is exactly what
must not be reused), so one jitted function serves the whole module and compiles once per key.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import pytest
from patching import ZeroBackend, ran_patched, tiny_attention

import flashpatch
from flashpatch import backends


@pytest.fixture(scope="module")
def tiny():
    return tiny_attention()


@pytest.fixture(scope="module", autouse=True)
def _zero_backend():
    with backends.override("xla", ZeroBackend()):
        yield


@pytest.fixture(scope="module")
def attend(tiny):
    """One jitted function for the module: whether it ran patched, for the current settings."""
    run = jax.jit(lambda params: tiny(params))
    return lambda: ran_patched(run(tiny.params))


def test_off_then_on(attend) -> None:
    assert not attend()
    with flashpatch.enable("xla"):
        assert attend(), "jitted while off, it kept the original path once enabled"
    assert not attend(), "it kept the patched path after leaving enable()"


def test_on_then_off(attend) -> None:
    with flashpatch.enable("xla"):
        assert attend()
    assert not attend(), "jitted while on, it kept the patched path once off"
    with flashpatch.enable("xla"):
        assert attend()


def test_disable_inside_enable(attend) -> None:
    with flashpatch.enable("xla"):
        assert attend()
        with flashpatch.disable():
            assert not attend()
        assert attend()


def test_install_and_uninstall_retrace(attend) -> None:
    assert not attend()
    flashpatch.install("xla")
    try:
        assert attend(), "install() did not reach a function jitted while off"
        with flashpatch.disable():
            assert not attend()
        assert attend()
    finally:
        flashpatch.uninstall()
    assert not attend(), "uninstall() left the patched path in the cache"


def test_threads_get_their_own_path_concurrently(tiny) -> None:
    run = jax.jit(lambda params: tiny(params))  # fresh: both threads trace and compile at once
    start = threading.Barrier(2, timeout=60)
    seen: dict[str, list[bool]] = {}
    errors: list[BaseException] = []

    def worker(name: str, enabled: bool) -> None:
        try:
            with flashpatch.enable("xla") if enabled else contextlib.nullcontext():
                start.wait()
                seen[name] = [ran_patched(run(tiny.params)) for _ in range(4)]
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n, n == "on")) for n in ("on", "off")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert seen == {"on": [True] * 4, "off": [False] * 4}


def test_thread_follows_install_while_another_disables(attend) -> None:
    flashpatch.install("xla")
    try:
        seen: dict[str, bool] = {}

        def follower() -> None:
            seen["follower"] = attend()

        with flashpatch.disable():
            thread = threading.Thread(target=follower)
            thread.start()
            thread.join(timeout=120)
            seen["main"] = attend()
    finally:
        flashpatch.uninstall()
    assert seen == {"follower": True, "main": False}
