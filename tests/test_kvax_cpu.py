"""The parts of the kvax backend that run without a GPU: layout transform, compat fixes, gates."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

import flashpatch
from flashpatch.backends import kvax as kvax_backend
from flashpatch.backends import masks
from flashpatch.backends.base import Problem
from flashpatch.backends.kvax import compat as kvax_compat
from flashpatch.backends.kvax import tuning as kvax_tuning
from flashpatch.backends.reference import reference_attention
from flashpatch.testing.conformance import CASES


def _causal_by_positions(q, k, v, q_pos, k_pos, tuning):
    """What kvax computes for one segment: query i attends key j iff k_pos[j] <= q_pos[i]."""
    block = max(tuning.forward.query, tuning.forward.kv, tuning.backward.query, tuning.backward.kv)
    assert q.shape[1] % block == 0 and k.shape[1] % block == 0, "kvax's backward needs block-multiple lengths"
    allowed = k_pos[:, None, :] <= q_pos[:, :, None]
    return reference_attention(q, k, v, allowed, q.dtype)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].structured])
def test_sorted_causal_layout_reproduces_openpi(monkeypatch, case: str) -> None:
    """Sorting by rank/threshold and running causal attention gives openpi's rows back in place."""
    monkeypatch.setattr(kvax_backend, "_kvax_causal", _causal_by_positions)
    q, k, v, mask = CASES[case].arrays(jnp.float32)
    plan = masks.analyze(mask[:, 0])
    assert bool(plan.exact)
    run = jax.jit(lambda q, k, v, plan: kvax_backend.sorted_causal_attention(q, k, v, plan, kvax_tuning.DEFAULT))
    out = run(q, k, v, plan)
    ref = reference_attention(q, k, v, mask[:, 0], jnp.float32)
    rows = jnp.any(mask[:, 0], axis=-1)[:, :, None, None]
    assert rel_err(out, ref, rows) < 1e-6
    assert bool(jnp.all(jnp.isfinite(out))), "rows with no key must stay finite inside kvax"

    # Gradients through the row and key permutations (rows with no key get no cotangent: the core
    # replaces them).
    cot = jnp.where(rows, jax.random.normal(jax.random.PRNGKey(3), out.shape), 0.0)
    sorted_loss = lambda q, k, v: jnp.sum(run(q, k, v, plan) * cot)  # noqa: E731
    ref_loss = lambda q, k, v: jnp.sum(reference_attention(q, k, v, mask[:, 0], jnp.float32) * cot)  # noqa: E731
    got = jax.grad(sorted_loss, argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want, strict=True):
        assert rel_err(g, w) < 1e-5, name


def test_layout_positions_never_decrease() -> None:
    plan = masks.analyze(jnp.asarray(CASES["pi0_masked_image"].mask))
    _, _, q_pos, k_pos = kvax_backend.causal_layout(plan)
    assert bool(jnp.all(jnp.diff(q_pos, axis=-1) >= 0)) and bool(jnp.all(jnp.diff(k_pos, axis=-1) >= 0))


def test_broken_layout_is_caught(monkeypatch) -> None:
    """The layout test can fail: an unsorted key order breaks it."""
    monkeypatch.setattr(kvax_backend, "_kvax_causal", _causal_by_positions)
    real = kvax_backend.causal_layout

    def no_key_sort(plan):
        q_order, _, q_pos, _ = real(plan)
        ident = jnp.broadcast_to(jnp.arange(plan.threshold.shape[-1]), plan.threshold.shape)
        return q_order, ident, q_pos, jnp.sort(plan.threshold, axis=-1)

    monkeypatch.setattr(kvax_backend, "causal_layout", no_key_sort)
    q, k, v, mask = CASES["pi0_masked_image"].arrays(jnp.float32)
    out = kvax_backend.sorted_causal_attention(q, k, v, masks.analyze(mask[:, 0]), kvax_tuning.DEFAULT)
    ref = reference_attention(q, k, v, mask[:, 0], jnp.float32)
    assert rel_err(out, ref, jnp.any(mask[:, 0], axis=-1)[:, :, None, None]) > 1e-2


