"""The attention classes flashpatch patches: openpi's two, plus any registered copies (forks, tests)."""

from __future__ import annotations

import importlib.util
import sys
import threading

from flashpatch import diagnostics, openpi_sites
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
    Registering the same class twice is harmless. A module that cannot be found is reported once (a
    FlashpatchWarning) but stays registered: it is patched if it becomes importable later.
    """
    if kind not in ADAPTERS:
        raise ValueError(f"kind must be one of {', '.join(ADAPTERS)}; got {kind!r}")
    target = Target(module=module, cls_name=cls_name, adapter=ADAPTERS[kind])
    missing = _unfindable(module)
    if missing is not None:
        diagnostics.warn_once(
            ("unfindable", module),
            f"register_target: no module named {missing!r} can be found, so {target.site} is not patched; "
            "check the module name (if it becomes importable later, it is patched then)",
        )
    return _add(target)


def _add(target: Target) -> Target:
    module, cls_name = target.module, target.cls_name
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


def _unfindable(module: str) -> str | None:
    """The first part of `module` that no finder can locate now (a typo, most likely), or None.

    Imports nothing: it looks for each part only while its parent is already imported, and stops at the
    first part that is found but not imported (its children are only knowable by importing it). Checked
    when a target is registered, so the warning points at the user's register_target line; a module that
    is imported later (a path added afterwards) still binds then, since the registration stands.
    """
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name in sys.modules:
            continue
        if depth > 1 and not hasattr(sys.modules[".".join(parts[: depth - 1])], "__path__"):
            return name  # its parent, imported, is a module, not a package: it has no submodules
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return name
        return name if spec is None else None
    return None


def all_targets() -> list[Target]:
    with _lock:
        return list(_registry.values())


def on_register(listener) -> None:
    """Call `listener(target)` for each target registered from now on (the installer binds them)."""
    with _lock:
        _listeners.append(listener)


for _module, _cls, _kind in openpi_sites.OPENPI:  # openpi may well be missing here: no check
    _add(Target(module=_module, cls_name=_cls, adapter=ADAPTERS[_kind]))
