"""Flash attention over prefix masks in Pallas (Triton on GPU, interpret mode on CPU): forward and backward.

The mask is given in chain form (`flashpatch.backends.masks`): keys are already sorted so that query row t
attends exactly keys [0, rank[b, t]). That is all the kernels need: a per-row bound, compared
with the key index inside a tile, and per-tile bounds that decide which tiles are computed at all.

Layout. q (B, T, N, H), already scaled by head_dim**-0.5 (softmax scale 1); k, v (B, S, K, H) with
N = K * G. The G query heads that share a kv head are folded into the row dimension, q becomes
(B, K, T*G, H) (a free reshape for openpi's K = 1), so one K/V tile load serves G heads and K/V are
never repeated. Row r of the folded q is token r // G.

Passes (FlashAttention-2):
- forward, one program per q tile: online softmax over the key tiles below the tile's largest
  rank; stores the output and each row's log-sum-exp;
- delta = rowsum(dO * O), a plain jnp op;
- dK/dV, one program per key tile: loops over the q tiles that attend any of its keys (a list per
  key tile, made in the wrapper) and accumulates dV = P^T dO and dK = dS^T Q;
- dQ, one program per q tile: loops over the same key tiles as the forward, dQ = dS K.

Key tiles that every row of a q tile attends entirely take a loop without any mask arithmetic;
only the tiles that straddle some row's bound compare indices.

NaN safety. Rows with rank 0 may hold NaN in q, and keys at or past the batch row's largest rank
may hold NaN in k. Masking is by `where` (a select, never an additive -inf), so a NaN logit is
dropped rather than propagated; the two products where a zero weight would meet a NaN operand
(dK = dS^T Q and dQ = dS K) zero those q rows and k rows first. A row with no key gets output 0,
log-sum-exp 0 and zero gradients, with no exp(-inf - -inf) anywhere.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flashpatch.backends import machine
from flashpatch.backends.pallas import compat, tiling
from flashpatch.backends.pallas.tiling import Config

#: Test hook: a deliberately broken variant, read at trace time ("rank_off_by_one": rows also see
#: key rank[t]; "no_rescale": the forward does not rescale its accumulator when the row max grows).
_FAULT: str | None = None


def _visible(rank: jax.Array, start: jax.Array, block_k: int) -> jax.Array:
    """(block_q, block_k) bool: key `start + j` is below row i's rank."""
    cols = start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    if _FAULT == "rank_off_by_one":
        return cols <= rank[:, None]
    return cols < rank[:, None]


def _forward_kernel(hi_ref, lo_ref, rank_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k: int) -> None:
    """One q tile: online softmax over key tiles [0, ceil(hi / block_k)), unmasked below lo // block_k."""
    i = pl.program_id(0)
    hi = hi_ref[i]
    lo = lo_ref[i]
    rank = rank_ref[...]
    q = q_ref[...]
    block_q, head_dim = q.shape

    def step(j, carry, masked: bool):
        acc, m, total = carry
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = compat.dot(q, k, trans_b=True)
        if masked:
            s = jnp.where(_visible(rank, start, block_k), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row that has seen no key yet keeps m = -inf; shift by 0 there, so that exp gives 0, not NaN.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp(m - shift)
        p = jnp.exp(s - shift[:, None])
        total = alpha * total + jnp.sum(p, axis=1)
        pv = compat.dot(p.astype(v.dtype), v)
        acc = acc + pv if _FAULT == "no_rescale" else alpha[:, None] * acc + pv
        return acc, m_new, total

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    n_full = lax.div(lo, block_k)
    n_end = lax.div(hi + block_k - 1, block_k)
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, total = lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), carry)
    empty = total == 0.0
    total = jnp.where(empty, 1.0, total)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(total))


