"""openpi's training masks through cuDNN without a dense mask: one shared block, one short tail.

A dense (B, T, S) mask costs cuDNN most of its speed, while sequence lengths cost it nothing
(benchmarks/history/training-speed.md, "Speed"). In chain form (`flashpatch.backends.masks`) with keys
sorted by threshold, row i of an openpi mask attends the first rank[i] keys, and the rows with the smallest
positive rank are one large group: pi0's and pi0.5's prefix (images and prompt), pi0-FAST's bidirectional
prefix. So, per batch row:

- head: the rows of least rank, moved to the front (a stable sort of rows by rank), attend the
  first `head_keys` sorted keys: exactly cuDNN's padding mask, given as sequence lengths;
- tail: the remaining rows that attend keys (pi0's state and action tokens, at most
  `TAIL_ROWS`) are gathered into a (B, TAIL_ROWS) slab and computed with their own mask rows,
  densely, on (B, N, TAIL_ROWS, S) logits;
- rows that attend nothing are left to the caller (openpi's mean of V).

A mask whose tail is longer than `TAIL_ROWS` in some batch row (a long causal suffix) takes the
`cudnn` backend's exact dense path instead, chosen in-graph by the core, with one warning.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from flashpatch.backends import cudnn, masks
from flashpatch.backends.base import ChainBackend, Problem
from flashpatch.backends.masks import MaskPlan
from flashpatch.backends.reference import reference_attention

#: Rows after the shared block that one call takes. openpi's suffixes: pi0 51 (state + 50 actions),
#: pi0.5 up to 50; more rows fall back to the dense path.
TAIL_ROWS = 64


class Split(NamedTuple):
    """Where the head and the tail of each batch row lie once rows and keys are sorted."""

    q_order: jax.Array  # (B, T): head rows, then tail rows by rank, then rows with no key
    k_order: jax.Array  # (B, S): keys sorted by threshold; the head attends the first head_keys
    head_rows: jax.Array  # (B,) int32
    head_keys: jax.Array  # (B,) int32
    tail_rows: jax.Array  # (B,) int32
    keys_used: jax.Array  # (B, S) bool: keys that some row attends
    tail_max: int  # static: rows of the tail slab


def _row_counts(plan: MaskPlan) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per batch row: the sort key of the query rows, the least positive rank, and the head's and tail's row counts."""
    attends = plan.rank > 0
    order_key = masks.row_sort_key(plan)
    least = jnp.min(order_key, axis=-1)
    head_rows = jnp.sum(attends & (plan.rank == least[:, None]), axis=-1, dtype=jnp.int32)
    tail_rows = jnp.sum(attends, axis=-1, dtype=jnp.int32) - head_rows
    return order_key, least, head_rows, tail_rows


def tail_fits(plan: MaskPlan, tail_max: int) -> jax.Array:
    """() bool: every batch row's tail has at most `tail_max` rows (no sorting needed to tell)."""
    return jnp.all(_row_counts(plan)[3] <= tail_max)


def split(plan: MaskPlan, tail_max: int = TAIL_ROWS) -> Split:
    """The head/tail split of a mask in chain form (`plan.exact` and `tail_fits` are the caller's to check)."""
    order_key, least, head_rows, tail_rows = _row_counts(plan)
    return Split(
        q_order=jnp.argsort(order_key, axis=-1, stable=True),
        k_order=masks.key_order(plan),
        head_rows=head_rows,
        head_keys=jnp.where(head_rows > 0, least, 0).astype(jnp.int32),
        tail_rows=tail_rows,
        keys_used=plan.threshold <= plan.threshold.shape[-1],
        tail_max=tail_max,
    )


def _below(lengths: jax.Array, size: int, ndim: int) -> jax.Array:
    """(B, size, 1, ...) bool: row index < lengths[b], shaped to broadcast over an ndim-array."""
    keep = jnp.arange(size)[None, :] < lengths[:, None]
    return keep.reshape(keep.shape + (1,) * (ndim - 2))


