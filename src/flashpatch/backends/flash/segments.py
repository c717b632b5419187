"""openpi's masks as variable-length calls of a flash kernel: no dense mask, no permuted queries.

In chain form (`flashpatch.backends.masks`), with keys sorted by threshold, row t of batch row b attends the
first rank[b, t] sorted keys. Read in the original row order, openpi's masks are a few *runs*:

- a run of equal rank (pi0's prefix pieces between padding, its state token, its action block;
  pi0-FAST's prefix): every row of it attends the same key prefix, a non-causal segment;
- a run of single rows whose rank grows by one a row (pi0-FAST's causal suffix): a causal segment
  whose mask, aligned to the last key as FlashAttention aligns it, is exactly that staircase;
- rows of rank 0 (padding, a missing camera): they attend nothing; openpi's value is the caller's.

A varlen kernel takes packed queries `(B*T, N, H)` (a free reshape of openpi's `(B, T, N, H)`: the
query rows never move) cut into segments by offsets, and packed keys cut by offsets of their own.
Key segments cannot overlap, but two runs of one batch row need overlapping key prefixes, so each
run gets its own copy of the batch row's sorted keys (K and V are 8x smaller than q in openpi's
models: 1 key head for 8 query heads). Per batch row and kernel call the segments are

    [leading rank-0 rows: 0 keys] + slots x [run: its rank's prefix of copy i]
                                             [no rows: the rest of copy i]
                                             [rows until the next run: 0 keys]

so padding rows cost no FLOPs and unused slots cost nothing. One call is non-causal (runs of equal
rank), one causal (the staircases), each over all rows, each row computed in exactly one of them;
the other call gives it zero keys. A mask with more runs per batch row than the slots allow (or not
in chain form) is refused in-graph and takes the exact fallback.

The gradient of the key copies is their sum (a reduction, no scatter), and the key sort is a
permutation with a gather for its gradient (`masks.permute_rows`).

Why this decomposition: the alternatives move the big tensor. Sorting query rows valid-first (what
cudnn_split does for cuDNN) gathers q, the output and both their gradients, (B, T, 8, 256) each, on
every call; the copies here move K and V, an eighth of that. How it compares with the einsum, cuDNN and
FA3 with no mask at all (the floor), and what the causal call costs even with nothing in it (hence
`Problem.causal_runs`: pi0's and pi0.5's calls leave it out), was measured on the H200 with FA3:
docs/benchmarks.md, "FlashAttention" and its "The attention core alone, and inside a layer scan".

The mask analysis and the refusal check run in every layer. Doing both once per call of openpi's layer
stack (one conditional around the whole stack instead of one per layer) was built and measured on the
H200: openpi's pi0 and pi0-FAST training steps were no faster, and on jax 0.11 they held more memory
(docs/benchmarks.md, "FlashAttention"), so it was left out.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from flashpatch.backends import masks

#: Runs of equal rank a batch row may hold. pi0 with three cameras has at most four (two prefix
#: pieces around a missing camera, the state token, the action block); each slot costs a copy of
#: the batch row's keys and three segments.
CONSTANT_SLOTS = 4
#: Causal staircases a batch row may hold: pi0-FAST has one (its suffix).
CAUSAL_SLOTS = 1


class VarlenKernel(Protocol):
    """A flash kernel over packed sequences (FlashAttention's `flash_attn_varlen_func` contract).

    q (Tq, N, H), k and v (Tk, K, H); segment m pairs query rows cu_q[m]:cu_q[m+1] with key rows
    cu_k[m]:cu_k[m+1]; causal aligns each segment's staircase to its last key. Softmax scale 1 (q
    comes pre-scaled). Rows of a segment with no keys must come out as zeros (the two calls' outputs
    are added; FA3 writes zeros there, measured on the H200; FA2's forward writes zeros and an
    infinite log-sum-exp there, flash_fwd_kernel.h, not run here) and their gradients finite.
    """

    def __call__(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool) -> jax.Array: ...


class Runs(NamedTuple):
    """Each query row's run, read in original row order from the ranks alone."""

    start: jax.Array  # (B, T) bool: the row opens a run (rank-0 rows open theirs too)
    causal: jax.Array  # (B, T) bool: the row belongs to a causal staircase


