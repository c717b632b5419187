"""Make JAX's compilation caches see flashpatch's settings, so toggling always retraces.

A function jitted while flashpatch was off must not keep running the einsum path once it is
on (nor the reverse). JAX only retraces when something in its cache key changes, so the active
settings are written into that key:

- JAX >= 0.7.2 has `jax.make_user_context`, a thread-local value in the jit key (public API);
- older JAX (openpi pins 0.5.3) has no such hook; there the settings ride in
  `jax.experimental.xla_metadata.set_xla_metadata`, which is also part of the key. It tags the
  traced ops with a frontend attribute that XLA ignores. Changing the process-wide default on
  such a JAX clears JAX's caches instead, since that carrier has no global value.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
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


class _UserContextCarrier:
    def __init__(self) -> None:
        self._context = jax.make_user_context(None)

    def scope(self, key: str | None) -> contextlib.AbstractContextManager[None]:
        return self._context(key)

    def set_global(self, key: str | None) -> None:
        self._context.set_global(key)


class _MetadataCarrier:
    def scope(self, key: str | None) -> contextlib.AbstractContextManager[None]:
        from jax.experimental.xla_metadata import set_xla_metadata

        return set_xla_metadata(**{_METADATA_KEY: key or "off"})

    def set_global(self, key: str | None) -> None:
        jax.clear_caches()


_carrier: _UserContextCarrier | _MetadataCarrier | None = None


def _get() -> _UserContextCarrier | _MetadataCarrier:
    global _carrier
    if _carrier is None:
        _carrier = _UserContextCarrier() if carrier_name() == "user_context" else _MetadataCarrier()
    return _carrier


@contextlib.contextmanager
def keyed(key: str | None) -> Iterator[None]:
    """Within this block (this thread), JAX's jit caches are keyed on `key`."""
    with _get().scope(key):
        yield


def set_global_key(key: str | None) -> None:
    """Key every thread that has no `keyed()` block of its own on `key`."""
    _get().set_global(key)


def drop_compiled() -> None:
    """Forget every function JAX has traced or compiled: for when a key in force no longer says what ran."""
    jax.clear_caches()
