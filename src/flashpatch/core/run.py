"""Run one chosen backend on one call: the exact in-graph fallback for masks a chain backend refuses, and
openpi's value in the rows that attend no key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flashpatch import diagnostics
from flashpatch.backends import masks
from flashpatch.backends.base import Backend, ChainBackend, DenseBackend, Problem
from flashpatch.core import selection


def empty_row_value(v: jax.Array, probs_dtype, num_heads: int) -> jax.Array:
    """What openpi gives a query row that attends nothing: (B, 1, N, H).

    Its softmax over S equal `big_neg` logits is uniform, 1/S, cast to the probs dtype; the row is
    then that weight times the sum of V over all S keys (padding and empty cache slots included).
    """
    s, kv_heads = v.shape[1], v.shape[2]
    weight = jnp.asarray(1.0 / s, jnp.float32).astype(probs_dtype).astype(jnp.float32)
    mean = jnp.sum(v.astype(jnp.float32), axis=1) * weight  # (B, K, H)
    mean = jnp.repeat(mean, num_heads // kv_heads, axis=1)  # (B, N, H), query head n uses kv head n // G
    return mean[:, None].astype(jnp.result_type(probs_dtype, v.dtype))


def run(q, k, v, mask, backend: Backend, problem: Problem) -> jax.Array:
    """A backend's output with openpi's value in the rows that attend no key."""
    if isinstance(backend, ChainBackend):
        plan = masks.analyze(mask)
        has_keys = plan.rank > 0
        accepted = backend.accepts(plan, problem)
        fallback_backend = selection.fallback_for(backend, problem)
        # The fallback is rematerialised: otherwise its residuals, zeros when it does not run, are
        # written by the conditional on every training step.
        fallback = jax.checkpoint(fallback_backend.attend, static_argnums=(4,))

        def fallback_and_warn() -> jax.Array:
            _warn_fallback_ran(backend, fallback_backend)
            return fallback(q, k, v, mask, problem)

        def skipped() -> jax.Array:
            return jnp.zeros(q.shape, problem.out_dtype)

        # The fallback's conditional comes first and the fast path after it, outside it: a fast path inside
        # the conditional ran slower than alone, and a conditional placed after the fast path makes the host
        # wait for all of it before it reads the predicate (benchmarks/history/training-speed.md, "How").
        fallback_out = lax.cond(accepted, skipped, fallback_and_warn)
        fast = backend.attend(*_after((q, k, v), fallback_out), mask, plan, problem)
        out = jnp.where(accepted, fast, fallback_out)
    elif isinstance(backend, DenseBackend):
        has_keys = jnp.any(mask, axis=-1)
        out = backend.attend(q, k, v, mask, problem)
    else:
        raise TypeError(f"backend {backend.name!r} is neither a DenseBackend nor a ChainBackend")
    fill = empty_row_value(v, problem.probs_dtype, problem.num_heads)
    return jnp.where(has_keys[:, :, None, None], out.astype(problem.out_dtype), fill)


@jax.custom_jvp
def _after(x, dependency):
    """x, computed only once `dependency` is: an ordering of the forward pass alone.

    Its derivative is the identity on x, so the backward pass keeps no such order (a plain
    optimization_barrier would tie the cotangents together too).
    """
    return lax.optimization_barrier((x, dependency))[0]


@_after.defjvp
def _after_jvp(primals, tangents):
    return _after(*primals), tangents[0]


def _warn_fallback_ran(backend: ChainBackend, fallback: DenseBackend) -> None:
    """Warn once, at run time, from inside the fallback branch, that a mask failed the structure check.

    The callback takes no operands, so flax's nn.scan (openpi's layer stack) accepts it although
    the branch reads the activations; and it adds no conditional of its own, which cost time per call
    (benchmarks/history/training-speed.md, "How").
    """

    def say() -> None:
        diagnostics.warn_once(
            ("structure", backend.name),
            f"a mask does not have the structure {backend.name} computes ({backend.structure}), "
            f"so the exact {fallback.name} path ran for it",
        )

    jax.debug.callback(say)
