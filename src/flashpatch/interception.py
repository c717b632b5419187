"""Swap each target class's `__call__` for a gate while flashpatch is in use anywhere.

The gate costs one thread-local read when flashpatch is off on the calling thread. When it is on,
the gate runs the original method under a Flax method interceptor
(`flax.linen.intercept_methods`), so that the replacement runs inside the module's own compact
context and creates its submodules and parameters exactly where the original would.

Targets bind lazily: a wrapt post-import hook binds a target when its module is imported, so
flashpatch can be enabled before or after openpi is imported. When the last user lets go, every
class gets its original `__call__` back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import wrapt

from flashpatch import core, diagnostics, settings, targets
from flashpatch.backends.reference import reference_attention
from flashpatch.settings import Settings
from flashpatch.targets.base import Target

_lock = threading.RLock()
_users = 0
_bound: dict[Target, tuple[type, Callable[..., Any]]] = {}
_hooked: set[str] = set()
_local = threading.local()


def acquire() -> None:
    """One more user (an open enable() block or a process default): bind targets on the first."""
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
        active = settings.current()
        if active is None or getattr(_local, "bypass", False):
            return original(self, *args, **kwargs)
        interceptor = functools.partial(_intercept, target, signature, self, active)
        with nn.intercept_methods(interceptor):
            return original(self, *args, **kwargs)

    flashpatch_gate.__flashpatch_original__ = original
    return flashpatch_gate


def _intercept(target, signature, instance, active: Settings, next_fun, args, kwargs, context):
    if context.module is not instance or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    call = signature.bind(instance, *args, **kwargs)
    call.apply_defaults()
    arguments = dict(call.arguments)
    arguments.pop(next(iter(signature.parameters)))
    target.adapter.check(instance, arguments)  # before the layout check runs the original on bad input
    reason = _layout_drift(target, instance, args, kwargs)
    if reason is not None:
        diagnostics.warn_once(
            ("layout", target.site, reason),
            f"{target.site}: the replacement would not reproduce the original ({reason}); the original runs",
        )
        return next_fun(*args, **kwargs)
    if active.verify and not flax_scan_takes_effects():
        diagnostics.warn_once(
            ("verify", target.site),
            f"{target.site}: verify mode cannot report from inside flax's nn.scan with this JAX and flax "
            "(flax rejects callbacks in a scanned body); the patched calls run without the comparison",
        )
        active = dataclasses.replace(active, verify=False)
    if getattr(_local, "checking", False):
        attend = _shape_only_core  # the layout check traces abstractly; no backend choice, no messages
    else:
        attend = functools.partial(core.attention, settings=active, site=target.site)
    return target.adapter.forward(instance, arguments, attend)


@functools.cache
def flax_scan_takes_effects() -> bool:
    """Whether a jax.debug.callback that reads activations may run inside flax's nn.scan here.

    Verify mode reports through such a callback. With JAX 0.12 and flax 0.12.12 flax refuses it
    ("broadcasted variable has a data dependency on the scan body"); JAX 0.10 and 0.5 accept it.
    """

    class Step(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            jax.debug.callback(lambda _: None, x)
            return x, None

    scanned = nn.scan(Step, variable_axes={}, in_axes=(nn.broadcast,), length=1)
    try:
        jax.eval_shape(lambda x: scanned().init_with_output(jax.random.PRNGKey(0), x, x), jnp.zeros(1))
    except ValueError:
        return False
    return True


def _shape_only_core(q, k, v, attn_mask, *, probs_dtype):
    core.check_inputs(q, k, v, attn_mask)
    return reference_attention(q, k, v, attn_mask[:, 0], probs_dtype)


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
    previous = getattr(_local, name, False)
    setattr(_local, name, True)
    try:
        yield
    finally:
        setattr(_local, name, previous)


_layouts: dict[tuple, str | None] = {}


def _layout_drift(target: Target, instance: Any, args: tuple, kwargs: dict) -> str | None:
    """Compare, abstractly, the variables and outputs of the original and of the replacement.

    Done once per (class, fields, input shapes): a checkpoint that loads into the original must
    load into the patched module, and the outputs must have the same structure, shapes and dtypes.
    """
    if getattr(_local, "checking", False):
        return None
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves]
    fields = tuple(
        (name, repr(getattr(instance, name)))
        for name in getattr(type(instance), "__dataclass_fields__", {})
        if name not in ("parent", "name")
    )
    avals = tuple((x.shape, str(x.dtype)) if a else repr(x) for x, a in zip(leaves, is_array, strict=True))
    key = (type(instance), fields, treedef, avals)
    if key in _layouts:
        return _layouts[key]

    clone = instance.clone(parent=None)
    dynamic = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x, a in zip(leaves, is_array, strict=True) if a]

    def abstract_init() -> Any:
        # A new function per pass: jax.eval_shape caches traces on the function object, and the
        # bypass flag is not in that cache's key, so reusing one would hand the second pass the
        # first pass's result (and no drift would ever be seen).
        def init(*arrays):
            it = iter(arrays)
            filled = [next(it) if a else x for x, a in zip(leaves, is_array, strict=True)]
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, filled)
            return clone.init_with_output(jax.random.PRNGKey(0), *call_args, **call_kwargs)

        return jax.eval_shape(init, *dynamic)

    with _flag("checking"), _flag("bypass"):
        original = abstract_init()
    with _flag("checking"):
        replaced = abstract_init()
    _layouts[key] = reason = _compare(original, replaced)
    return reason


def _compare(original: Any, replaced: Any) -> str | None:
    def table(tree):
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        return {jax.tree_util.keystr(path): (tuple(x.shape), str(x.dtype)) for path, x in flat}

    want, got = table(original), table(replaced)
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            return f"at {path}: original {want.get(path)}, replacement {got.get(path)}"
    return None
