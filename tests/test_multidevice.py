"""flashpatch under openpi's FSDP mesh on 4 CPU devices, and the sharding the kvax path is given.

The 4-device checks run tests/multidevice_check.py once in a fresh interpreter (JAX fixes the CPU
device count when it starts) and assert on its JSON; the kvax sharding units run here, on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import kvax_modules
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import flashpatch
from flashpatch.backends import kvax as kvax_backend
from flashpatch.backends.kvax import compat as kvax_compat

SCRIPT = Path(__file__).with_name("multidevice_check.py")
#: Device count, and XLA's cheaper CPU code generation: the check compiles the model 8 times.
XLA_FLAGS = " ".join(
    (
        "--xla_force_host_platform_device_count=4",
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    )
)
#: float32 model, patched vs unpatched: measured about 1e-6 on the gradients (JAX 0.5.3 and 0.10.2).
TOL = 1e-5
MODES = ("openpi_global", "jax_context", "with_mesh")
OPENPI_SPEC = (("batch", "fsdp"), None, None, None)


@pytest.fixture(scope="module")
def report() -> dict:
    src = Path(flashpatch.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPATCH")}  # no autoload, no install
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_FLAGS}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{SCRIPT.name} failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mode(report: dict, mode: str) -> dict:
    if mode not in report["modes"]:
        pytest.skip(f"JAX {report['jax']} has no API for mesh mode {mode}")
    return report["modes"][mode]


def _assert_close(result: dict, what: str) -> None:
    assert result["finite"], f"{what}: NaN/inf in outputs or gradients"
    for key in ("fwd", "grad_params", "grad_inputs"):
        assert result[key] < TOL, f"{what}: rel.err of {key} {result[key]:.3g} >= {TOL}"


@pytest.mark.parametrize("mode", MODES)
def test_patched_model_matches_unpatched_under_the_mesh(report: dict, mode: str) -> None:
    _assert_close(_mode(report, mode), f"xla backend under {mode}")


@pytest.mark.parametrize("mode", MODES)
def test_flashpatch_finds_the_mesh(report: dict, mode: str) -> None:
    seen = _mode(report, mode)["seen_meshes"]
    assert seen, "the patched attention was never traced"
    assert all(m == report["mesh"] for m in seen), (seen, report["mesh"])


@pytest.mark.parametrize("mode", MODES)
def test_outputs_stay_batch_sharded_and_no_collectives_are_added(report: dict, mode: str) -> None:
    result = _mode(report, mode)
    assert result["outputs_batch_sharded"] == {"unpatched": True, "patched": True}
    assert result["collectives"]["patched"] == result["collectives"]["unpatched"]


def test_parameters_are_split_by_openpi_fsdp_rule(report: dict) -> None:
    """Largest dimension the fsdp size divides; vectors replicated (the toy model has no size floor)."""
    specs = report["param_specs"]
    assert specs["['params']['layers']['attn']['q_einsum']['w']"] == [None, None, "fsdp", None]  # (2, 4, 64, 16)
    assert specs["['params']['layers']['mlp']['linear']"] == [None, "fsdp", None]  # (2, 128, 64)
    assert specs["['params']['final_norm']['scale']"] == [None]


def test_a_broken_attention_is_caught(report: dict) -> None:
    """The comparison can fail: attending padding keys moves every metric far past TOL."""
    broken = report["broken_xla"]
    assert all(broken[key] > 100 * TOL for key in ("fwd", "grad_params", "grad_inputs")), broken


def test_kvax_path_under_openpi_mesh(report: dict) -> None:
    """kvax's code path (kernel stood in for) agrees, gets openpi's mesh and specs, adds no resharding."""
    kvax = report["kvax_stand_in"]
    _assert_close(kvax, "kvax path (stand-in kernel)")
    assert kvax["calls"] > 0 and kvax["mesh"] == report["mesh"]
    assert kvax["query_spec"] == kvax["kv_spec"] == repr(OPENPI_SPEC)
    assert kvax["spec_matches_activations"] and kvax["outputs_batch_sharded"]
    # the in-graph structure check (plan.exact) reduces over the whole batch: one scalar all-reduce
    unpatched = report["modes"]["openpi_global"]["collectives"]["unpatched"]
    assert {k: v for k, v in kvax["collectives"].items() if k != "all-reduce"} == {
        k: v for k, v in unpatched.items() if k != "all-reduce"
    }


def _devices(shape: tuple[int, ...]) -> np.ndarray:
    return np.array(jax.devices()[:1]).reshape(shape)


def test_kvax_specs_without_a_mesh() -> None:
    found = kvax_backend.kvax_specs(None)
    assert found.mesh.devices.size == 1 and found.mesh.axis_names == ("batch",)
    assert found.query_spec == found.kv_spec == ("batch", None, None, None)


def test_kvax_specs_for_openpi_mesh() -> None:
    mesh = jax.make_mesh((1, 1), ("batch", "fsdp"))  # openpi's make_mesh with one device
    found = kvax_backend.kvax_specs(mesh)
    assert found.query_spec == found.kv_spec == OPENPI_SPEC
    assert found.mesh.axis_names == mesh.axis_names
    assert found.mesh.devices.tolist() == mesh.devices.tolist()
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None or all(t == axis_type.Auto for t in mesh.axis_types):
        assert found.mesh is mesh  # JAX 0.5.3: make_mesh gives Auto axes, kept as they are
    else:
        assert all(t == axis_type.Auto for t in found.mesh.axis_types)


@pytest.mark.parametrize(
    ("names", "spec"),
    [(("data",), ("data", None, None, None)), (("x", "y"), (("x", "y"), None, None, None)),
     (("batch", "model"), ("batch", None, None, None)), (("fsdp", "batch"), (("batch", "fsdp"), None, None, None))],
)  # fmt: skip
def test_kvax_specs_for_other_axis_names(names: tuple[str, ...], spec: tuple) -> None:
    """openpi's data axes where the mesh has them (in openpi's order), else every axis."""
    mesh = jax.sharding.Mesh(_devices((1,) * len(names)), names)
    found = kvax_backend.kvax_specs(mesh)
    assert found.query_spec == found.kv_spec == spec
    assert found.mesh.axis_names == names


def test_partition_specs_read_multi_axis_entries() -> None:
    b = ("batch", "fsdp")
    q, pos, mask = (b, None, None, None), (b, None), (b, None, None)
    in_specs = [q, q, pos, ((mask, mask, mask, mask),)]
    got = kvax_compat.partition_specs(in_specs)
    assert got[:3] == [P(b, None, None, None), P(b, None, None, None), P(b, None)]
    assert got[3] == ((P(b, None, None),) * 4,)
    assert all(isinstance(s, P) for s in jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, P)))
    assert kvax_compat.partition_specs(("batch", None)) == P("batch", None)
    assert kvax_compat.partition_specs([None, ()]) == [None, P()]


def _kvax_sharding_modules():
    modules = kvax_modules.load()
    if modules is None:
        pytest.skip("kvax is not installed")
    return modules


def test_kvax_shard_map_needs_the_multi_axis_fix() -> None:
    """kvax 0.1.0's own shard_map refuses openpi's batch spec; after the fix it runs, with the same result."""
    specs, sharding = _kvax_sharding_modules()
    mesh = jax.sharding.Mesh(_devices((1, 1)), ("batch", "fsdp"))
    x = jnp.arange(2 * 3 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 4)

    def call():
        with specs.attention_specs(OPENPI_SPEC, OPENPI_SPEC):
            return sharding.shard_map(lambda a: a * 2, in_specs=(OPENPI_SPEC,), out_specs=OPENPI_SPEC, mesh=mesh)(x)

    if kvax_compat.reads_multi_axis_specs(sharding):
        pytest.skip("this kvax reads multi-axis spec entries itself; the compat fix is not applied")
    with pytest.raises(ValueError):
        call()
    user = types.SimpleNamespace(shard_map=sharding.shard_map)  # a kvax module that imported it
    assert kvax_compat.fix_multi_axis_specs(sharding, [user])
    assert user.shard_map is sharding.shard_map and kvax_compat.reads_multi_axis_specs(sharding)
    assert bool(jnp.all(call() == x * 2))
    assert not kvax_compat.fix_multi_axis_specs(sharding, [user]), "applied once"


def test_fix_is_skipped_where_kvax_reads_multi_axis_specs() -> None:
    def shard_map(f, in_specs, out_specs, mesh=None):
        convert = kvax_compat.partition_specs
        return fake.jax_shard_map(f, mesh=mesh, in_specs=convert(in_specs), out_specs=convert(out_specs))

    fake = types.SimpleNamespace(jax_shard_map=lambda f, **kwargs: f, shard_map=shard_map)
    assert kvax_compat.reads_multi_axis_specs(fake)
    assert not kvax_compat.fix_multi_axis_specs(fake, [])
    assert fake.shard_map is shard_map
