"""A pi0-style fixture model under openpi's FSDP mesh on 4 CPU devices, patched vs unpatched.

Run by tests/test_multidevice.py in a fresh interpreter, since the device count must be set before
JAX starts (XLA_FLAGS=--xla_force_host_platform_device_count=4; PYTHONPATH with flashpatch's src).
Prints one JSON object.

The mesh is openpi's: ("batch", "fsdp") of shape (devices // fsdp, fsdp). Parameters are sharded
by openpi's FSDP rule (largest axis divisible by the fsdp size; no size floor here, so the toy
weights are really split), the batch over both axes. Each mesh mode (openpi's global,
JAX's context, `with mesh:`) runs the float32 model unpatched and with flashpatch's xla backend
(and, under openpi's global, kvax's code path with a plain-JAX kernel in place of Triton, and a
deliberately broken attention that the test must catch), and reports the rel.err of outputs and
gradients, the mesh flashpatch found while tracing, the output sharding and the collectives XLA
compiled in.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import flashpatch
from flashpatch import backends
from flashpatch.backends import kvax as kvax_backend
from flashpatch.backends import meshes
from flashpatch.backends.kvax import compat as kvax_compat
from flashpatch.backends.reference import reference_attention
from flashpatch.backends.xla import XlaBackend
from flashpatch.testing import gemma, layouts, register, sharding

sys.path.insert(0, __file__.rsplit("/", 1)[0])  # helpers and kvax_modules live beside this file
import kvax_modules
from helpers import tree_rel_err

DEVICES, FSDP = 4, 2
BATCH, PREFIX, ACTIONS = 4, 24, 8
CONFIGS = [
    gemma.Config(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
    gemma.Config(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
]
DATA = P(sharding.DATA_AXIS)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def inputs(mesh: jax.sharding.Mesh) -> tuple:
    model = gemma.Module(configs=CONFIGS, embed_dtype="float32", vocab_size=32)
    layout = layouts.pi0(BATCH, PREFIX, actions=ACTIONS, masked_image=1, seed=0)
    rng = np.random.default_rng(0)
    suffix = layout.valid.shape[1] - PREFIX
    prefix = rng.standard_normal((BATCH, PREFIX, CONFIGS[0].width)).astype(np.float32)
    actions = rng.standard_normal((BATCH, suffix, CONFIGS[1].width)).astype(np.float32)
    positions, mask = layout.positions, layout.mask
    shapes = jax.eval_shape(lambda: nn.Module.init(model, jax.random.PRNGKey(0), [prefix, actions], positions, mask))
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    params = jax.device_put(params, sharding.fsdp_sharding(params, mesh, min_size_mbytes=0))
    batch = jax.device_put((prefix, actions, positions, mask), NamedSharding(mesh, DATA))
    return model, (params, *batch)


def outputs_and_grads(model, params, prefix, actions, positions, mask):
    def loss(params, prefix, actions):
        (a, b), _ = model.apply(params, [prefix, actions], positions, mask)
        return jnp.sum(a**2) + jnp.sum(b**2), (a, b)

    (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, prefix, actions)
    return outs, grads


def mesh_modes(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Ways a caller puts a mesh in force: name -> context-manager factory (where this JAX has it)."""
    modes = {"openpi_global": lambda: sharding.set_mesh(mesh)}
    jax_context = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    if jax_context is not None:
        modes["jax_context"] = lambda: jax_context(mesh)
    modes["with_mesh"] = lambda: mesh
    return modes


class SpyXla(XlaBackend):
    """The xla backend, noting while traced the mesh flashpatch finds; `broken` attends padding too."""

    def __init__(self, seen: list, broken: bool = False):
        super().__init__(block=16)
        self.seen, self.broken = seen, broken

    def attend(self, q, k, v, mask, problem):
        self.seen.append(meshes.active_mesh())
        return super().attend(q, k, v, jnp.ones_like(mask) if self.broken else mask, problem)


class CpuKvax(kvax_backend.KvaxBackend):
    """kvax's code path (sort, pad, specs, shard_map, custom_vjp) on CPU; the kernel is stood in for."""

    platforms = ("cpu",)

    def unsupported(self, problem):
        return None


def stand_in_kvax(kvax_sources: tuple | None) -> kvax_compat.Kvax:
    """kvax's API with plain-JAX attention inside shard_map over the specs flashpatch sets.

    With kvax installed, its own spec context and shard_map (with flashpatch's compat fix) are used.
    """
    if kvax_sources is not None:
        specs_module, sharding_module = kvax_sources
        kvax_compat.fix_multi_axis_specs(sharding_module, [])
        attention_specs, shard_map = specs_module.attention_specs, sharding_module.shard_map

        def current() -> tuple:
            got = specs_module.get_attention_specs()
            return got.query_specs, got.kv_specs
    else:
        state: dict[str, tuple] = {}

        @contextlib.contextmanager
        def attention_specs(query_specs, kv_specs):
            state["specs"] = (query_specs, kv_specs)
            yield

        def current() -> tuple:
            return state["specs"]

        def shard_map(f, in_specs, out_specs, mesh):
            convert = kvax_compat.partition_specs
            jax_shard_map = getattr(jax, "shard_map", None)
            if jax_shard_map is not None:
                return jax_shard_map(f, mesh=mesh, in_specs=convert(in_specs), out_specs=convert(out_specs))
            from jax.experimental.shard_map import shard_map as legacy

            return legacy(f, mesh=mesh, in_specs=convert(in_specs), out_specs=convert(out_specs), check_rep=False)

    def causal(scale):
        def body(q, k, v, q_pos, k_pos):
            allowed = k_pos[:, None, :] <= q_pos[:, :, None]
            return reference_attention(q * jnp.asarray(scale, q.dtype), k, v, allowed, q.dtype)

        return body

    def flash_attention(q, k, v, q_pos, seg_q, k_pos, seg_k, block_mask, *, scale, fwd_params, bwd_params, mesh):
        query_spec, kv_spec = current()
        pos_spec = (query_spec[0], None)
        in_specs = (query_spec, kv_spec, kv_spec, pos_spec, pos_spec)
        return shard_map(causal(scale), in_specs=in_specs, out_specs=query_spec, mesh=mesh)(q, k, v, q_pos, k_pos)

    return kvax_compat.Kvax(
        flash_attention=flash_attention,
        create_attention_mask=lambda *args, **kwargs: None,
        attention_specs=attention_specs,
        params=lambda *blocks: blocks,
        version="stand-in",
        fixes=(),
    )