def runs(rank: jax.Array) -> Runs:
    """Split rows into runs of equal rank and staircases of single rows whose rank grows by one."""
    prev = jnp.pad(rank[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    group = rank != prev  # a new value of rank opens a group
    next_group = jnp.pad(group[:, 1:], ((0, 0), (0, 1)), constant_values=True)
    single = group & next_group
    single_prev = jnp.pad(single[:, :-1], ((0, 0), (1, 0)), constant_values=False)
    # A single row one above a single row with keys continues that row's staircase.
    climbs = single & single_prev & (rank == prev + 1) & (prev > 0)
    start = group & ~climbs
    # A staircase is a climbing row and the single row it climbs from.
    climbs_next = jnp.pad(climbs[:, 1:], ((0, 0), (0, 1)), constant_values=False)
    causal = (climbs | (single & climbs_next)) & (rank > 0)
    return Runs(start=start, causal=causal)


class Segments(NamedTuple):
    """One kernel call's packing: offsets into packed rows and into packed key copies."""

    cu_q: jax.Array  # (M + 1,) int32
    cu_k: jax.Array  # (M + 1,) int32
    fits: jax.Array  # () bool: every batch row's runs of this kind fit the slots


def segments(rank: jax.Array, in_call: jax.Array, start: jax.Array, slots: int, kv_len: int) -> Segments:
    """The packing of one call: rows with `in_call` are computed, every other row gets no keys.

    rank (B, T) int32; in_call (B, T) bool; start (B, T) bool from `runs`. Key copies are laid out
    (B, slots, kv_len): copy i of batch row b starts at (b * slots + i) * kv_len.
    """
    batch = rank.shape[0]
    opens = start & in_call  # a run of this call starts here
    run = jnp.cumsum(opens, axis=1, dtype=jnp.int32)  # runs of this call up to this row
    # Rows of runs past the last slot join the last gap (no keys), so the segments always cover
    # every row; the mask is then refused (`fits`) and these rows' values are never used.
    computed = in_call & (run <= slots)
    slot = jnp.minimum(run, slots)[:, :, None] - 1 == jnp.arange(slots)
    one_hot_run = slot & computed[:, :, None]
    run_rows = jnp.sum(one_hot_run, axis=1, dtype=jnp.int32)  # (B, slots)
    gap_rows = jnp.sum(slot & ~computed[:, :, None], axis=1, dtype=jnp.int32)
    lead_rows = jnp.sum(run == 0, axis=1, dtype=jnp.int32)  # (B,): rows before the first run
    run_keys = jnp.max(jnp.where(one_hot_run, rank[:, :, None], 0), axis=1).astype(jnp.int32)

    zeros = jnp.zeros_like(run_rows)
    # Per batch row: [lead] then per slot [run, rest of copy, gap]; queries and keys side by side.
    q_counts = jnp.stack([run_rows, zeros, gap_rows], axis=-1).reshape(batch, 3 * slots)
    k_counts = jnp.stack([run_keys, kv_len - run_keys, zeros], axis=-1).reshape(batch, 3 * slots)
    q_counts = jnp.concatenate([lead_rows[:, None], q_counts], axis=1).reshape(-1)
    k_counts = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), k_counts], axis=1).reshape(-1)
    first = jnp.zeros((1,), jnp.int32)
    return Segments(
        cu_q=jnp.concatenate([first, jnp.cumsum(q_counts, dtype=jnp.int32)]),
        cu_k=jnp.concatenate([first, jnp.cumsum(k_counts, dtype=jnp.int32)]),
        fits=jnp.max(run[:, -1]) <= slots,
    )


class Plan(NamedTuple):
    """Everything one model call's layers share: the key order and both calls' packings."""

    k_order: jax.Array  # (B, S) keys sorted by threshold
    constant: Segments
    causal: Segments
    has_causal: jax.Array  # () bool: some row is in a staircase
    exact: jax.Array  # () bool: the mask is in chain form and every batch row fits the slots


