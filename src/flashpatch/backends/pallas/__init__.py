"""flashpatch's own flash attention, written in Pallas: openpi's masks in chain form, no dense mask.

The kernels (`kernel.py`) take keys sorted so that every query row attends a prefix, and one rank
per row. This adapter sorts the keys by threshold (`masks.key_order`, a permutation whose gradient
is a gather), zeroes keys that no row attends and calls the kernel with `plan.rank`. The core checks
in-graph that the mask is a chain and runs the fastest exact path that runs here where it is not
(`flashpatch.core.selection.exact_fallback`).

On a GPU the kernels are compiled by Triton; anywhere else they run in Pallas' interpreter, which
is slow and there for correctness checks (CI) only. Tiles per GPU generation: `tiling.py`; where JAX's
Pallas Triton backend runs them at all (JAX release, GPU name, compute capability, shared memory):
`gates.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flashpatch.backends import machine, masks
from flashpatch.backends.base import ChainBackend, Problem
from flashpatch.backends.masks import MaskPlan
from flashpatch.backends.pallas import gates

MAX_HEAD_DIM = 256


def compute_dtype(problem: Problem):
    """The kernels' dtype: the keys' where k and v are half (pi0-FAST keeps q in float32 beside bf16 keys).

    Promoting to float32 there would run every tile in float32: twice the shared memory and float32
    dot products, which made pi0-FAST's training step slower than openpi's own attention on the H200
    (docs/benchmarks.md, "The Pallas kernel"). Rounding q to the keys' dtype is the rounding the flash
    and cuDNN paths do.
    """
    if problem.half_kv:
        return jnp.dtype(problem.k_dtype)
    return jnp.dtype(jnp.result_type(problem.q_dtype, problem.k_dtype, problem.v_dtype))


class PallasBackend(ChainBackend):
    """Pallas flash attention (Triton on GPU, interpret mode on CPU) over the chain form of the mask."""

    name = "pallas"
    platforms = ("cpu", "gpu")
    dtypes = ("float32", "bfloat16", "float16")

    def __init__(self, config=None):
        self.config = config  # a tiling.Config; None: tiling.for_gpu(machine.gpu()) at the head dim and dtype

    def unsupported(self, problem: Problem) -> str | None:
        reason = super().unsupported(problem)
        if reason is not None:
            return reason
        if problem.head_dim > MAX_HEAD_DIM:
            return (
                f"pallas keeps a tile of rows x head_dim in shared memory and supports head_dim up to {MAX_HEAD_DIM}; "
                f"got {problem.head_dim}"
            )
        missing = gates.backend_missing()
        if missing is not None:
            return missing
        if problem.platform == "gpu":
            gpu = machine.gpu()
            if gpu is not None:  # an NVIDIA GPU under CUDA (or a simulated one); the gates need its facts
                return gates.gpu_refusal(gpu, problem.head_dim, compute_dtype(problem).name, self.config is None)
        return None

    def attend(self, q, k, v, mask, plan: MaskPlan, problem: Problem) -> jax.Array:
        from flashpatch.backends.pallas import kernel

        k_sorted, v_sorted = masks.sorted_keys(k, v, plan, masks.key_order(plan))
        dtype = compute_dtype(problem)
        out = kernel.flash_attention(
            q.astype(dtype),
            k_sorted.astype(dtype),
            v_sorted.astype(dtype),
            plan.rank,
            config=self.config,
            interpret=problem.platform != "gpu",
        )
        return out.astype(problem.out_dtype)