def _zero_from(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """x (B, L, ...) with rows at and after lengths[b] zeroed (so NaN there cannot reach cuDNN)."""
    return jnp.where(_below(lengths, x.shape[1], x.ndim), x, jnp.zeros((), x.dtype))


def head_attention(q_sorted, k_sorted, v_sorted, parts: Split, implementation: str) -> jax.Array:
    """(B, T, N, H) in sorted row order; rows [0, head_rows) are the head's, the rest are unused."""
    q_h = _zero_from(q_sorted, parts.head_rows).astype(k_sorted.dtype)
    k_h = _zero_from(k_sorted, parts.head_keys)
    v_h = _zero_from(v_sorted, parts.head_keys)
    out = jax.nn.dot_product_attention(
        *(cudnn.even_rows(x) for x in (q_h, k_h, v_h)),
        scale=1.0,
        query_seq_lengths=jnp.maximum(parts.head_rows, 1),
        key_value_seq_lengths=jnp.maximum(parts.head_keys, 1),
        implementation=implementation,
    )
    return out[:, : q_sorted.shape[1]]


def tail_window(parts: Split) -> tuple[jax.Array, jax.Array]:
    """Where each batch row's tail slab starts in sorted row order, and which of its rows are tail rows.

    The slab is `tail_max` rows from the first tail row, moved left where it would pass the end
    (then its first rows are head rows, and are not tail rows).
    """
    t = parts.q_order.shape[1]
    start = jnp.minimum(parts.head_rows, t - parts.tail_max)
    pos = start[:, None] + jnp.arange(parts.tail_max)[None, :]
    real = (pos >= parts.head_rows[:, None]) & (pos < (parts.head_rows + parts.tail_rows)[:, None])
    return start, real


def _rows_at(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """Per batch row b, x[b, start[b] : start[b] + size]."""
    return jax.vmap(lambda xb, s: lax.dynamic_slice_in_dim(xb, s, size, axis=0))(x, start)


def _put_rows(x: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """Per batch row b, x[b, start[b] : start[b] + len(rows[b])] = rows[b]."""
    return jax.vmap(lambda xb, rb, s: lax.dynamic_update_slice_in_dim(xb, rb, s, axis=0))(x, rows, start)


def tail_attention(q_tail, k, v, mask_tail, keys_used, problem: Problem) -> jax.Array:
    """(B, tail_max, N, H) for the tail slab's rows, each with its own mask row (original key order).

    openpi's own math on the slab. Keys no row attends are zeroed: NaN there would otherwise reach
    dq through 0 * NaN.
    """
    k = jnp.where(keys_used[:, :, None, None], k, jnp.zeros((), k.dtype))
    return reference_attention(q_tail, k, v, mask_tail, problem.probs_dtype)


def split_attention(q, k, v, mask, parts: Split, problem: Problem, *, implementation: str) -> jax.Array:
    """Head through cuDNN's sequence lengths, tail dense; rows with no key come out unspecified (finite).

    Rows are moved with permutations (gathers both ways) and the tail with dynamic slices, so the
    backward pass has no scatter-add over (B, T, N, H).
    """
    q_sorted = masks.permute_rows(q, parts.q_order)
    head = head_attention(
        q_sorted, masks.permute_rows(k, parts.k_order), masks.permute_rows(v, parts.k_order), parts, implementation
    )

    start, real = tail_window(parts)
    q_tail = _rows_at(q_sorted, start, parts.tail_max)
    tail_order = _rows_at(parts.q_order, start, parts.tail_max)  # original row of each slab row
    mask_tail = jnp.take_along_axis(mask, tail_order[:, :, None], axis=1) & real[:, :, None]
    tail = tail_attention(q_tail, k, v, mask_tail, parts.keys_used, problem)

    head = head.astype(problem.out_dtype)
    slab = jnp.where(real[:, :, None, None], tail.astype(problem.out_dtype), _rows_at(head, start, parts.tail_max))
    out_sorted = _put_rows(head, slab, start)
    return masks.permute_rows(out_sorted, masks.inverse(parts.q_order))


class CudnnSplitBackend(ChainBackend):
    """cuDNN with sequence lengths for openpi's shared block and a dense slab for the short tail."""

    name = "cudnn_split"
    platforms = ("gpu",)
    dtypes = ("float32", "bfloat16", "float16")

    def __init__(self, tail_max: int = TAIL_ROWS, *, implementation: str = "cudnn"):
        if tail_max < 1:
            raise ValueError(f"tail_max must be a positive number of rows; got {tail_max}")
        self.tail_max = tail_max
        self.implementation = implementation
        self.structure = f"block-causal, as openpi's masks are, with at most {tail_max} rows outside the largest block"
        # Its checks trace both of cuDNN's ways in (sequence lengths and dense mask), as this backend uses.
        self._cudnn = cudnn.CudnnBackend(use_seq_lengths=True, implementation=implementation)
        self.fallback = cudnn.CudnnBackend(use_seq_lengths=False, implementation=implementation)

    def unsupported(self, problem: Problem) -> str | None:
        return super().unsupported(problem) or self._cudnn.unsupported(problem)

    def accepts(self, plan: MaskPlan, problem: Problem) -> jax.Array:
        return plan.exact & tail_fits(plan, min(self.tail_max, problem.q_len))

    def attend(self, q, k, v, mask, plan: MaskPlan, problem: Problem):
        parts = split(plan, min(self.tail_max, problem.q_len))
        return split_attention(q, k, v, mask, parts, problem, implementation=self.implementation)