def plan(mask_plan: masks.MaskPlan, constant_slots: int = CONSTANT_SLOTS, causal_slots: int = CAUSAL_SLOTS) -> Plan:
    """The packings for a mask in chain form (`masks.analyze`)."""
    rank = mask_plan.rank
    kv_len = mask_plan.threshold.shape[-1]
    found = runs(rank)
    keyed = rank > 0
    constant = segments(rank, keyed & ~found.causal, found.start, constant_slots, kv_len)
    causal = segments(rank, found.causal, found.start, causal_slots, kv_len)
    return Plan(
        k_order=masks.key_order(mask_plan),
        constant=constant,
        causal=causal,
        has_causal=jnp.any(found.causal),
        exact=mask_plan.exact & constant.fits & causal.fits,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _copies(x: jax.Array, slots: int) -> jax.Array:
    """(B, S, K, H) -> (B * slots * S, K, H): one copy of each batch row's keys per slot."""
    b, s, kh, h = x.shape
    return jnp.broadcast_to(x[:, None], (b, slots, s, kh, h)).reshape(b * slots * s, kh, h)


def _copies_fwd(x, slots):
    return _copies(x, slots), x.shape


def _copies_bwd(slots, shape, cotangent):
    # The copies' gradients summed in float32, then rounded once (a bf16 sum of the slots loses bits).
    b, s, kh, h = shape
    total = jnp.sum(cotangent.reshape(b, slots, s, kh, h).astype(jnp.float32), axis=1)
    return (total.astype(cotangent.dtype),)


_copies.defvjp(_copies_fwd, _copies_bwd)


def attend(
    q,
    k_sorted,
    v_sorted,
    p: Plan,
    rank,
    kernel: VarlenKernel,
    constant_slots: int,
    causal_slots: int,
    *,
    with_causal: bool,
) -> jax.Array:
    """(B, T, N, H): each row's attention over its run's keys; rows of rank 0 come out as zeros.

    k_sorted, v_sorted: the keys in `p.k_order`, k zeroed where no row attends (`masks.sorted_keys`).
    `with_causal` (static) adds the causal call; without it the plan must have no causal run.
    A kernel reads whole tiles, past a segment's end into its neighbours' rows, and masks them
    by length: 0 * NaN there would still reach the gradients. So the rows that attend nothing
    (q) are zeroed here, as the keys no row attends are by `masks.sorted_keys`.
    """
    b, t, n, h = q.shape
    s = k_sorted.shape[1]
    q = jnp.where((rank > 0)[:, :, None, None], q, jnp.zeros((), q.dtype))
    packed_q = q.reshape(b * t, n, h)

    def call(seg: Segments, slots: int, causal: bool) -> jax.Array:
        out = kernel(packed_q, _copies(k_sorted, slots), _copies(v_sorted, slots), seg.cu_q, seg.cu_k, t, s, causal)
        return out.reshape(b, t, n, h)

    out = call(p.constant, constant_slots, False)
    if with_causal:
        out = out + call(p.causal, causal_slots, True)
    return out


def reference_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool) -> jax.Array:
    """The `VarlenKernel` contract in plain JAX (dense, for tests on CPU); rows with no keys give 0."""
    del max_q, max_k
    tq, n, h = q.shape
    tk, kh = k.shape[:2]
    seg_q = jnp.searchsorted(cu_q, jnp.arange(tq), side="right") - 1
    seg_k = jnp.searchsorted(cu_k, jnp.arange(tk), side="right") - 1
    allowed = seg_q[:, None] == seg_k[None, :]
    if causal:
        # Row r of a segment with Lq rows and Lk keys sees keys 0 .. r + Lk - Lq (aligned to the last key).
        len_q = (cu_q[1:] - cu_q[:-1])[seg_q]
        len_k = (cu_k[1:] - cu_k[:-1])[seg_q]
        row = jnp.arange(tq) - cu_q[seg_q]
        col = jnp.arange(tk) - cu_k[seg_k]
        allowed &= col[None, :] <= (row + len_k - len_q)[:, None]
    q4 = q.reshape(tq, kh, n // kh, h).astype(jnp.float32)
    logits = jnp.einsum("qkgh,skh->kgqs", q4, k.astype(jnp.float32))
    logits = jnp.where(allowed, logits, -jnp.inf)
    has = jnp.any(allowed, axis=-1)
    probs = jnp.where(has[:, None], jax.nn.softmax(jnp.where(has[:, None], logits, 0.0), axis=-1), 0.0)
    out = jnp.einsum("kgqs,skh->qkgh", probs, v.astype(jnp.float32))
    return out.reshape(tq, n, h).astype(q.dtype)
