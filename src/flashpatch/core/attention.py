"""The attention core that patched modules call: checks, backend choice, openpi's edge cases.

It is told which backend to use (`backend`, 'auto' or a name) and whether to verify; it reads no switch
state. `flashpatch.attention`, the public face, resolves those from the enclosing block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from flashpatch import backends, diagnostics
from flashpatch.backends import masks
from flashpatch.backends.base import Backend, ChainBackend, DenseBackend, Problem
from flashpatch.backends.reference import reference_attention
from flashpatch.core import selection
from flashpatch.core import verify as verify_mode


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, attn_mask: jax.Array) -> None:
    """Raise a clear error naming the argument that does not fit openpi's layout."""
    for name, x in (("q", q), ("k", k), ("v", v), ("attn_mask", attn_mask)):
        if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
            raise TypeError(
                f"{name} must be a JAX or NumPy array; got {type(x).__name__} (wrap it: jnp.asarray({name}))"
            )
    if q.ndim != 4:
        raise ValueError(f"q must be (B, T, N, H); got shape {q.shape}")
    b, t, n, h = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 4 or x.shape[0] != b or x.shape[3] != h:
            raise ValueError(f"{name} must be (B, S, K, H) = ({b}, S, K, {h}) to match q {q.shape}; got {x.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {k.shape} and v {v.shape}")
    if n % k.shape[2]:
        raise ValueError(f"q's {n} heads must be a multiple of k's {k.shape[2]} heads")
    expected = (b, 1, t, k.shape[1])
    if tuple(attn_mask.shape) != expected:
        raise ValueError(
            f"attn_mask must have shape (B, 1, T, S) = {expected} for q {q.shape} and k {k.shape}; "
            f"got {tuple(attn_mask.shape)}"
        )
    if attn_mask.dtype != jnp.bool_:
        raise TypeError(f"attn_mask must be a bool array (True = may attend); got dtype {attn_mask.dtype}")


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


def _platform() -> str:
    return jax.default_backend()


def check_dtypes(q: jax.Array, k: jax.Array, v: jax.Array, probs_dtype) -> None:
    """Raise a clear error for q, k, v or probs_dtype that is not floating point (openpi's are bf16 or float32)."""
    for name, dtype in (("q", q.dtype), ("k", k.dtype), ("v", v.dtype), ("probs_dtype", probs_dtype)):
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point (bfloat16, float16 or float32); got {jnp.dtype(dtype)}")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    attn_mask: jax.Array,
    *,
    backend: str,
    verify: bool = False,
    probs_dtype=None,
    site: str = "flashpatch.attention",
    causal_runs: bool = True,
) -> jax.Array:
    """softmax(q k^T, masked) v with openpi's semantics, through `backend` ('auto' or a registered name).

    q: (B, T, N, H), already scaled by head_dim**-0.5 as openpi does; k, v: (B, S, K, H);
    attn_mask: (B, 1, T, S) bool. `probs_dtype` is the dtype openpi casts the softmax to (default:
    q's dtype). `verify` also runs openpi's attention and logs the difference (verify mode).
    `causal_runs=False` promises that no run of several rows in the mask is causal (pi0's and pi0.5's masks;
    pi0-FAST's suffix is one), which some backends use.
    Returns (B, T, N, H) in result_type(probs_dtype, v.dtype), as openpi does.
    """
    check_inputs(q, k, v, attn_mask)
    probs_dtype = jnp.dtype(probs_dtype if probs_dtype is not None else q.dtype)
    check_dtypes(q, k, v, probs_dtype)
    problem = Problem.of(q, k, v, probs_dtype, _platform(), causal_runs)
    choice = selection.choose(backend, problem)
    if choice.fallback:
        diagnostics.warn_once(("fallback", site, backend, problem), f"{site}: {choice.reason}")
    diagnostics.info_once(("backend", site, choice.backend), f"{site} -> {choice.backend} ({choice.reason})")

    mask = attn_mask[:, 0]
    if choice.backend == backends.REFERENCE:
        out = reference_attention(q, k, v, mask, probs_dtype)
    else:
        out = _run(q, k, v, mask, backends.get(choice.backend), problem)

    if verify:
        verify_mode.report(site, choice.backend, out, reference_attention(q, k, v, mask, probs_dtype))
    return out


def _run(q, k, v, mask, backend: Backend, problem: Problem) -> jax.Array:
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
