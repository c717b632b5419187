"""The drift guard: before a patched module first runs, check that the replacement matches the original.

openpi may change its attention classes. `targets` checks signatures and fields when it binds a class;
this module checks behaviour, abstractly: the original and the replacement are both traced with
`jax.eval_shape` on the call's shapes, and their variables (the checkpoint layout) and outputs must
agree in structure, shapes and dtypes. Nothing is compiled or run. Done once per (class, fields,
input shapes); where they differ, the original runs, with one warning saying where.
"""

from __future__ import annotations

from typing import Any

import jax

from flashpatch.backends.reference import reference_attention
from flashpatch.core.attention import check_inputs
from flashpatch.switch import state
from flashpatch.switch.settings import Settings
from flashpatch.switch.state import Mode, Source
from flashpatch.targets.base import Target

_layouts: dict[tuple, str | None] = {}


def layout_drift(target: Target, instance: Any, args: tuple, kwargs: dict, settings: Settings) -> str | None:
    """Where the replacement's variables or outputs differ from the original's, or None.

    The two passes run in frames of their own on this context's stack (modes TRACE_ORIGINAL and
    TRACE_REPLACEMENT), which tell the gate what to do and key any jit inside them apart.
    """
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

    # Through the class, not the instance: a module patched by flashpatch.patch_model has its own entry
    # points and clone on the instance, which would open an ON frame over the guard's.
    module_type = type(instance)
    clone = module_type.clone(instance, parent=None)
    dynamic = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x, a in zip(leaves, is_array, strict=True) if a]

    def abstract_init() -> Any:
        # A new function per pass: jax.eval_shape caches traces on the function object (the passes'
        # jit keys differ too, but the guard does not lean on that alone).
        def init(*arrays):
            it = iter(arrays)
            filled = [next(it) if a else x for x, a in zip(leaves, is_array, strict=True)]
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, filled)
            return module_type.init_with_output(clone, jax.random.PRNGKey(0), *call_args, **call_kwargs)

        return jax.eval_shape(init, *dynamic)

    with state.entered(settings, Mode.TRACE_ORIGINAL, Source.GUARD):
        original = abstract_init()
    with state.entered(settings, Mode.TRACE_REPLACEMENT, Source.GUARD):
        replaced = abstract_init()
    _layouts[key] = reason = compare(original, replaced)
    return reason


def shape_only_core(
    q: jax.Array, k: jax.Array, v: jax.Array, attn_mask: jax.Array, *, probs_dtype=None, causal_runs: bool = True
) -> jax.Array:
    """The attention core of the replacement's abstract pass: openpi's math, no backend choice, no messages.

    Only shapes and dtypes come out of that pass, so no platform or backend is asked about.
    """
    check_inputs(q, k, v, attn_mask)
    return reference_attention(q, k, v, attn_mask[:, 0], q.dtype if probs_dtype is None else probs_dtype)


def compare(original: Any, replaced: Any) -> str | None:
    """The first leaf path where two pytrees of abstract arrays differ in shape or dtype, or None."""

    def table(tree):
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        return {jax.tree_util.keystr(path): (tuple(x.shape), str(x.dtype)) for path, x in flat}

    want, got = table(original), table(replaced)
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            return f"at {path}: original {want.get(path)}, replacement {got.get(path)}"
    return None
