"""What differs in Pallas between openpi's JAX (0.5.3) and today's (0.12), in one place.

Checked against the installed sources of both:

- Triton compiler parameters: `plgpu.TritonCompilerParams` (0.5.3) became `plgpu.CompilerParams` (0.12).
- `pl.load` / `pl.store` with masks moved to `plgpu.load` / `plgpu.store`; the kernels avoid both
  (every tile is in bounds, the wrapper pads), so plain ref indexing with `pl.ds` serves both versions.
- `pl.dot` (0.5.3) became `plgpu.dot` (0.12); both are `lax.dot_general` with float32 accumulation,
  which the kernels call directly (`dot` below).
- `BlockSpec(block_shape, index_map)` has this order in both (it was the other way before 0.4.31);
  it is built by keyword here so that the order never matters.

Features are detected, not versions compared, so a release in between works as long as it has one
of the two spellings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def compiler_params(num_warps: int, num_stages: int) -> Any:
    """Triton launch parameters, in the class this JAX has."""
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if cls is None:  # pragma: no cover - neither spelling: a JAX this module was not written for
        raise ImportError(f"jax {jax.__version__}'s Pallas has no Triton compiler parameters class")
    return cls(num_warps=num_warps, num_stages=num_stages)


def block_spec(block_shape: tuple[int | None, ...], index_map: Callable[..., tuple]) -> pl.BlockSpec:
    """A BlockSpec; None in block_shape squeezes that dimension (both versions)."""
    return pl.BlockSpec(block_shape=block_shape, index_map=index_map)


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """2-D a @ b (optionally transposed operands), accumulated in float32.

    Both versions' Triton lowering takes any contracting dimension (it inserts the transposes). It
    lowers DEFAULT precision on float32 operands to TF32 (`_dot_general_lowering` in jax's
    `_src/pallas/triton/lowering.py`, 0.5.3 and 0.12 alike), whose error is far above the float32
    tolerance, so float32 operands ask for HIGHEST (IEEE float32); half operands keep the default.
    """
    contract_a = 0 if trans_a else 1
    contract_b = 1 if trans_b else 0
    precision = lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype) else None
    return lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def pallas_call_names(closed_jaxpr) -> list[str]:
    """The `name` of every pallas_call in a (closed) jaxpr, nested jaxprs included, in order.

    0.12 keeps the name as a parameter of the equation; 0.5.3 only in the kernel jaxpr's debug info
    ("name at file:line").
    """
    names: list[str] = []

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                name = eqn.params.get("name")
                if name is None:
                    info = getattr(eqn.params["jaxpr"], "debug_info", None)
                    name = str(getattr(info, "func_src_info", "") or "").split(" ")[0]
                names.append(str(name))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(getattr(closed_jaxpr, "jaxpr", closed_jaxpr))
    return names
