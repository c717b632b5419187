"""Read the structure of openpi's dense attention masks, in-graph, from the mask alone.

openpi's masks are block-causal with padding: row i attends key j iff both are valid and
cumsum(ar_mask)[j] <= cumsum(ar_mask)[i]; with a KV cache, queries also see every valid cached
key. Such masks have one property that fast kernels can use: the key sets of the rows form a
chain (any two are nested). Then, with

    rank[i]      = number of keys row i attends,
    threshold[j] = smallest rank among the rows that attend key j (kv_len + 1 if none does),

row i attends key j exactly when threshold[j] <= rank[i]. Sorting keys by threshold turns every
row into a prefix of length rank[i]: a causal layout with positions that never decrease, which is
what block-skipping kernels (kvax, cuDNN) need. Any mask can be tested for this property in-graph;
where it fails, flashpatch takes a path that is exact for arbitrary masks.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MaskPlan(NamedTuple):
    """The chain form of a dense mask. All fields are arrays, so a plan can live inside jit."""

    rank: jax.Array  # (B, T) int32: keys attended by each query row
    threshold: jax.Array  # (B, S) int32: least rank that attends each key; S + 1 if none
    exact: jax.Array  # () bool: threshold <= rank reproduces the mask everywhere


def analyze(mask: jax.Array) -> MaskPlan:
    """Derive ranks and thresholds from a (B, T, S) boolean mask and check they reproduce it."""
    if mask.ndim != 3 or mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a (B, T, S) bool array; got shape {mask.shape} and dtype {mask.dtype}")
    kv_len = mask.shape[-1]
    rank = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    never = jnp.int32(kv_len + 1)
    threshold = jnp.min(jnp.where(mask, rank[:, :, None], never), axis=1)
    exact = jnp.all(rebuild(rank, threshold) == mask)
    return MaskPlan(rank=rank, threshold=threshold, exact=exact)


def rebuild(rank: jax.Array, threshold: jax.Array) -> jax.Array:
    """The dense mask that a (rank, threshold) pair stands for."""
    return threshold[:, None, :] <= rank[:, :, None]


def row_sort_key(plan: MaskPlan) -> jax.Array:
    """(B, T) int32: each query row's rank, S + 1 for rows that attend nothing (sorted last)."""
    return jnp.where(plan.rank > 0, plan.rank, plan.threshold.shape[-1] + 1).astype(jnp.int32)


def key_order(plan: MaskPlan) -> jax.Array:
    """(B, S) permutation that sorts keys by threshold, keeping ties in sequence order.

    In that order row i attends exactly the first rank[i] keys; never-attended keys come last.
    """
    return jnp.argsort(plan.threshold, axis=-1, stable=True)


def sorted_keys(k: jax.Array, v: jax.Array, plan: MaskPlan, order: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k and v (B, S, K, H) in `order` (`key_order(plan)`), with k zeroed at keys no row attends.

    Those keys sort last and may hold NaN (padding); a kernel that reads them in whole tiles and
    masks by index would still multiply them by zero weights, and 0 * NaN is NaN.
    """
    k_sorted = permute_rows(k, order)
    used = jnp.take_along_axis(plan.threshold, order, axis=1) <= k.shape[1]
    return jnp.where(used[:, :, None, None], k_sorted, jnp.zeros((), k.dtype)), permute_rows(v, order)


def inverse(order: jax.Array) -> jax.Array:
    """The permutation that undoes `order` along the last axis."""
    return jnp.argsort(order, axis=-1)


def gather_rows(x: jax.Array, order: jax.Array) -> jax.Array:
    """x (B, L, ...) with rows taken in `order` (B, L') per batch row."""
    index = order.reshape(order.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


@jax.custom_vjp
def permute_rows(x: jax.Array, order: jax.Array) -> jax.Array:
    """x (B, L, ...) with rows reordered by the permutation `order` (B, L).

    Same values as `gather_rows`, but its gradient is a gather by the inverse permutation: the
    default transpose of a gather is a scatter-add, many times slower on a GPU.
    """
    return gather_rows(x, order)


def _permute_fwd(x, order):
    return gather_rows(x, order), order


def _permute_bwd(order, cotangent):
    return gather_rows(cotangent, inverse(order)), None


permute_rows.defvjp(_permute_fwd, _permute_bwd)