def _dq_kernel(
    hi_ref, lo_ref, rank_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *, block_k: int
) -> None:
    """One q tile: dQ = sum over its key tiles of dS K, dS = P * (dO V^T - delta)."""
    i = pl.program_id(0)
    hi = hi_ref[i]
    lo = lo_ref[i]
    rank = rank_ref[...]
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]

    def step(j, dq, masked: bool):
        start = j * block_k
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        p = jnp.exp(compat.dot(q, k, trans_b=True) - lse[:, None])
        if masked:
            p = jnp.where(_visible(rank, start, block_k), p, 0.0)
            # Keys that no row of this tile attends may hold NaN: 0 * NaN in dS K would spread it.
            keys = start + jnp.arange(block_k, dtype=jnp.int32)[:, None]
            k = jnp.where(keys < hi, k, jnp.zeros((), k.dtype))
        ds = p * (compat.dot(do, v, trans_b=True) - delta[:, None])
        return dq + compat.dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, jnp.float32)
    n_full = lax.div(lo, block_k)
    n_end = lax.div(hi + block_k - 1, block_k)
    dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(
    order_ref,
    n_full_ref,
    n_all_ref,
    rank_ref,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    k_ref,
    v_ref,
    dk_ref,
    dv_ref,
    *,
    block_q: int,
) -> None:
    """One key tile: dV = sum P^T dO and dK = sum dS^T Q over the q tiles listed for it.

    order_ref lists q tiles: first the n_full that attend all of this tile's keys in every row,
    then those that attend some (n_all in total). Tiles that attend none are never visited.
    """
    j = pl.program_id(0)
    k = k_ref[...]
    v = v_ref[...]
    block_k = k.shape[0]
    start_k = j * block_k

    def step(idx, carry, masked: bool):
        dk, dv = carry
        rows = pl.ds(order_ref[idx] * block_q, block_q)
        q = q_ref[rows, :]
        do = do_ref[rows, :]
        lse = lse_ref[rows]
        delta = delta_ref[rows]
        p = jnp.exp(compat.dot(q, k, trans_b=True) - lse[:, None])
        if masked:
            rank = rank_ref[rows]
            p = jnp.where(_visible(rank, start_k, block_k), p, 0.0)
            # Rows with no key may hold NaN in q: 0 * NaN in dS^T Q would spread it.
            q = jnp.where(rank[:, None] > 0, q, jnp.zeros((), q.dtype))
        dv = dv + compat.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (compat.dot(do, v, trans_b=True) - delta[:, None])
        dk = dk + compat.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    n_full = n_full_ref[j]
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    dk, dv = lax.fori_loop(n_full, n_all_ref[j], functools.partial(step, masked=True), carry)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --- per-tile schedules (cheap jnp on (B, rows) int32, in the wrapper) ---


def _row_tile_bounds(rank: jax.Array, block_q: int) -> tuple[jax.Array, jax.Array]:
    """(B, n_q) int32 each: the largest and the smallest rank in every q tile."""
    tiles = rank.reshape(rank.shape[0], -1, block_q)
    return jnp.max(tiles, axis=-1), jnp.min(tiles, axis=-1)


