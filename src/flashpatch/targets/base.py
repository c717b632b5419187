"""What flashpatch knows about one attention class it replaces, and how it checks that knowledge."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any, ClassVar

import jax.numpy as jnp

#: The attention core a target calls in place of openpi's einsums:
#: core(q, k, v, attn_mask, *, probs_dtype, causal_runs=True) (flashpatch.core.attention.attention's arguments).
Core = Callable[..., Any]


class Adapter:
    """Knows one openpi attention class: its call signature, fields, helpers, and the replacement.

    The replacement computes exactly what the original computes around the attention core
    (projections, RoPE, scaling, KV cache, output projection), through the original's own
    submodules and helpers, so that parameters and checkpoints stay the same.
    """

    kind: ClassVar[str]
    call_parameters: ClassVar[tuple[str, ...]]
    fields: ClassVar[tuple[str, ...]]
    methods: ClassVar[tuple[str, ...]] = ()
    helpers: ClassVar[tuple[str, ...]] = ()

    def drift(self, cls: type) -> str | None:
        """Why `cls` no longer looks like what this adapter was written for, or None."""
        try:
            params = tuple(inspect.signature(cls.__call__).parameters)
        except (TypeError, ValueError) as err:
            return f"cannot read the signature of {cls.__qualname__}.__call__ ({err})"
        if params != self.call_parameters:
            return f"__call__{params} is not __call__{self.call_parameters}"
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        missing = [f for f in self.fields if f not in names]
        if missing:
            return f"fields {missing} are missing"
        missing = [m for m in self.methods if not callable(getattr(cls, m, None))]
        if missing:
            return f"methods {missing} are missing"
        home = defining_module(cls)
        missing = [h for h in self.helpers if _lookup(home, h) is None]
        if missing:
            return f"module {home.__name__} lacks {missing}"
        return None

    def check(self, module: Any, call: dict[str, Any]) -> None:
        """Raise a clear error for arguments the original would reject (before anything runs)."""

    def forward(self, module: Any, call: dict[str, Any], core: Core) -> Any:
        """The original `__call__`'s result, with `core` computing the attention."""
        raise NotImplementedError


def check_mask(attn_mask: Any, batch: int, q_len: int, kv_len: int | None) -> None:
    """Raise, naming attn_mask, unless it is (batch, 1, q_len, kv_len); kv_len None: any S >= q_len."""
    shape = tuple(getattr(attn_mask, "shape", ()))
    fits = len(shape) == 4 and shape[:3] == (batch, 1, q_len)
    fits = fits and (shape[3] == kv_len if kv_len is not None else shape[3] >= q_len)
    if not fits:
        keys = kv_len if kv_len is not None else f"S >= {q_len}"
        raise ValueError(f"attn_mask must have shape (B, 1, T, S) = ({batch}, 1, {q_len}, {keys}) here; got {shape}")


def openpi_mask(attn_mask: Any) -> Any:
    """attn_mask as the bool mask the core takes, read as openpi reads it.

    openpi masks logits with `jnp.where(attn_mask, ...)`, so any nonzero entry attends; its
    gemma_fast.Module builds a float mask when given none (its `init` does so).
    """
    attn_mask = jnp.asarray(attn_mask)
    return attn_mask if attn_mask.dtype == jnp.bool_ else attn_mask != 0


def defining_module(cls: type) -> types.ModuleType:
    return sys.modules[cls.__module__]


def _lookup(module: types.ModuleType, dotted: str) -> Any:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclasses.dataclass(frozen=True)
class Target:
    """An attention class to patch: where it lives and which adapter knows it."""

    module: str
    cls_name: str
    adapter: Adapter

    @property
    def site(self) -> str:
        return f"{self.module}.{self.cls_name}"
