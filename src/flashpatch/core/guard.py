"""The compile guard: before a call commits to a kernel, that kernel alone is lowered and compiled.

A backend's `unsupported` says what is known before anything runs; some failures only show when XLA lowers
or compiles the user's step, after the choice was made: a Pallas Triton lowering that does not know the GPU's
name, a tile that does not fit the GPU's shared memory, cuDNN finding no engine for a shape. Raised there,
they end the user's training run, where openpi's own attention would have trained. So the first time a
backend is asked to run a given call, `failure` lowers and compiles what `run.run` would put into the graph
for it (forward and backward, at the call's shapes and dtypes, per shard under a mesh) as a program of its
own, outside the user's trace, and returns the error, if any: selection then takes the next candidate, and at
the end openpi's own attention. Verdicts are kept per process, keyed by the device, the versions that decide
the lowering, the backend and the call's shapes.

Where it runs: GPU calls (`FLASHPATCH_GUARD` unset); `FLASHPATCH_GUARD=0` (or off, false, no) skips it,
`FLASHPATCH_GUARD=all` also guards other platforms (the tests do, on CPU). What it costs: one extra compile
of the attention alone, forward and backward, per distinct call shape and backend, once per process
(docs/user-guide.md, "The compile guard").
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from flashpatch import backends, versions
from flashpatch.backends import machine, meshes
from flashpatch.backends.base import Problem
from flashpatch.core import run

ENV = "FLASHPATCH_GUARD"
_OFF = ("0", "off", "false", "no")

_verdicts: dict[tuple, str | None] = {}
_seconds: dict[tuple, float] = {}
_lock = threading.Lock()
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("flashpatch_guard", default=None)


@contextlib.contextmanager
def mode(value: str) -> Iterator[None]:
    """Within the block (this thread or task), guard as `FLASHPATCH_GUARD=value` would: 'gpu', 'all' or 'off'."""
    token = _forced.set(value)
    try:
        yield
    finally:
        _forced.reset(token)


def applies(problem: Problem) -> bool:
    """Whether calls like `problem` are guarded here (see the module docstring)."""
    setting = (_forced.get() or os.environ.get(ENV, "gpu")).strip().lower()
    if setting in _OFF or not _has_platform(problem.platform):  # a simulated GPU: nothing to compile for
        return False
    return setting == "all" or problem.platform == "gpu"


def failure(name: str, problem: Problem) -> str | None:
    """Why backend `name` failed to lower or compile for `problem` on this machine, or None if it compiles (or
    the guard does not apply). One compile per (device, versions, backend, shapes) per process."""
    if name == backends.REFERENCE or not applies(problem):
        return None
    shard = meshes.per_device(problem)
    key = (_device(), _versions(), name, shard)
    with _lock:
        if key in _verdicts:
            return _verdicts[key]
    start = time.perf_counter()
    verdict = _compile(name, shard)
    with _lock:
        _verdicts[key] = verdict
        _seconds[key] = time.perf_counter() - start
    return verdict


def seconds_spent() -> float:
    """Wall seconds the guard has spent compiling in this process (what it added to first steps)."""
    with _lock:
        return sum(_seconds.values())


def forget() -> None:
    """Drop every verdict (tests; a process that changed its GPU stack)."""
    with _lock:
        _verdicts.clear()
        _seconds.clear()


def describe_machine() -> str:
    """The GPU and the versions, for the message that names a failure."""
    gpu = machine.gpu()
    where = "no GPU" if gpu is None else f"{gpu.kind} ({gpu.sm})"
    cudnn = machine.cudnn_version()
    found = [f"{n} {v}" for n, v in _versions() if v is not None]
    if cudnn is not None:
        found.append(f"cuDNN {machine.cudnn_text(cudnn)}")
    return f"{where}; {', '.join(found)}"


def _device() -> str:
    gpu = machine.gpu()
    return jax.default_backend() if gpu is None else f"{gpu.kind} {gpu.sm} {machine.cudnn_version()}"


def _versions() -> tuple[tuple[str, str | None], ...]:
    found = versions.stack(versions.KERNEL_STACK)
    return tuple((name, None if version is None else str(version)) for name, version in found.items())


def _compile(name: str, problem: Problem) -> str | None:
    """Lower and compile the backend's part of the graph alone, forward and backward; the error, or None."""
    args = problem.abstract_inputs()

    def forward(q, k, v, mask):
        return run.run(q, k, v, mask, backends.get(name), problem)

    def forward_and_backward(q, k, v, mask):
        out, pullback = jax.vjp(lambda q, k, v: forward(q, k, v, mask), q, k, v)
        return out, pullback(jnp.ones_like(out))

    try:
        with jax.default_device(jax.devices(problem.platform)[0]):
            jax.jit(forward_and_backward).lower(*args).compile()
    except Exception as err:  # whatever the stack raises: the call must not be the one to find out
        text = " ".join(str(err).split())
        if len(text) > 400:
            text = text[:400] + " ..."
        return f"{type(err).__name__}: {text}"
    return None


@functools.cache
def _has_platform(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False
