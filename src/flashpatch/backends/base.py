"""The one interface every attention backend implements, and the problem it is asked to solve."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flashpatch.masks import MaskPlan


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything static about one attention call; backends decide on this alone.

    Layout follows openpi: q (B, T, N, H), already multiplied by head_dim**-0.5; k and v
    (B, S, K, H) with N a multiple of K (grouped-query attention); mask (B, T, S) bool.
    `probs_dtype` is the dtype openpi casts the softmax to (the model's activation dtype).
    """

    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_dtype: str
    k_dtype: str
    v_dtype: str
    probs_dtype: str
    platform: str

    @property
    def out_dtype(self) -> str:
        return jnp.result_type(self.probs_dtype, self.v_dtype).name

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, q: jax.Array, k: jax.Array, v: jax.Array, probs_dtype: np.dtype, platform: str) -> Problem:
        b, t, n, h = q.shape
        return cls(
            batch=b,
            q_len=t,
            kv_len=k.shape[1],
            num_heads=n,
            num_kv_heads=k.shape[2],
            head_dim=h,
            q_dtype=jnp.dtype(q.dtype).name,
            k_dtype=jnp.dtype(k.dtype).name,
            v_dtype=jnp.dtype(v.dtype).name,
            probs_dtype=jnp.dtype(probs_dtype).name,
            platform=platform,
        )


class Backend:
    """An attention core: softmax(q k^T masked) v, openpi's semantics, rows with keys only.

    Rows that attend no key are overwritten by the caller (openpi gives them the mean of V), so a
    backend only has to keep them finite, in outputs and gradients.

    Class attributes declare what the backend supports; the conformance suite reads them.
    """

    name: ClassVar[str]
    #: Computes any boolean mask exactly. False: needs the chain structure of `flashpatch.masks`
    #: and gets a `MaskPlan`; the caller checks the plan in-graph and falls back where it fails.
    any_mask: ClassVar[bool] = True
    #: Platforms it can run on ('cpu', 'gpu', ...).
    platforms: ClassVar[tuple[str, ...]] = ("cpu", "gpu", "tpu")
    #: Input dtypes it accepts for q, k, v.
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")
    #: For any_mask=False: the masks it computes, in words (for the fallback warning), and the
    #: backend (any_mask=True, exact) that runs in-graph for a mask it does not accept. `xla` is
    #: blockwise, so the fallback costs no T x S memory.
    structure: ClassVar[str] = "block-causal, as openpi's masks are"
    fallback: ClassVar[str] = "xla"
    #: Gives rows that attend no key openpi's value itself (only the original computation does); False:
    #: the caller overwrites those rows.
    fills_empty_rows: ClassVar[bool] = False

    def unsupported(self, problem: Problem) -> str | None:
        """Why this backend cannot compute `problem` exactly, or None if it can."""
        if problem.platform not in self.platforms:
            return f"{self.name} runs on {', '.join(self.platforms)}, not {problem.platform}"
        for arg in ("q", "k", "v"):
            dtype = getattr(problem, f"{arg}_dtype")
            if dtype not in self.dtypes:
                return f"{self.name} takes {', '.join(self.dtypes)} inputs; {arg} is {dtype}"
        return None

    def accepts(self, plan: MaskPlan, problem: Problem) -> jax.Array:
        """() bool, in-graph: whether `attend` computes the mask `plan` was read from exactly.

        Only asked of any_mask=False backends. Where it is False, `attend` must still return
        finite values (they are discarded for the fallback's).
        """
        return plan.exact

    def attend_fallback(self, q, k, v, mask, problem: Problem) -> jax.Array:
        """What runs for a mask `accepts` refuses: the `fallback` backend, exact for any mask."""
        from flashpatch import backends  # the registry imports this module

        return backends.get(self.fallback).attend(q, k, v, mask, None, problem)

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array,
        plan: MaskPlan | None,
        problem: Problem,
    ) -> jax.Array:
        """(B, T, N, H) output in `problem.out_dtype`."""
        raise NotImplementedError
