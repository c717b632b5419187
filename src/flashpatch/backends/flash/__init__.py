"""FlashAttention's own kernels on openpi's masks: FA3 on Hopper, FA2 elsewhere.

The kernels take packed variable-length sequences but no mask. `segments` turns openpi's masks
into such calls with no dense mask and no permuted queries; its docstring gives the decomposition
and why. Two libraries provide the kernel (`providers`): dew-flash-attn on JAX >= 0.11.2 and
flash-attn-jax on JAX 0.6 to 0.8, each admitted on a GPU by the checks its own build holds
(`builds`). The core reads each call's mask once and, where it is not one this packing computes
exactly (not in chain form, more runs than the slots), runs the fastest exact path that runs here
instead, in the graph (`flashpatch.core.selection.exact_fallback`): cuDNN's dense path on Hopper,
else openpi's own attention.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from flashpatch.backends import machine, masks
from flashpatch.backends.base import HALF_DTYPES, ChainBackend, Problem
from flashpatch.backends.flash import kernel, providers, segments
from flashpatch.backends.masks import MaskPlan


class FlashBackend(ChainBackend):
    """openpi's masks as one or two varlen FlashAttention calls per attention call."""

    name = "flash"
    platforms = ("gpu",)
    #: q may be float32 (pi0-FAST keeps it so) and is cast to k's dtype; k and v must be half.
    dtypes = ("float32", "bfloat16", "float16")

    def __init__(
        self,
        constant_slots: int = segments.CONSTANT_SLOTS,
        causal_slots: int = segments.CAUSAL_SLOTS,
        *,
        varlen: segments.VarlenKernel | None = None,
    ):
        if constant_slots < 1 or causal_slots < 1:
            raise ValueError(f"slots must be positive; got {constant_slots} and {causal_slots}")
        self.constant_slots = constant_slots
        self.causal_slots = causal_slots
        #: The kernel; None: the provider that serves the GPU (`providers.choose`). Tests on CPU pass
        #: `segments.reference_varlen`.
        self.varlen: Callable | None = varlen
        self.structure = (
            f"block-causal, as openpi's masks are, with at most {constant_slots} runs of equal rank and "
            f"{causal_slots} causal run(s) per batch row"
        )

    def unsupported(self, problem: Problem) -> str | None:
        reason = super().unsupported(problem)
        if reason is not None:
            return reason
        if not problem.half_kv:
            return f"flash needs k and v in one of {HALF_DTYPES}; got {problem.k_dtype} and {problem.v_dtype}"
        if problem.head_dim > kernel.MAX_HEAD_DIM:
            return f"FlashAttention takes head dims up to {kernel.MAX_HEAD_DIM}; got {problem.head_dim}"
        if self.varlen is not None:
            return None  # a kernel of the caller's own (tests)
        choice = providers.choose(machine.gpu(), problem.head_dim)
        return None if choice.provider is not None else choice.reason

    def accepts(self, plan: MaskPlan, problem: Problem) -> jax.Array:
        p = self._plan(plan)
        # Without the causal call (the caller promised no causal runs), a causal run is refused.
        return p.exact if problem.causal_runs else p.exact & ~p.has_causal

    def _plan(self, plan: MaskPlan) -> segments.Plan:
        return segments.plan(plan, self.constant_slots, self.causal_slots)

    def attend(self, q, k, v, mask, plan: MaskPlan, problem: Problem) -> jax.Array:
        p = self._plan(plan)
        out = segments.attend(
            q.astype(k.dtype),
            *masks.sorted_keys(k, v, plan, p.k_order),
            p,
            plan.rank,
            self.varlen or providers.choose(machine.gpu(), problem.head_dim).varlen,
            self.constant_slots,
            self.causal_slots,
            with_causal=problem.causal_runs,
        )
        return out.astype(problem.out_dtype)