def _key_tile_schedule(rank: jax.Array, block_q: int, block_k: int, kv_len: int):
    """For each key tile, the q tiles to visit: (B, n_k, n_q) order, (B, n_k) n_full and n_all.

    A q tile attends all of key tile [start, end) in every row when its smallest rank >= end
    (no mask needed), and some of it when its largest rank > start; it is skipped otherwise.
    """
    hi, lo = _row_tile_bounds(rank, block_q)
    start = jnp.arange(kv_len // block_k, dtype=jnp.int32)[None, :, None] * block_k
    full = lo[:, None, :] >= start + block_k
    some = hi[:, None, :] > start
    kind = jnp.where(full, 0, jnp.where(some, 1, 2))
    order = jnp.argsort(kind, axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.sum(full, axis=-1, dtype=jnp.int32), jnp.sum(some, axis=-1, dtype=jnp.int32)


# --- the three pallas_calls, on folded and padded arrays: q (B, K, R, H), k/v (B, K, S, H), rank (B, R) ---


def _spec(shape, index_map):
    return compat.block_spec(shape, index_map)


class _QTileSpecs(NamedTuple):
    """The blocks of the kernels with one program per q tile (forward, dQ), grid (n_q, B, K)."""

    per_tile: pl.BlockSpec  # (B, n_q) per-tile bounds: the batch row's whole list
    rank: pl.BlockSpec  # (B, R) ranks: the tile's rows
    rows: pl.BlockSpec  # (B, K, R, H): the tile's rows
    row_stat: pl.BlockSpec  # (B, K, R) float32 per row: the tile's rows
    keys: pl.BlockSpec  # (B, K, S, H): every key of the batch row and head


def _q_tile_specs(block_q: int, n_q: int, head_dim: int, kv_len: int) -> _QTileSpecs:
    return _QTileSpecs(
        per_tile=_spec((None, n_q), lambda i, bi, hk: (bi, 0)),
        rank=_spec((None, block_q), lambda i, bi, hk: (bi, i)),
        rows=_spec((None, None, block_q, head_dim), lambda i, bi, hk: (bi, hk, i, 0)),
        row_stat=_spec((None, None, block_q), lambda i, bi, hk: (bi, hk, i)),
        keys=_spec((None, None, kv_len, head_dim), lambda i, bi, hk: (bi, hk, 0, 0)),
    )


def _forward(q, k, v, rank, config: Config, interpret: bool):
    b, kh, rows, h = q.shape
    tile = config.forward
    n_q = rows // tile.block_q
    hi, lo = _row_tile_bounds(rank, tile.block_q)
    spec = _q_tile_specs(tile.block_q, n_q, h, k.shape[2])
    return pl.pallas_call(
        functools.partial(_forward_kernel, block_k=tile.block_k),
        grid=(n_q, b, kh),
        in_specs=[spec.per_tile, spec.per_tile, spec.rank, spec.rows, spec.keys, spec.keys],
        out_specs=[spec.rows, spec.row_stat],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, kh, rows), jnp.float32)],
        compiler_params=compat.compiler_params(tile.num_warps, tile.num_stages),
        interpret=interpret,
        name="flashpatch_attention_fwd",
    )(hi, lo, rank, q, k, v)


def _dq(q, k, v, rank, do, lse, delta, config: Config, interpret: bool):
    b, kh, rows, h = q.shape
    tile = config.dq
    n_q = rows // tile.block_q
    hi, lo = _row_tile_bounds(rank, tile.block_q)
    spec = _q_tile_specs(tile.block_q, n_q, h, k.shape[2])
    return pl.pallas_call(
        functools.partial(_dq_kernel, block_k=tile.block_k),
        grid=(n_q, b, kh),
        in_specs=[
            spec.per_tile,
            spec.per_tile,
            spec.rank,
            spec.rows,
            spec.rows,
            spec.row_stat,
            spec.row_stat,
            spec.keys,
            spec.keys,
        ],
        out_specs=spec.rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compat.compiler_params(tile.num_warps, tile.num_stages),
        interpret=interpret,
        name="flashpatch_attention_dq",
    )(hi, lo, rank, q, do, lse, delta, k, v)


