"""Backend registry. Backends that need optional GPU stacks are imported only when asked for."""

from __future__ import annotations

import importlib
import threading

from flashpatch.backends.base import Backend, Problem

#: name -> "module:Class"; imported lazily so that e.g. kvax is never imported on CPU.
_FACTORIES = {
    "reference": "flashpatch.backends.reference:ReferenceBackend",
    "xla": "flashpatch.backends.xla:XlaBackend",
    "kvax": "flashpatch.backends.kvax:KvaxBackend",
    "cudnn": "flashpatch.backends.cudnn:CudnnBackend",
    "cudnn_split": "flashpatch.backends.cudnn_split:CudnnSplitBackend",
}
_instances: dict[str, Backend] = {}
_lock = threading.Lock()


def names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def get(name: str) -> Backend:
    """The backend called `name` (ValueError for an unknown name)."""
    if name not in _FACTORIES:
        raise ValueError(f"backend must be one of {', '.join(_FACTORIES)}; got {name!r}")
    with _lock:
        if name not in _instances:
            module_name, class_name = _FACTORIES[name].split(":")
            _instances[name] = getattr(importlib.import_module(module_name), class_name)()
        return _instances[name]


__all__ = ["Backend", "Problem", "get", "names"]
