"""The drift guard: before a patched module first runs, check that the replacement matches the original.

openpi may change its attention classes. `targets` checks signatures and fields when it binds a class;
this module checks behaviour, abstractly: the original and the replacement are both traced with
`jax.eval_shape` on the call's shapes, and their variables (the checkpoint layout) and outputs must
agree in structure, shapes and dtypes. Nothing is compiled or run. Done once per (class, fields,
input shapes); where they differ, the original runs, with one warning saying where.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import jax

from flashpatch.targets.base import Target

_local = threading.local()
_layouts: dict[tuple, str | None] = {}


def checking() -> bool:
    """True while the guard traces a module (the replacement then skips backend choice and messages)."""
    return getattr(_local, "checking", False)


def bypassed() -> bool:
    """True while the guard traces the original (the gate then runs it unpatched)."""
    return getattr(_local, "bypass", False)


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
    previous = getattr(_local, name, False)
    setattr(_local, name, True)
    try:
        yield
    finally:
        setattr(_local, name, previous)


def layout_drift(target: Target, instance: Any, args: tuple, kwargs: dict) -> str | None:
    """Where the replacement's variables or outputs differ from the original's, or None."""
    if checking():
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
    _layouts[key] = reason = compare(original, replaced)
    return reason


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