def _dkv(q, k, v, rank, do, lse, delta, config: Config, interpret: bool):
    b, kh, rows, h = q.shape
    kv_len = k.shape[2]
    tile = config.dkv
    n_q, n_k = rows // tile.block_q, kv_len // tile.block_k
    order, n_full, n_all = _key_tile_schedule(rank, tile.block_q, tile.block_k, kv_len)
    per_tile = _spec((None, n_k), lambda j, bi, hk: (bi, 0))
    all_rows = _spec((None, None, rows, h), lambda j, bi, hk: (bi, hk, 0, 0))
    row_stat = _spec((None, None, rows), lambda j, bi, hk: (bi, hk, 0))
    key_tile = _spec((None, None, tile.block_k, h), lambda j, bi, hk: (bi, hk, j, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=tile.block_q),
        grid=(n_k, b, kh),
        in_specs=[
            _spec((None, None, n_q), lambda j, bi, hk: (bi, j, 0)),
            per_tile,
            per_tile,
            _spec((None, rows), lambda j, bi, hk: (bi, 0)),
            all_rows,
            all_rows,
            row_stat,
            row_stat,
            key_tile,
            key_tile,
        ],
        out_specs=[key_tile, key_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=compat.compiler_params(tile.num_warps, tile.num_stages),
        interpret=interpret,
        name="flashpatch_attention_dkv",
    )(order, n_full, n_all, rank, q, do, lse, delta, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, rank, config: Config, interpret: bool):
    return _forward(q, k, v, rank, config, interpret)[0]


def _attention_fwd(q, k, v, rank, config: Config, interpret: bool):
    out, lse = _forward(q, k, v, rank, config, interpret)
    return out, (q, k, v, rank, out, lse)


def _attention_bwd(config: Config, interpret: bool, residuals, d_out):
    q, k, v, rank, out, lse = residuals
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dq = _dq(q, k, v, rank, d_out, lse, delta, config, interpret)
    dk, dv = _dkv(q, k, v, rank, d_out, lse, delta, config, interpret)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# --- the public wrapper: openpi's layout in and out ---


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """x zero-padded at the end of `axis` to `size` (no op when it already has that size)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def fold_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """(B, T, N, H) -> (B, K, T*G, H): row t*G + g is query head k*G + g of token t."""
    b, t, n, h = q.shape
    g = n // num_kv_heads
    return q.reshape(b, t, num_kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, t * g, h)


def unfold_queries(x: jax.Array, q_len: int) -> jax.Array:
    """The inverse of `fold_queries`: (B, K, T*G, H) -> (B, T, N, H)."""
    b, kh, rows, h = x.shape
    g = rows // q_len
    return x.reshape(b, kh, q_len, g, h).transpose(0, 2, 1, 3, 4).reshape(b, q_len, kh * g, h)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rank: jax.Array,
    *,
    config: Config | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """softmax(q k^T) v where query row t attends keys [0, rank[b, t]) only; (B, T, N, H) in q's dtype.

    q (B, T, N, H), pre-scaled; k, v (B, S, K, H), N a multiple of K, cast to q's dtype; rank (B, T)
    int, clipped to [0, S]. Rows with rank 0 come out 0 (finite) with zero gradients. Differentiable
    in q, k, v. `config`: tiles (default: `tiling.for_gpu(machine.gpu())`); `interpret`: run the
    kernels in Pallas' interpreter (default: on anything but a GPU).
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"need q (B, T, N, H) and k, v (B, S, K, H); got {q.shape}, {k.shape}, {v.shape}")
    b, t, n, h = q.shape
    kv_len, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"q's {n} heads must be a multiple of k's {kh} heads")
    if rank.shape != (b, t):
        raise ValueError(f"rank must be (B, T) = {(b, t)}; got {rank.shape}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if config is None:
        config = tiling.INTERPRET if interpret else tiling.for_gpu(machine.gpu(), h, q.dtype)
        if config is None:
            raise ValueError(
                f"no tiling of the pallas kernels fits this GPU's shared memory at head_dim {h} in {q.dtype}: "
                "use another backend (flashpatch.backends.pallas.gates.gpu_refusal says why)"
            )
    g = n // kh
    head_dim = tiling.padded_head_dim(h)
    rows = _round_up(t * g, config.row_multiple)
    keys = _round_up(kv_len, config.key_multiple)

    qf = _pad_axis(_pad_axis(fold_queries(q, kh), 2, rows), 3, head_dim)
    kf, vf = (_pad_axis(_pad_axis(x.astype(q.dtype).transpose(0, 2, 1, 3), 2, keys), 3, head_dim) for x in (k, v))
    rank = jnp.clip(rank.astype(jnp.int32), 0, kv_len)
    rank_rows = _pad_axis(jnp.repeat(rank, g, axis=1), 1, rows)  # padded rows: rank 0

    out = _attention(qf, kf, vf, rank_rows, config, bool(interpret))
    return unfold_queries(out[:, :, : t * g, :h], t)
