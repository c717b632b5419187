"""The two protocols an attention backend implements, and the problem it is asked to solve.

A backend is one of two kinds:

- `DenseBackend`: computes attention under any boolean (B, T, S) mask. Write `attend`.
- `ChainBackend`: computes openpi's masks, whose rows attend nested key sets ("chain form",
  `flashpatch.backends.masks`), and gets them as ranks and thresholds instead of a dense mask. Write
  `attend` and say in `accepts` which chain-form masks it computes; the core runs an exact
  `fallback` (a `DenseBackend` object of its choosing, or by default the fastest exact one that runs
  here) in-graph for any mask `accepts` refuses.

Both only compute rows that attend at least one key: the core gives rows that attend nothing
openpi's value (the mean of V) afterwards, so a backend only keeps them finite, in outputs and
gradients. Both declare what they run on (`platforms`, `dtypes`) and say in `unsupported` why a
given problem is beyond them; the conformance kit (`flashpatch.testing.conformance`) reads the same
declarations. A minimal backend:

    class Mine(DenseBackend):
        name = "mine"
        platforms = ("gpu",)
        dtypes = ("bfloat16",)

        def attend(self, q, k, v, mask, problem):
            ...  # (B, T, N, H) in problem.out_dtype

    flashpatch.backends.register("mine", Mine)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flashpatch.backends.masks import MaskPlan

#: The dtypes the fused GPU kernels (cuDNN, FlashAttention, kvax) take for k and v.
HALF_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything static about one attention call; backends decide on this alone.

    Layout follows openpi: q (B, T, N, H), already multiplied by head_dim**-0.5; k and v
    (B, S, K, H) with N a multiple of K (grouped-query attention); mask (B, T, S) bool.
    `probs_dtype` is the dtype openpi casts the softmax to (the model's activation dtype).
    `causal_runs` is False where the caller knows its masks hold no causal run of several rows
    (pi0's and pi0.5's do not; pi0-FAST's suffix is one), which a backend may use to do less.
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
    causal_runs: bool = True

    @property
    def out_dtype(self) -> str:
        return jnp.result_type(self.probs_dtype, self.v_dtype).name

    @property
    def half_kv(self) -> bool:
        """k and v share one of `HALF_DTYPES`."""
        return self.k_dtype in HALF_DTYPES and self.v_dtype == self.k_dtype

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def pairs(self) -> int:
        """(query, key) pairs over batch and heads: the size of openpi's logits."""
        return self.batch * self.num_heads * self.q_len * self.kv_len

    def abstract_inputs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        """(q, k, v, mask) of this problem's shapes and dtypes, mask (B, T, S) bool: for tracing or compiling a
        backend without data."""
        b, t, s, h = self.batch, self.q_len, self.kv_len, self.head_dim
        return (
            jax.ShapeDtypeStruct((b, t, self.num_heads, h), self.q_dtype),
            jax.ShapeDtypeStruct((b, s, self.num_kv_heads, h), self.k_dtype),
            jax.ShapeDtypeStruct((b, s, self.num_kv_heads, h), self.v_dtype),
            jax.ShapeDtypeStruct((b, t, s), jnp.bool_),
        )

    @classmethod
    def of(
        cls, q: jax.Array, k: jax.Array, v: jax.Array, probs_dtype: np.dtype, platform: str, causal_runs: bool = True
    ) -> Problem:
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
            causal_runs=causal_runs,
        )


class Backend:
    """What both kinds declare: a name, where they run, which input dtypes they take."""

    name: ClassVar[str]
    #: Platforms it can run on ('cpu', 'gpu', ...).
    platforms: ClassVar[tuple[str, ...]] = ("cpu", "gpu", "tpu")
    #: Input dtypes it accepts for q, k, v.
    dtypes: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")

    def unsupported(self, problem: Problem) -> str | None:
        """Why this backend cannot compute `problem`, in one sentence for the user, or None if it can.

        Asked at trace time, before anything runs; the caller then takes openpi's own attention
        (a backend asked for by name) or the next candidate (`auto`).
        """
        if problem.platform not in self.platforms:
            return f"{self.name} runs on {', '.join(self.platforms)}, not {problem.platform}"
        for arg in ("q", "k", "v"):
            dtype = getattr(problem, f"{arg}_dtype")
            if dtype not in self.dtypes:
                return f"{self.name} takes {', '.join(self.dtypes)} inputs; {arg} is {dtype}"
        return None


class DenseBackend(Backend):
    """A backend that computes any boolean mask exactly."""

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, problem: Problem) -> jax.Array:
        """(B, T, N, H) in `problem.out_dtype`: softmax(q k^T where mask) v for rows with a key.

        q (B, T, N, H) pre-scaled, k and v (B, S, K, H), mask (B, T, S) bool. Rows without a key
        may hold anything finite. NaN in q rows that attend nothing, or in k rows no row attends,
        must not reach any output or gradient.
        """
        raise NotImplementedError


class ChainBackend(Backend):
    """A backend for masks in chain form: row i attends key j iff threshold[j] <= rank[i].

    The core reads the plan (`flashpatch.backends.masks.analyze`) once per call and, in the graph, runs
    `fallback` wherever `accepts` says no (with one warning that names `structure`), `attend`
    otherwise. `fallback` is an object, so a backend can hold a tuned or larger variant of
    itself as well as another backend.
    """

    #: The masks it computes, in words, for the warning when one is refused.
    structure: str = "block-causal, as openpi's masks are"
    #: The exact backend that runs in-graph for a mask `accepts` refuses; None: the fastest exact one
    #: that runs the problem here (`flashpatch.core.selection.exact_fallback`), never slower than openpi's own.
    fallback: DenseBackend | None = None

    def accepts(self, plan: MaskPlan, problem: Problem) -> jax.Array:
        """() bool, in-graph: whether `attend` computes the mask `plan` was read from exactly.

        Where it is False, `attend` still runs and must return finite values (they are discarded).
        """
        return plan.exact

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, plan: MaskPlan, problem: Problem
    ) -> jax.Array:
        """As `DenseBackend.attend`, with the mask's chain form `plan` beside the dense mask."""
        raise NotImplementedError
