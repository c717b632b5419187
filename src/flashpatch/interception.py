"""Swap each target class's `__call__` for a gate while flashpatch is in use anywhere.

The gate reads the calling thread's frame (`switch.top()`, one thread-local read) and does what its
mode says: OFF and TRACE_ORIGINAL call the original at once; ON and TRACE_REPLACEMENT run the original
under a Flax method interceptor (`flax.linen.intercept_methods`), so that the replacement runs inside
the module's own compact context and creates its submodules and parameters exactly where the original
would. ON goes through the drift guard and the attention core; TRACE_REPLACEMENT is the drift guard's own
abstract pass, with its shape-only core.

Targets bind lazily: a wrapt post-import hook binds a target when its module is imported, so
flashpatch can be enabled before or after openpi is imported. When the last user lets go, every
class gets its original `__call__` back.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import wrapt

from flashpatch import core, diagnostics, drift, switch, targets, verify
from flashpatch.switch import Frame, Mode
from flashpatch.targets.base import Target

_lock = threading.RLock()
_users = 0
_bound: dict[Target, tuple[type, Callable[..., Any]]] = {}
_hooked: set[str] = set()


def acquire() -> None:
    """One more user (a frame that is not OFF, or a process default): bind targets on the first."""
    global _users
    with _lock:
        _users += 1
        if _users == 1:
            for target in targets.all_targets():
                _watch(target)


def release() -> None:
    """One user fewer: on the last, give every patched class its original `__call__` back."""
    global _users
    with _lock:
        if _users == 0:
            raise RuntimeError("flashpatch: release() without acquire()")
        _users -= 1
        if _users == 0:
            for cls, original in _bound.values():
                type.__setattr__(cls, "__call__", original)
            _bound.clear()


def bound_targets() -> dict[str, type]:
    """Sites currently patched, with their classes."""
    with _lock:
        return {target.site: cls for target, (cls, _) in _bound.items()}


def _watch(target: Target) -> None:
    if target.module in sys.modules:
        _bind(target, sys.modules[target.module])
    if target.module not in _hooked:
        _hooked.add(target.module)
        wrapt.register_post_import_hook(_on_import, target.module)


def _on_new_target(target: Target) -> None:
    with _lock:
        if _users:
            _watch(target)


targets.on_register(_on_new_target)


def _on_import(module: types.ModuleType) -> None:
    with _lock:
        if not _users:
            return
        for target in targets.all_targets():
            if target.module == module.__name__:
                _bind(target, module)


def _bind(target: Target, module: types.ModuleType) -> None:
    if target in _bound:
        return
    cls = getattr(module, target.cls_name, None)
    if not isinstance(cls, type):
        diagnostics.warn_once(("missing", target.site), f"{target.site} not found; nothing patched there")
        return
    original = cls.__dict__.get("__call__")
    if getattr(original, "__flashpatch_original__", None) is not None:
        return  # the same class, reached through another module name
    reason = "__call__ is inherited, not defined on the class" if original is None else target.adapter.drift(cls)
    if reason is not None:
        diagnostics.warn_once(
            ("drift", target.site),
            f"{target.site} does not match what flashpatch knows ({reason}); it is not patched and runs as before",
        )
        return
    type.__setattr__(cls, "__call__", _gate(target, original))
    _bound[target] = (cls, original)


def _gate(target: Target, original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original, updated=())
    def flashpatch_gate(self, *args, **kwargs):
        frame = switch.top()
        if frame.mode is Mode.OFF or frame.mode is Mode.TRACE_ORIGINAL:
            return original(self, *args, **kwargs)
        interceptor = functools.partial(_intercept, target, signature, self, frame)
        with nn.intercept_methods(interceptor):
            return original(self, *args, **kwargs)

    flashpatch_gate.__flashpatch_original__ = original
    return flashpatch_gate


def _intercept(target, signature, instance, frame: Frame, next_fun, args, kwargs, context):
    if context.module is not instance or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    call = signature.bind(instance, *args, **kwargs)
    call.apply_defaults()
    arguments = dict(call.arguments)
    arguments.pop(next(iter(signature.parameters)))
    target.adapter.check(instance, arguments)  # before the layout check runs the original on bad input
    if frame.mode is Mode.TRACE_REPLACEMENT:
        return target.adapter.forward(instance, arguments, drift.shape_only_core)
    active = frame.settings
    reason = drift.layout_drift(target, instance, args, kwargs, active)
    if reason is not None:
        diagnostics.warn_once(
            ("layout", target.site, reason),
            f"{target.site}: the replacement would not reproduce the original ({reason}); the original runs",
        )
        return next_fun(*args, **kwargs)
    if active.verify and not verify.works_in_flax_scan():
        diagnostics.warn_once(
            ("verify", target.site),
            f"{target.site}: verify mode cannot report from inside flax's nn.scan with this JAX and flax "
            "(flax rejects callbacks in a scanned body); the patched calls run without the comparison.",
        )
        active = dataclasses.replace(active, verify=False)
    attend = functools.partial(core.attention, settings=active, site=target.site)
    return target.adapter.forward(instance, arguments, attend)
