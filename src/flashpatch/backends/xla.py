"""Memory-efficient attention in plain JAX: online softmax over key blocks, forward and backward.

Runs wherever JAX runs (CPU included) and computes any dense mask exactly. Nothing of size
T x S is kept between forward and backward: the residuals are q, k, v, the mask (an input that
is alive anyway), the output and one log-sum-exp per row; the backward recomputes each block's
probabilities. Temporaries are (B, N, T, block) per step, so memory grows linearly in T for a
fixed block size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from flashpatch.backends.base import DenseBackend, Problem

DEFAULT_BLOCK = 512


def _key_block(x: jax.Array, mask: jax.Array, index: jax.Array, block: int, kv_len: int):
    """Keys [start, start+block) and the mask columns for them, for block `index`.

    The last block is shifted left to stay in bounds instead of padding (no copy of the mask);
    its columns that the previous block already covered are masked out.
    """
    start = jnp.minimum(index * block, kv_len - block)
    fresh = start + jnp.arange(block) >= index * block
    cols = lax.dynamic_slice_in_dim(mask, start, block, axis=2) & fresh
    return start, lax.dynamic_slice_in_dim(x, start, block, axis=1), cols


def _forward(q5, k, v, mask, block, probs_dtype):
    b, t, kh, g, h = q5.shape
    kv_len = k.shape[1]
    n_blocks = -(-kv_len // block)

    def step(carry, index):
        m, total, acc = carry
        start, kb, cols = _key_block(k, mask, index, block, kv_len)
        vb = lax.dynamic_slice_in_dim(v, start, block, axis=1)
        s = jnp.einsum("BTKGH,BSKH->BKGTS", q5, kb, preferred_element_type=jnp.float32)
        s = jnp.where(cols[:, None, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        shift = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - shift[..., None])
        alpha = jnp.exp(m - shift)
        total = total * alpha + jnp.sum(p, axis=-1)
        pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(probs_dtype), vb, preferred_element_type=jnp.float32)
        return (m_new, total, acc * alpha[..., None] + pv), None

    init = (
        jnp.full((b, kh, g, t), -jnp.inf, jnp.float32),
        jnp.zeros((b, kh, g, t), jnp.float32),
        jnp.zeros((b, kh, g, t, h), jnp.float32),
    )
    (m, total, acc), _ = lax.scan(step, init, jnp.arange(n_blocks))
    has_keys = total > 0
    safe = jnp.where(has_keys, total, 1.0)
    out = acc / safe[..., None]
    lse = jnp.where(has_keys, m + jnp.log(safe), jnp.inf)  # +inf: p = 0 in backward
    return out, lse


def _backward(q5, k, v, mask, out, lse, dout, block, probs_dtype):
    kv_len = k.shape[1]
    n_blocks = -(-kv_len // block)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, T, K, G)
    delta = jnp.moveaxis(delta, 1, -1)  # (B, K, G, T)
    mm_dtype = q5.dtype

    def step(carry, index):
        dq, dk, dv = carry
        start, kb, cols = _key_block(k, mask, index, block, kv_len)
        vb = lax.dynamic_slice_in_dim(v, start, block, axis=1)
        s = jnp.einsum("BTKGH,BSKH->BKGTS", q5, kb, preferred_element_type=jnp.float32)
        p = jnp.where(cols[:, None, None], jnp.exp(s - lse[..., None]), 0.0)
        dv_b = jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(probs_dtype), dout, preferred_element_type=jnp.float32)
        dp = jnp.einsum("BTKGH,BSKH->BKGTS", dout, vb, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None])).astype(mm_dtype)
        dq = dq + jnp.einsum("BKGTS,BSKH->BTKGH", ds, kb, preferred_element_type=jnp.float32)
        dk_b = jnp.einsum("BKGTS,BTKGH->BSKH", ds, q5, preferred_element_type=jnp.float32)
        dk = lax.dynamic_update_slice_in_dim(dk, lax.dynamic_slice_in_dim(dk, start, block, 1) + dk_b, start, 1)
        dv = lax.dynamic_update_slice_in_dim(dv, lax.dynamic_slice_in_dim(dv, start, block, 1) + dv_b, start, 1)
        return (dq, dk, dv), None

    init = (
        jnp.zeros(q5.shape, jnp.float32),
        jnp.zeros(k.shape, jnp.float32),
        jnp.zeros(v.shape, jnp.float32),
    )
    (dq, dk, dv), _ = lax.scan(step, init, jnp.arange(n_blocks))
    return dq.astype(q5.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q5, k, v, mask, block, probs_dtype):
    out, _ = _forward(q5, k, v, mask, block, probs_dtype)
    return out


def _blockwise_fwd(q5, k, v, mask, block, probs_dtype):
    out, lse = _forward(q5, k, v, mask, block, probs_dtype)
    out_t = jnp.moveaxis(out, 3, 1)  # (B, T, K, G, H), the layout dout arrives in
    return out, (q5, k, v, mask, out_t, lse)


def _blockwise_bwd(block, probs_dtype, residuals, dout):
    q5, k, v, mask, out_t, lse = residuals
    dout_t = jnp.moveaxis(dout, 3, 1).astype(q5.dtype)
    dq, dk, dv = _backward(q5, k, v, mask, out_t, lse, dout_t, block, probs_dtype)
    return dq, dk, dv, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def flash_attention_xla(q, k, v, mask, probs_dtype, block: int = DEFAULT_BLOCK) -> jax.Array:
    """(B, T, N, H) attention over a (B, T, S) bool mask; rows with no key come out as 0."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    out_dtype = jnp.result_type(probs_dtype, v.dtype)
    if k.shape[1] == 0:  # no keys: every row attends nothing (openpi's einsum gives zeros)
        return jnp.zeros((b, t, n, h), out_dtype)
    block = min(block, k.shape[1])
    q5 = q.reshape(b, t, kv_heads, n // kv_heads, h)
    out = _blockwise(q5, k, v, mask, block, jnp.dtype(probs_dtype))  # (B, K, G, T, H) float32
    return jnp.moveaxis(out, 3, 1).reshape(b, t, n, h).astype(out_dtype)


class XlaBackend(DenseBackend):
    name = "xla"

    def __init__(self, block: int = DEFAULT_BLOCK):
        self.block = block

    def attend(self, q, k, v, mask, problem: Problem):
        return flash_attention_xla(q, k, v, mask, problem.probs_dtype, self.block)
