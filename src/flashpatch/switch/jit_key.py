"""Make JAX's compilation caches see which frame is in force, so that switching flashpatch always retraces.

A function jitted while flashpatch was off must not keep running the einsum once it is on (nor the reverse).
JAX retraces only when something in its cache key changes, so the key of the frame in force is written into
that key:

- JAX >= 0.7.2 has `jax.make_user_context`, a value in the jit key with a per-thread override (public API);
- older JAX (openpi pins 0.5.3) has no such hook; there the key rides in
  `jax.experimental.xla_metadata.set_xla_metadata`, also part of the jit key: it tags the traced ops with a
  frontend attribute that XLA ignores. That carrier has no process-wide value, so changing the process
  default clears JAX's caches instead.

JAX keeps the override per thread (its config contexts are thread-local), not per asyncio task; `apply` sets
it for the calling thread and `current` reads what is set there.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable
from typing import Any

import jax

_METADATA_KEY = "flashpatch"


def carrier_name(jax_module: Any = jax) -> str:
    """Which mechanism `jax_module` offers: 'user_context' (JAX >= 0.7.2) or 'xla_metadata'."""
    if hasattr(jax_module, "make_user_context"):
        return "user_context"
    try:
        metadata = importlib.import_module(f"{jax_module.__name__}.experimental.xla_metadata")
        metadata.set_xla_metadata  # noqa: B018 - the attribute is what the carrier uses
    except (ImportError, AttributeError) as err:
        raise ImportError(
            "flashpatch needs jax.make_user_context (JAX >= 0.7.2) or "
            "jax.experimental.xla_metadata.set_xla_metadata (older JAX) to key JAX's caches on its settings"
        ) from err
    return "xla_metadata"


class _Carrier:
    """One thread-local override of JAX's jit key, set through the carrier's own context manager.

    `apply` leaves the previous override's context before it enters the next, so the value JAX restores is
    always the one from before flashpatch's first override on the thread, whatever order frames change in.
    """

    def __init__(self, scope: Callable[[str], contextlib.AbstractContextManager[Any]], set_global: Callable) -> None:
        self._scope = scope
        self._set_global = set_global
        self._local = threading.local()
        self.global_key: str | None = None

    def apply(self, key: str | None) -> None:
        local = self._local
        entered = getattr(local, "entered", None)
        if entered is not None:
            local.entered, local.key = None, None
            entered.__exit__(None, None, None)
        if key is not None:
            entered = self._scope(key)
            entered.__enter__()
            local.entered, local.key = entered, key

    def current(self) -> str | None:
        key = getattr(self._local, "key", None)
        return self.global_key if key is None else key

    def set_global(self, key: str | None) -> None:
        self._set_global(key)
        self.global_key = key


def _user_context() -> _Carrier:
    context = jax.make_user_context(None)
    return _Carrier(context, context.set_global)


def _metadata() -> _Carrier:
    from jax.experimental.xla_metadata import set_xla_metadata

    def scope(key: str) -> contextlib.AbstractContextManager[None]:
        return set_xla_metadata(**{_METADATA_KEY: key})

    def set_global(key: str | None) -> None:
        jax.clear_caches()  # no process-wide metadata: forget what was traced under the old default instead

    return _Carrier(scope, set_global)


_carrier: _Carrier | None = None
_lock = threading.Lock()


def _get() -> _Carrier:
    global _carrier
    if _carrier is None:
        with _lock:
            if _carrier is None:
                _carrier = _user_context() if carrier_name() == "user_context" else _metadata()
    return _carrier


def apply(key: str | None) -> None:
    """On this thread, key JAX's jit caches on `key` from now on; None: on the process-wide key."""
    _get().apply(key)


def current() -> str | None:
    """The key JAX's jit caches see on this thread now (the thread's override, else the process-wide key)."""
    return _get().current()


def set_global(key: str | None) -> None:
    """Key every thread that has no override of its own on `key`."""
    _get().set_global(key)


def global_key() -> str | None:
    """The process-wide key (what threads without an override of their own see)."""
    return _get().global_key