def _problem(**overrides) -> Problem:
    base = dict(
        batch=2, q_len=128, kv_len=128, num_heads=8, num_kv_heads=1, head_dim=256,
        q_dtype="bfloat16", k_dtype="bfloat16", v_dtype="bfloat16", probs_dtype="bfloat16", platform="gpu",
    )  # fmt: skip
    return Problem(**{**base, **overrides})


def test_kvax_declares_its_limits(monkeypatch) -> None:
    backend = kvax_backend.KvaxBackend()
    monkeypatch.setattr(kvax_compat, "load_error", lambda: None)
    assert backend.unsupported(_problem()) is None
    assert "not cpu" in backend.unsupported(_problem(platform="cpu"))
    assert "head_dim" in backend.unsupported(_problem(head_dim=96))
    assert "k and v" in backend.unsupported(_problem(k_dtype="float32", v_dtype="float32"))
    assert backend.unsupported(_problem(q_dtype="float32")) is None  # gemma_fast: f32 q, bf16 cache
    monkeypatch.setattr(kvax_compat, "load_error", lambda: "kvax cannot be imported: no GPU")
    assert "cannot be imported" in backend.unsupported(_problem())


def test_kvax_on_cpu_falls_back_with_one_warning() -> None:
    q, k, v, mask = CASES["pi0_padding_mid"].arrays(jnp.bfloat16)
    with pytest.warns(flashpatch.FlashpatchWarning, match="kvax"):
        out = flashpatch.attention(q, k, v, mask, settings=flashpatch.Settings(backend="kvax"))
    ref = reference_attention(q, k, v, mask[:, 0], jnp.bfloat16)
    assert bool(jnp.all(out == ref)), "the fallback is the original computation"


def test_shard_map_stand_in_forwards_to_jax_shard_map() -> None:
    seen = {}

    def fake_shard_map(f, **kwargs):
        seen.update(kwargs)
        return f

    stand_in = kvax_compat.shard_map_stand_in(types.SimpleNamespace(shard_map=fake_shard_map))
    if stand_in is None:
        pytest.skip("this JAX still has jax.experimental.shard_map.Specs; nothing to stand in for")
    assert stand_in.Specs is not None
    fn = stand_in.shard_map(len, "mesh", ("in",), ("out",), check_rep=False)
    assert fn is len
    assert seen == {"mesh": "mesh", "in_specs": ("in",), "out_specs": ("out",), "check_vma": False}


def test_module_replaced_restores_jax(monkeypatch) -> None:
    import jax.experimental as parent

    before = parent.__dict__.get("shard_map")
    stand_in = types.ModuleType("jax.experimental.shard_map")
    with kvax_compat._module_replaced("jax.experimental.shard_map", stand_in):
        import jax.experimental.shard_map as seen

        assert seen is stand_in
    assert parent.__dict__.get("shard_map") is before


def test_constexpr_globals_are_wrapped_once() -> None:
    class Constexpr:
        def __init__(self, value):
            self.value = value

    module = types.SimpleNamespace(LOG2_CONST=1.4426950408889634, NEG_INF=Constexpr(-1))
    assert kvax_compat.wrap_constexpr_globals(module, Constexpr, ("LOG2_CONST", "NEG_INF", "ABSENT")) == ["LOG2_CONST"]
    assert isinstance(module.LOG2_CONST, Constexpr) and module.LOG2_CONST.value == pytest.approx(1.4426950408889634)
    assert kvax_compat.wrap_constexpr_globals(module, Constexpr, ("LOG2_CONST",)) == []


def test_auto_axes_mesh_keeps_devices_and_names() -> None:
    devices = np.array(jax.devices()[:1])
    auto = jax.sharding.Mesh(devices, ("batch",))
    assert kvax_compat.auto_axes_mesh(auto) is auto
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:
        pytest.skip("this JAX has no axis types")
    explicit = jax.sharding.Mesh(devices, ("batch",), axis_types=(axis_type.Explicit,))
    fixed = kvax_compat.auto_axes_mesh(explicit)
    assert fixed.axis_names == ("batch",) and fixed.devices.tolist() == devices.tolist()
    assert all(t == axis_type.Auto for t in fixed.axis_types)


