"""The attention core that patched modules call: checks, backend choice, openpi's edge cases.

It is told which backend to use (`backend`, 'auto' or a name) and whether to verify; it reads no switch
state. `flashpatch.attention`, the public face, resolves those from the enclosing block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flashpatch import backends, diagnostics
from flashpatch.backends.base import Problem
from flashpatch.backends.reference import reference_attention
from flashpatch.core import guard, run, selection
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
    choice = selection.choose(backend, problem, guard.failure)
    runs_instead = "openpi's own attention" if choice.backend == backends.REFERENCE else choice.backend
    for failed, error in choice.failed:
        diagnostics.warn_once(
            ("compile", failed, problem),
            f"{failed} failed to compile for a call of {site} (B={problem.batch}, T={problem.q_len}, "
            f"S={problem.kv_len}, {problem.q_dtype}) on {guard.describe_machine()}: {error}. {runs_instead} runs "
            "there instead, so training goes on. Please report it to flashpatch with this message and the output "
            f"of `python -m flashpatch doctor`; {guard.ENV}=0 skips this check.",
        )
    if choice.fallback and not choice.failed:
        diagnostics.warn_once(("fallback", site, backend, problem), f"{site}: {choice.reason}")
    diagnostics.info_once(("backend", site, choice.backend), f"{site} -> {choice.backend} ({choice.reason})")

    mask = attn_mask[:, 0]
    if choice.backend == backends.REFERENCE:
        out = reference_attention(q, k, v, mask, probs_dtype)
    else:
        out = run.run(q, k, v, mask, backends.get(choice.backend), problem)

    if verify:
        verify_mode.report(site, choice.backend, out, reference_attention(q, k, v, mask, probs_dtype))
    return out
