"""kvax (Nebius' Triton flash attention for JAX) on openpi's masks, exactly.

kvax describes a mask by positions and segment ids and skips key blocks by ranges computed per
query block; that is exact only when positions never decrease along the sequence and segments
are contiguous. openpi's masks are not laid out that way (padding sits in the middle), but their
chain form (`flashpatch.backends.masks`) is: sort keys by threshold and queries by rank, and every row
attends a prefix of the sorted keys, i.e. causal attention with positions rank (queries) and
threshold (keys). flashpatch sorts, calls kvax with one segment, and puts rows back in place.

Rows that attend no key are given position S + 1 inside kvax, so they attend every key and stay
finite in both passes; the core replaces their output by openpi's value and their cotangent is 0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flashpatch.backends import masks, meshes
from flashpatch.backends.base import HALF_DTYPES, ChainBackend, Problem
from flashpatch.backends.kvax import compat as kvax_compat
from flashpatch.backends.kvax import tuning as kvax_tuning
from flashpatch.backends.masks import MaskPlan
from flashpatch.backends.xla import XlaBackend

HEAD_DIMS = (16, 32, 64, 128, 192, 256)


class KvaxBackend(ChainBackend):
    name = "kvax"
    platforms = ("gpu",)
    dtypes = ("float32", "bfloat16", "float16")

    def __init__(self, tuning: kvax_tuning.Tuning | None = None):
        self.tuning = tuning  # None: per shape from kvax_tuning.TABLE
        self.fallback = XlaBackend()  # blockwise: a refused mask costs no T x S memory

    def unsupported(self, problem: Problem) -> str | None:
        reason = super().unsupported(problem)
        if reason is not None:
            return reason
        if problem.head_dim not in HEAD_DIMS:
            return f"kvax supports head_dim in {HEAD_DIMS}, not {problem.head_dim}"
        if not problem.half_kv:
            return f"kvax needs k and v in one of {HALF_DTYPES}; got {problem.k_dtype} and {problem.v_dtype}"
        return kvax_compat.load_error()

    def attend(self, q, k, v, mask, plan: MaskPlan, problem: Problem):
        tuning = self.tuning or kvax_tuning.choose(problem.head_dim, problem.kv_len)
        out = sorted_causal_attention(q.astype(k.dtype), k, v, plan, tuning)
        return out.astype(problem.out_dtype)


def causal_layout(plan: MaskPlan):
    """Orders and kvax positions that turn a chain mask into causal attention.

    Returns (query order, key order, query positions, key positions), the positions already in
    sorted order and non-decreasing.
    """
    q_pos = masks.row_sort_key(plan)
    q_order = jnp.argsort(q_pos, axis=-1, stable=True)
    k_order = masks.key_order(plan)
    q_pos = jnp.take_along_axis(q_pos, q_order, axis=-1)
    k_pos = jnp.take_along_axis(plan.threshold, k_order, axis=-1).astype(jnp.int32)
    return q_order, k_order, q_pos, k_pos


def sorted_causal_attention(q, k, v, plan: MaskPlan, tuning: kvax_tuning.Tuning) -> jax.Array:
    q_order, k_order, q_pos, k_pos = causal_layout(plan)
    q_len, kv_len = q.shape[1], k.shape[1]
    # kvax 0.1.0's backward asserts lengths that are multiples of its block sizes (its forward pads,
    # its backward does not): pad both, with positions past every real one (padded queries attend
    # everything and stay finite; no real row reaches a padded key), and cut the padding off after.
    block = max(tuning.forward.query, tuning.forward.kv, tuning.backward.query, tuning.backward.kv)
    beyond = kv_len + 2
    # Permutations, whose gradients are gathers too (a plain gather's is a scatter-add).
    q_sorted, q_pos = _pad(masks.permute_rows(q, q_order), q_pos, block, beyond)
    k_sorted, k_pos = _pad(masks.permute_rows(k, k_order), k_pos, block, beyond)
    v_sorted, _ = _pad(masks.permute_rows(v, k_order), k_pos, block, beyond)
    out = _kvax_causal(q_sorted, k_sorted, v_sorted, q_pos, k_pos, tuning)[:, :q_len]
    return masks.permute_rows(out, masks.inverse(q_order))


def _pad(x: jax.Array, pos: jax.Array, block: int, fill: int) -> tuple[jax.Array, jax.Array]:
    """Pad the sequence axis of x (B, L, H, D) with zeros, and pos (B, L') with `fill`, to a multiple of block."""
    extra = -x.shape[1] % block
    if extra:
        x = jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    extra_pos = x.shape[1] - pos.shape[1]
    if extra_pos:
        pos = jnp.pad(pos, ((0, 0), (0, extra_pos)), constant_values=fill)
    return x, pos


class KvaxSharding(NamedTuple):
    """How kvax splits a call over devices: the mesh its shard_maps run on and their specs.

    Specs are kvax's tuples over (batch, sequence, heads, head_dim) for q and for k/v.
    """

    mesh: jax.sharding.Mesh
    query_spec: tuple
    kv_spec: tuple


def kvax_specs(mesh: jax.sharding.Mesh | None) -> KvaxSharding:
    """kvax's sharding for a call under `mesh` (None: no mesh in force, so one device).

    The batch is split over the mesh's data axes (openpi's ("batch", "fsdp"), else all axes) and
    nothing else is split: openpi shards activations that way, so kvax needs no resharding. The
    mesh gets Auto axes (kvax's shard_map rejects Explicit ones; same devices and names).
    """
    mesh = meshes.single_device_mesh() if mesh is None else kvax_compat.auto_axes_mesh(mesh)
    batch = meshes.batch_axes(mesh)
    spec = (batch if len(batch) > 1 else batch[0], None, None, None)
    return KvaxSharding(mesh, spec, spec)


def _kvax_causal(q, k, v, q_pos, k_pos, tuning: kvax_tuning.Tuning) -> jax.Array:
    """kvax flash attention where query i attends key j iff k_pos[j] <= q_pos[i]."""
    lib = kvax_compat.load()
    mesh, query_spec, kv_spec = kvax_specs(meshes.active_mesh())
    fwd = lib.params(tuning.forward.query, tuning.forward.kv, tuning.forward.warps, tuning.forward.stages)
    bwd = lib.params(tuning.backward.query, tuning.backward.kv, tuning.backward.warps, tuning.backward.stages)

    def call(q, k, v, q_pos, k_pos):
        seg_q = jnp.zeros_like(q_pos)
        seg_k = jnp.zeros_like(k_pos)
        with lib.attention_specs(query_specs=query_spec, kv_specs=kv_spec):
            block_mask = lib.create_attention_mask(
                q_pos, seg_q, k_pos, seg_k, fwd_params=fwd, bwd_params=bwd, calc_bwd_mask=True, mesh=mesh
            )
            # openpi pre-scales q; kvax's backward does not compile with scale=1.0 (it specialises
            # the constant), so hand it q/2 and scale 2: both exact in binary floating point.
            return lib.flash_attention(
                q * jnp.asarray(0.5, q.dtype),
                k,
                v,
                q_pos,
                seg_q,
                k_pos,
                seg_k,
                block_mask,
                scale=2.0,
                fwd_params=fwd,
                bwd_params=bwd,
                mesh=mesh,
            )

    return _with_primal_dtypes(call, (q.dtype, k.dtype, v.dtype))(q, k, v, q_pos, k_pos)


def _with_primal_dtypes(f, dtypes):
    """kvax 0.1.0 returns float32 dK/dV for bf16 inputs; give cotangents the inputs' dtypes."""

    @jax.custom_vjp
    def g(q, k, v, q_pos, k_pos):
        return f(q, k, v, q_pos, k_pos)

    def g_fwd(q, k, v, q_pos, k_pos):
        out, vjp = jax.vjp(functools.partial(f, q_pos=q_pos, k_pos=k_pos), q, k, v)
        return out, vjp

    def g_bwd(vjp, dout):
        grads = vjp(dout)
        return (*(x.astype(d) for x, d in zip(grads, dtypes, strict=True)), None, None)

    g.defvjp(g_fwd, g_bwd)
    return g