def test_kvax_import_failure_is_a_reason_not_a_crash(monkeypatch) -> None:
    monkeypatch.setattr(kvax_compat, "_loaded", None)
    monkeypatch.setattr(kvax_compat, "_error", None)

    def boom():
        raise RuntimeError("jax-triton refuses to import without a GPU")

    monkeypatch.setattr(kvax_compat, "_import_fixed", boom)
    monkeypatch.setattr(kvax_compat, "stack_problem", lambda: None)  # a stack whose versions look fine
    reason = kvax_compat.load_error()
    assert reason.startswith("kvax cannot be imported") and "jax-triton" in reason
    with pytest.raises(ImportError, match="jax-triton"):
        kvax_compat.load()


def test_tuning_table_covers_openpi_head_dim() -> None:
    short, long = kvax_tuning.choose(256, 1024), kvax_tuning.choose(256, 8192)
    assert short.max_len >= 1024 and long.max_len >= 8192
    assert kvax_tuning.choose(96, 100) is kvax_tuning.DEFAULT


class _StructuredStandIn(kvax_backend.KvaxBackend):
    """kvax's layout and fallback logic with a pure-JAX kernel, so it runs on CPU."""

    platforms = ("cpu",)

    def unsupported(self, problem):
        return None

    def attend(self, q, k, v, mask, plan, problem):
        return kvax_backend.sorted_causal_attention(q, k, v, plan, kvax_tuning.DEFAULT).astype(problem.out_dtype)


@pytest.mark.parametrize("structured", [True, False], ids=["openpi_mask", "arbitrary_mask"])
def test_structured_backend_inside_the_scanned_stack(monkeypatch, use_backend, structured: bool) -> None:
    """Under openpi's nn.scan + remat stack, the kvax path runs, and a non-chain mask falls back once."""
    import warnings

    import flax.linen as nn

    from flashpatch.testing import gemma, layouts

    monkeypatch.setattr(kvax_backend, "_kvax_causal", _causal_by_positions)
    use_backend("kvax", _StructuredStandIn())
    model = gemma.Module(configs=[gemma.get_config("tiny")], embed_dtype="float32", vocab_size=8)
    layout = layouts.pi0(2, 20, actions=5, masked_image=1)
    mask = layout.mask if structured else CASES["arbitrary"].mask[:, :, :21]
    mask = jnp.asarray(mask[:, : mask.shape[-1], :])
    x = jax.random.normal(jax.random.PRNGKey(0), (2, mask.shape[1], 32))
    positions = jnp.broadcast_to(jnp.arange(mask.shape[1]), mask.shape[:2])
    params = nn.Module.init(model, jax.random.PRNGKey(1), [x], positions, mask)
    run = jax.jit(lambda p, x, m: model.apply(p, [x], positions, m)[0][0])
    ref = run(params, x, mask)
    with warnings.catch_warnings(record=True) as seen, flashpatch.enable("kvax"):
        warnings.simplefilter("always")
        out = jax.block_until_ready(run(params, x, mask))
    structure = [w for w in seen if "does not have the structure kvax computes" in str(w.message)]
    assert len(structure) == (0 if structured else 1), [str(w.message) for w in seen]
    assert rel_err(out, ref) < 1e-5


def _lookup(found: dict[str, str]):
    import importlib.metadata

    def lookup(name: str) -> str:
        if name not in found:
            raise importlib.metadata.PackageNotFoundError(name)
        return found[name]

    return lookup


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ({"jax": "0.11.2", "jax-triton": "0.3.1", "triton": "3.6.0"}, None),  # the H100 image
        ({"jax": "0.5.3", "jax-triton": "0.2.0", "triton": "3.1.0"}, None),  # openpi's JAX, the one pair that compiles
        ({"jax": "0.5.3", "jax-triton": "0.2.0", "triton": "3.3.1"}, "needs triton 3.1"),  # torch 2.7.1's triton
        ({"jax": "0.10.2", "jax-triton": "0.3.1", "triton": "3.9.0"}, "triton >= 3.8"),
        ({"jax": "0.12.0.1", "jax-triton": "0.4.1", "triton": "3.6.0"}, "JAX 0.12"),
        ({"jax": "0.5.3"}, "needs jax-triton and triton"),
    ],
)
def test_stack_problem_names_what_does_not_fit(found, expected) -> None:
    problem = kvax_compat.stack_problem(_lookup(found))
    if expected is None:
        assert problem is None
    else:
        assert expected in problem
