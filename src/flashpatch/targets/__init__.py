"""The attention classes flashpatch patches: openpi's two, plus any registered copies (forks, tests)."""

from __future__ import annotations

import threading

from flashpatch import openpi_sites
from flashpatch.targets.base import Adapter, Target
from flashpatch.targets.gemma import GemmaAttention
from flashpatch.targets.gemma_fast import GemmaFastAttention

ADAPTERS: dict[str, Adapter] = {"gemma": GemmaAttention(), "gemma_fast": GemmaFastAttention()}

_registry: dict[tuple[str, str], Target] = {}
_lock = threading.Lock()
_listeners: list = []


def register(module: str, cls_name: str = "Attention", kind: str = "gemma") -> Target:
    """Patch `module.cls_name` too, as a class of `kind` ('gemma' or 'gemma_fast').

    For forks of openpi that keep the code under another package name, and for tests.
    Registering the same class twice is harmless.
    """
    if kind not in ADAPTERS:
        raise ValueError(f"kind must be one of {', '.join(ADAPTERS)}; got {kind!r}")
    target = Target(module=module, cls_name=cls_name, adapter=ADAPTERS[kind])
    with _lock:
        known = _registry.get((module, cls_name))
        if known is not None:
            if known.adapter is not target.adapter:
                raise ValueError(f"{module}.{cls_name} is already registered as kind {known.adapter.kind!r}")
            return known
        _registry[(module, cls_name)] = target
        listeners = list(_listeners)
    for listener in listeners:
        listener(target)
    return target


def all_targets() -> list[Target]:
    with _lock:
        return list(_registry.values())


def on_register(listener) -> None:
    """Call `listener(target)` for each target registered from now on (the installer binds them)."""
    with _lock:
        _listeners.append(listener)


for _module, _cls, _kind in openpi_sites.OPENPI:
    register(_module, _cls, _kind)