def collectives(compiled) -> dict[str, int]:
    text = compiled.as_text()
    return {name: len(re.findall(rf"\b{name}(?:-start)?\(", text)) for name in COLLECTIVES}


def run(model, args, mode, backend: str | None) -> tuple:
    """(outputs, grads, collectives) of one fresh jit (mesh modes are not in JAX's cache key)."""
    fn = jax.jit(lambda *a: outputs_and_grads(model, *a))
    patched = flashpatch.enable(backend) if backend else contextlib.nullcontext()
    with mode(), patched:
        compiled = fn.lower(*args).compile()
        outs, grads = compiled(*args)
    return outs, grads, collectives(compiled)


def describe(mesh: jax.sharding.Mesh | None) -> dict | None:
    if mesh is None:
        return None
    return {"axis_names": list(mesh.axis_names), "device_ids": np.vectorize(lambda d: d.id)(mesh.devices).tolist()}


def compare(ref: tuple, got: tuple) -> dict:
    (ref_outs, ref_grads), (outs, grads) = ref[:2], got[:2]
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((outs, grads)))
    return {
        "fwd": tree_rel_err(outs, ref_outs),
        "grad_params": tree_rel_err(grads[0], ref_grads[0]),
        "grad_inputs": tree_rel_err(grads[1:], ref_grads[1:]),
        "finite": finite,
    }


def batch_sharded(mesh: jax.sharding.Mesh, outs) -> bool:
    """Every output split over the batch by ("batch", "fsdp"): one row block per device."""
    want = NamedSharding(mesh, DATA)
    return all(
        x.sharding.is_equivalent_to(want, x.ndim) and x.addressable_shards[0].data.shape[0] == x.shape[0] // DEVICES
        for x in outs
    )


def kvax_check(model, args, mesh, mode, ref) -> dict:
    """kvax's code path under `mode` with the kernel stood in for; the sharding it was given."""
    sources, unfixed = kvax_modules.load(), kvax_modules.load()
    shardings: list = []
    real_specs = kvax_backend.kvax_specs

    def spy_specs(active):
        shardings.append(real_specs(active))
        return shardings[-1]

    kvax_backend.kvax_specs = spy_specs
    kvax_compat._loaded = stand_in_kvax(sources)
    with backends.override("kvax", CpuKvax()):
        got = run(model, args, mode, "kvax")
    found = shardings[0] if shardings else None
    matches_activations = found is not None and NamedSharding(found.mesh, P(*found.query_spec)).is_equivalent_to(
        NamedSharding(mesh, DATA), 4
    )
    return {
        **compare(ref, got),
        "kvax_modules": sources is not None,
        "kvax_reads_multi_axis_specs": None if sources is None else kvax_compat.reads_multi_axis_specs(unfixed[1]),
        "calls": len(shardings),
        "mesh": describe(found.mesh) if found else None,
        "query_spec": repr(found.query_spec) if found else None,
        "kv_spec": repr(found.kv_spec) if found else None,
        "spec_matches_activations": matches_activations,
        "outputs_batch_sharded": batch_sharded(mesh, got[0]),
        "collectives": got[2],
    }


def main() -> None:
    warnings.simplefilter("ignore", DeprecationWarning)  # `with mesh:` on new JAX
    if jax.device_count() != DEVICES:
        raise SystemExit(
            f"needs {DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count); got {jax.device_count()}"
        )
    register()
    mesh = sharding.make_mesh(FSDP)
    model, args = inputs(mesh)
    report: dict[str, Any] = {"jax": jax.__version__, "mesh": describe(mesh), "modes": {}}
    report["param_specs"] = {
        jax.tree_util.keystr(path): [list(e) if isinstance(e, tuple) else e for e in leaf.sharding.spec]
        for path, leaf in jax.tree_util.tree_flatten_with_path(args[0])[0]
    }
    modes = mesh_modes(mesh)
    for name, mode in modes.items():
        seen: list = []
        ref = run(model, args, mode, None)
        with backends.override("xla", SpyXla(seen)):
            got = run(model, args, mode, "xla")
        report["modes"][name] = {
            **compare(ref, got),
            "seen_meshes": [describe(m) for m in seen],
            "outputs_batch_sharded": {"unpatched": batch_sharded(mesh, ref[0]), "patched": batch_sharded(mesh, got[0])},
            "collectives": {"unpatched": ref[2], "patched": got[2]},
        }
        if name == "openpi_global":
            with backends.override("xla", SpyXla([], broken=True)):
                report["broken_xla"] = compare(ref, run(model, args, mode, "xla"))
            report["kvax_stand_in"] = kvax_check(model, args, mesh, mode, ref)

    print(json.dumps(report))


if __name__ == "__main__":
    main()
