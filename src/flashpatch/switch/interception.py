"""Swap each target class's `__call__` for a gate while flashpatch is in use anywhere.

The gate reads the frame in force (`state.top()`, one context-variable read) and does what its mode says:
OFF and TRACE_ORIGINAL call the original at once; ON and TRACE_REPLACEMENT run the original under a Flax
method interceptor (`flax.linen.intercept_methods`), so that the replacement runs inside the module's own
compact context and creates its submodules and parameters exactly where the original would. ON goes through
the drift guard and the attention core; TRACE_REPLACEMENT is the drift guard's own abstract pass, with its
shape-only core.

Targets bind lazily: a wrapt post-import hook binds a target when its module is imported, so flashpatch can
be enabled before or after openpi is imported. The switch tells this module (a listener, `ensure_listening`)
when the first holder arrives and when the last leaves; then every class gets its original `__call__` back.
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

from flashpatch import diagnostics, targets
from flashpatch.core import attention as core
from flashpatch.core import verify
from flashpatch.switch import drift, state
from flashpatch.switch.state import Frame, Mode
from flashpatch.targets.base import Target

_lock = threading.RLock()
_active = False
_bound: dict[Target, tuple[type, Callable[..., Any]]] = {}
_hooked: set[str] = set()
_listening = False


def ensure_listening() -> None:
    """Register with the switch (once): bind the targets while anything holds them."""
    global _listening
    with _lock:
        if not _listening:
            _listening = True
            state.add_listener(_on_hold_change)


def _on_hold_change(held: bool) -> None:
    global _active
    with _lock:
        _active = held
        if held:
            for target in targets.all_targets():
                _watch(target)
        else:
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
        if _active:
            _watch(target)


targets.on_register(_on_new_target)


def _on_import(module: types.ModuleType) -> None:
    with _lock:
        if not _active:
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
        frame = state.top()
        if frame.mode is Mode.TRACE_ORIGINAL:
            return original(self, *args, **kwargs)
        _check_jit_key(target)
        if frame.mode is Mode.OFF:
            return original(self, *args, **kwargs)
        interceptor = functools.partial(_intercept, target, signature, self, frame)
        with nn.intercept_methods(interceptor):
            return original(self, *args, **kwargs)

    flashpatch_gate.__flashpatch_original__ = original
    return flashpatch_gate


def _check_jit_key(target: Target) -> None:
    """Warn once where this call is traced under a JAX cache key that another thread's or task's block set."""
    mismatch = state.key_mismatch()
    if mismatch is not None:
        diagnostics.warn_once(
            ("jit-key", target.site),
            f"{target.site} runs in an asyncio task while a block of another task holds this thread's JAX cache "
            f"key ({mismatch}). JAX keys its compile caches per thread, so the two tasks may reuse each other's "
            "compiled functions; this call follows its own task's blocks. Decorate the coroutine with "
            "@flashpatch.enable(...) (it covers each resumption only), or keep `await` out of "
            "`with flashpatch.enable()` blocks",
        )


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
    attend = functools.partial(core.attention, backend=active.backend, verify=active.verify, site=target.site)
    return target.adapter.forward(instance, arguments, attend)
