"""The one list of attention backends: built in, from installed plugins, or registered at run time.

Everything that names backends reads this registry: `Settings` validation, `FLASHPATCH_BACKEND`,
the pytest plugin, `doctor`, `auto`'s rules and the conformance kit. A backend is registered with a
factory and built on first use, so a backend whose kernel library is missing or cannot load on this
machine costs nothing until someone asks for it. This module imports no JAX: the interpreter-start
hook checks `FLASHPATCH_BACKEND` against it before anything heavy is loaded.

Third-party packages can add backends without any import from the user, through the entry-point
group `flashpatch.backends` (name = "module:attribute", the attribute a factory as below).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from flashpatch.backends.base import Backend, Problem

    #: A zero-argument callable returning a Backend (a Backend subclass is one), or "module:attribute".
    Factory = str | Callable[[], Backend]

ENTRY_POINT_GROUP = "flashpatch.backends"
#: The names `enable()` takes besides backends: it resolves per call (flashpatch/core/selection.py).
AUTO = "auto"
#: openpi's own attention: the yardstick every backend is checked against, never replaced.
REFERENCE = "reference"

_BUILT_IN: dict[str, Factory] = {
    "reference": "flashpatch.backends.reference:ReferenceBackend",
    "xla": "flashpatch.backends.xla:XlaBackend",
    "kvax": "flashpatch.backends.kvax:KvaxBackend",
    "cudnn": "flashpatch.backends.cudnn:CudnnBackend",
    "cudnn_split": "flashpatch.backends.cudnn_split:CudnnSplitBackend",
    "flash": "flashpatch.backends.flash:FlashBackend",
    "pallas": "flashpatch.backends.pallas:PallasBackend",
}
_lock = threading.RLock()
_factories: dict[str, Factory] = dict(_BUILT_IN)
_instances: dict[str, Backend] = {}
_plugins_loaded = False


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.isidentifier() or name == AUTO:
        raise ValueError(f"a backend name must be a Python identifier other than {AUTO!r}; got {name!r}")
    return name


def register(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Make `name` a backend: `enable(name)`, `FLASHPATCH_BACKEND=name`, doctor and the conformance kit see it.

    `factory` is called (or, as "module:attribute", imported and called) the first time the backend is
    needed. Registering a name that exists raises unless `replace=True`.
    """
    _check_name(name)
    _not_reference(name)
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise TypeError(f"factory must be callable or a 'module:attribute' string; got {factory!r}")
    with _lock:
        _load_plugins()
        if name in _factories and not replace:
            raise ValueError(f"backend {name!r} is already registered; pass replace=True to replace it")
        _factories[name] = factory
        _instances.pop(name, None)


def _not_reference(name: str) -> None:
    if name == REFERENCE:
        raise ValueError(
            f"{REFERENCE!r} is openpi's own attention, the yardstick every backend is compared with; it cannot be "
            "replaced. Register your variant under a name of its own."
        )


def unregister(name: str) -> None:
    """Remove a backend registered at run time (built-in ones stay: they are part of flashpatch)."""
    with _lock:
        if name in _BUILT_IN:
            raise ValueError(f"{name!r} is a built-in backend and cannot be unregistered")
        if _factories.pop(name, None) is None:
            raise ValueError(f"no backend {name!r} is registered; registered: {', '.join(names())}")
        _instances.pop(name, None)


def names() -> tuple[str, ...]:
    """Registered backend names, built-in ones first."""
    with _lock:
        _load_plugins()
        return tuple(_factories)


def choices() -> tuple[str, ...]:
    """What `enable(backend=...)` and `FLASHPATCH_BACKEND` accept: 'auto' and every backend name."""
    return (AUTO, *names())


def canonical(name: object) -> str:
    """`name` as registered, with surrounding spaces and case ignored ('XLA', ' xla ' -> 'xla').

    Every place that takes a backend name reads it through here (`enable()`, `FLASHPATCH_BACKEND`, the command
    lines), so they accept and refuse the same spellings. ValueError naming the choices for an unknown name.
    """
    if not isinstance(name, str):
        raise TypeError(f"a backend name is a str such as 'auto' or 'xla'; got {type(name).__name__} {name!r}")
    wanted = name.strip().lower()
    allowed = choices()
    for choice in allowed:
        if choice.lower() == wanted:
            return choice
    raise ValueError(f"backend must be one of {', '.join(allowed)}; got {name!r}")


def get(name: str) -> Backend:
    """The backend called `name`, built on first use (ValueError naming the choices for an unknown name)."""
    with _lock:
        _load_plugins()
        if name not in _factories:
            raise ValueError(f"backend must be one of {', '.join(_factories)}; got {name!r}")
        if name not in _instances:
            _instances[name] = _build(name, _factories[name])
        return _instances[name]


@contextlib.contextmanager
def override(name: str, backend: Backend) -> Iterator[Backend]:
    """Within the block, `name` is computed by `backend` (an instance); the previous one is back after.

    For tests that plant a deliberately broken backend, and for sweeps that time a backend with other
    settings under its own name. Process-wide, like the registry itself.
    """
    _not_reference(name)
    with _lock:
        _load_plugins()
        if name not in _factories:
            raise ValueError(f"backend must be one of {', '.join(_factories)}; got {name!r}")
        had = name in _instances
        previous = _instances.get(name)
        _instances[name] = backend
    try:
        yield backend
    finally:
        with _lock:
            if had:
                _instances[name] = previous  # type: ignore[assignment]
            else:
                _instances.pop(name, None)


def _build(name: str, factory: Factory) -> Backend:
    if isinstance(factory, str):
        module_name, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attribute)
    backend = factory()  # type: ignore[operator]
    from flashpatch.backends.base import Backend

    if not isinstance(backend, Backend):
        raise TypeError(f"the factory of backend {name!r} returned {type(backend).__name__}, not a Backend")
    if getattr(backend, "name", None) != name:
        backend.name = name  # messages and the conformance kit name it as registered
    return backend


def _load_plugins() -> None:
    """Add the backends that installed packages declare (entry points), once, without importing them."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    try:
        found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # broken metadata of some other package must not break flashpatch
        return
    for entry in found:
        if entry.name not in _factories and entry.name.isidentifier() and entry.name != AUTO:
            _factories[entry.name] = entry.value


def __getattr__(name: str) -> Any:
    # `from flashpatch.backends import Backend, Problem` without importing JAX at registry import.
    if name in ("Backend", "ChainBackend", "DenseBackend", "Problem"):
        from flashpatch.backends import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUTO",
    "REFERENCE",
    "Backend",
    "ChainBackend",
    "DenseBackend",
    "Problem",
    "canonical",
    "choices",
    "get",
    "names",
    "override",
    "register",
    "unregister",
]
