"""Patched vs unpatched: openpi-compatible Gemma models with flashpatch off, "reference" and "xla".

Each scenario is one way openpi calls a model (pi0 training, pi0.5 with adaRMS, pi0's KV-cache
sampling, pi0-FAST training and decoding, LoRA). It is one jitted function of (params, data) that
returns the model's outputs and, except for decoding, the gradients of a fixed random projection
of them with respect to the parameters and the inputs. It runs with flashpatch off, under
enable("reference"), which must equal off bit for bit (the adapters recompute everything around
attention exactly as openpi does), and under enable("xla"), which must stay within TOL of the
float32 model. Masks are data, so all layouts of a scenario share one compilation per dtype and
setting.

openpi zero-initialises some parameters (pi0.5's adaRMS modulation, gemma_fast's embedding
table), which can hide attention from the outputs; scenarios give those random values, and
test_a_broken_attention_is_caught shows that every comparison fails when attention is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge as nnx_bridge
from helpers import TOL, CountingXla, assert_finite, fast_jit, rel_err

import flashpatch
from flashpatch.backends.xla import XlaBackend
from flashpatch.core import run, verify
from flashpatch.testing import gemma, gemma_fast, layouts
from flashpatch.testing.lora import LoRAConfig

EXPERT = gemma.get_config("tiny")  # width 32, depth 2, 4 query heads over 1 kv head
ACTION_EXPERT = gemma.get_config("tiny", width=24, mlp_dim=48)  # narrower, like openpi's action expert
LORA = {"attn": LoRAConfig(rank=2, alpha=2.0), "ffn": LoRAConfig(rank=2, alpha=2.0)}
VOCAB = 64
PREFIX, SUFFIX = 13, 6  # odd total length
FAST_PREFIX, DECODE_STEPS = 16, 3
GEMMA_SITE = "flashpatch.testing.gemma.Attention"
FAST_SITE = "flashpatch.testing.gemma_fast.Attention"

Data = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Inputs


def _values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 values that bfloat16 holds exactly: f32 and bf16 runs see the same inputs."""
    return rng.standard_normal(shape).astype(jnp.bfloat16).astype(np.float32)


def _joint_data(layout: layouts.Layout, seed: int, adarms: bool) -> Data:
    """pi0 / pi0.5 training: the first PREFIX tokens go to the first expert, the rest to the action expert."""
    rng = np.random.default_rng(seed)
    batch, length = layout.valid.shape
    xs = [_values(rng, (batch, PREFIX, EXPERT.width)), _values(rng, (batch, length - PREFIX, ACTION_EXPERT.width))]
    return {
        "inputs": {"xs": xs, "cond": [None, _values(rng, (batch, ACTION_EXPERT.width))] if adarms else None},
        "positions": layout.positions,
        "mask": layout.mask,
        "cot": [_values(rng, x.shape) for x in xs],
    }


def _pi0_sample_data(seed: int, masked_image: int | None) -> Data:
    """pi0's sample_actions: prefix prefill, then suffix queries over the cached prefix keys."""
    rng = np.random.default_rng(seed)
    full = layouts.pi0(2, PREFIX, actions=SUFFIX - 1, masked_image=masked_image, seed=seed)
    prefix = layouts.Layout("prefix", full.valid[:, :PREFIX], full.ar[:, :PREFIX])
    suffix = layouts.pi0(2, 0, actions=SUFFIX - 1, seed=seed)
    suffix_positions = prefix.valid.sum(-1)[:, None] + np.cumsum(suffix.valid, axis=1) - 1
    return {
        "inputs": {
            "prefix": _values(rng, (2, PREFIX, EXPERT.width)),
            "suffix": _values(rng, (2, SUFFIX, ACTION_EXPERT.width)),
        },
        "prefix_positions": prefix.positions,
        "prefix_mask": prefix.mask,
        "suffix_positions": suffix_positions.astype(np.int32),
        "suffix_mask": layouts.suffix_over_cache(prefix.valid, suffix),
        "cot": [None, _values(rng, (2, SUFFIX, ACTION_EXPERT.width))],
    }


def _fast_train_data(layout: layouts.Layout, seed: int) -> Data:
    rng = np.random.default_rng(seed)
    batch, length = layout.valid.shape
    return {
        "inputs": _values(rng, (batch, length, EXPERT.width)),
        "positions": layout.positions,
        "mask": layout.mask,
        "cot": _values(rng, (batch, length, VOCAB)),
    }


def _fast_sample_data(seed: int, masked_image: int | None) -> Data:
    """pi0-FAST's sample_actions: right-align the prefix, prefill a cache of prefix + DECODE_STEPS
    slots (mask padded with zeros), then decode one token at a time over the valid slots.

    Tokens are fixed instead of sampled, so that both runs decode the same sequence.
    """
    rng = np.random.default_rng(seed)
    layout = layouts.pi0_fast(2, FAST_PREFIX, causal=0, masked_image=masked_image, seed=seed)
    x, valid, attn = _values(rng, (2, FAST_PREFIX, EXPERT.width)), layout.valid.copy(), layout.mask.copy()
    for b in range(2):  # openpi's left_to_right_align
        shift = -(int(np.max(valid[b] * np.arange(FAST_PREFIX))) + 1)
        x[b], valid[b], attn[b] = np.roll(x[b], shift, 0), np.roll(valid[b], shift, 0), np.roll(attn[b], shift, (0, 1))
    prefill_len = valid.sum(-1)
    prefix_start = FAST_PREFIX - prefill_len
    slots = np.arange(FAST_PREFIX + DECODE_STEPS)
    steps = range(DECODE_STEPS)
    return {
        "prefix": x,
        "prefix_positions": (np.cumsum(valid, axis=1) - 1).astype(np.int32),
        "prefill_mask": np.pad(attn, ((0, 0), (0, 0), (0, DECODE_STEPS))),
        "tokens": rng.integers(0, VOCAB, (DECODE_STEPS, 2, 1)).astype(np.int32),
        "step_masks": np.stack([(slots >= prefix_start[:, None]) & (slots < FAST_PREFIX + s + 1) for s in steps])[
            :, :, None, :
        ],
        "step_positions": np.stack([prefill_len[:, None] + s + 1 for s in steps]).astype(np.int32),
    }


# ---------------------------------------------------------------------------------------------
# What each scenario computes


def _project(outs, cot) -> jax.Array:
    """A fixed random linear function of the outputs: its gradient reaches every output element."""
    pairs = zip(jax.tree.leaves(outs), jax.tree.leaves(cot), strict=True)
    return sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in pairs)


def _with_grads(loss: Callable, params, inputs) -> dict:
    (_, (out, kv_cache)), (d_params, d_inputs) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, inputs)
    return {"out": out, "kv_cache": kv_cache, "d_params": d_params, "d_inputs": d_inputs}


def _joint(model: nn.Module, params, data: Data) -> dict:
    def loss(params, inputs):
        outs, kv_cache = model.apply(
            {"params": params}, inputs["xs"], data["positions"], data["mask"], adarms_cond=inputs["cond"]
        )
        return _project(outs, data["cot"]), (outs, kv_cache)

    return _with_grads(loss, params, data["inputs"])


def _pi0_sample(model: nn.Module, params, data: Data) -> dict:
    def loss(params, inputs):
        variables = {"params": params}
        prefill, kv_cache = model.apply(
            variables, [inputs["prefix"], None], data["prefix_positions"], data["prefix_mask"]
        )
        suffix, _ = model.apply(
            variables, [None, inputs["suffix"]], data["suffix_positions"], data["suffix_mask"], kv_cache=kv_cache
        )
        assert prefill[1] is None and suffix[0] is None
        return _project(suffix, data["cot"]), ({"prefill": prefill, "suffix": suffix}, kv_cache)

    return _with_grads(loss, params, data["inputs"])


def _fast_train(model: nn.Module, params, data: Data) -> dict:
    def loss(params, inputs):
        logits, kv_cache = model.apply(
            {"params": params}, embedded_prefix=inputs, positions=data["positions"], mask=data["mask"]
        )
        return _project(logits, data["cot"]), (logits, kv_cache)

    return _with_grads(loss, params, data["inputs"])


def _fast_sample(model: nn.Module, params, data: Data) -> dict:
    variables = {"params": params}
    prefill, kv_cache = model.apply(
        variables,
        embedded_prefix=data["prefix"],
        mask=data["prefill_mask"],
        positions=data["prefix_positions"],
        decode=True,
    )

    def step(kv_cache, inputs):
        tokens, mask, positions = inputs
        embedded = model.apply(variables, tokens, embed_only=True)
        logits, kv_cache = model.apply(
            variables, embedded_prefix=embedded, mask=mask, positions=positions, decode=True, kv_cache=kv_cache
        )
        return kv_cache, logits

    kv_cache, decoded = jax.lax.scan(step, kv_cache, (data["tokens"], data["step_masks"], data["step_positions"]))
    return {"out": {"prefill": prefill, "decode": decoded}, "kv_cache": kv_cache}


# ---------------------------------------------------------------------------------------------
# Scenarios


def _gemma(adarms: bool, lora: bool) -> Callable[[str], nn.Module]:
    def build(dtype: str) -> nn.Module:
        configs = tuple(dataclasses.replace(c, lora_configs=LORA if lora else {}) for c in (EXPERT, ACTION_EXPERT))
        return gemma.Module(configs=configs, embed_dtype=dtype, adarms=adarms, vocab_size=VOCAB)

    return build


def _gemma_init(adarms: bool) -> Callable:
    # gemma.Module defines its own `init` (openpi's convenience method): reach linen's through the class.
    return lambda model, key: nn.Module.init(model, key, [False, adarms], method="init")


def _fast(lora: bool) -> Callable[[str], nn.Module]:
    def build(dtype: str) -> nn.Module:
        return gemma_fast.Module(
            width=EXPERT.width,
            depth=EXPERT.depth,
            mlp_dim=EXPERT.mlp_dim,
            num_heads=EXPERT.num_heads,
            num_kv_heads=EXPERT.num_kv_heads,
            head_dim=EXPERT.head_dim,
            vocab_size=VOCAB,
            embed_dtype=dtype,
            cache_dtype=dtype,  # as openpi's Pi0FAST builds it
            lora_configs=LORA if lora else {},
        )

    return build


def _fast_init(model: nn.Module, key: jax.Array):
    return nn.Module.init(model, key, method="init")


#: model name -> (build: embed dtype -> module, init: module, key -> variables)
MODELS: dict[str, tuple[Callable[[str], nn.Module], Callable[[nn.Module, jax.Array], Any]]] = {
    "pi0": (_gemma(adarms=False, lora=False), _gemma_init(False)),
    "pi05": (_gemma(adarms=True, lora=False), _gemma_init(True)),
    "pi05_lora": (_gemma(adarms=True, lora=True), _gemma_init(True)),
    "fast": (_fast(lora=False), _fast_init),
    "fast_lora": (_fast(lora=True), _fast_init),
}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    model: str  # a key of MODELS
    compute: Callable[[nn.Module, Any, Data], dict]  # model, params, data -> outputs (and gradients)
    data: Callable[[], dict[str, Data]]  # layout name -> inputs
    dtypes: tuple[str, ...] = ("float32", "bfloat16")

    def build(self, dtype: str) -> nn.Module:
        return MODELS[self.model][0](dtype)


def _pi0_layouts() -> dict[str, Data]:
    return {
        "padding_mid": _joint_data(layouts.pi0(2, PREFIX, actions=SUFFIX - 1, seed=0), 0, False),
        "masked_image": _joint_data(layouts.pi0(2, PREFIX, actions=SUFFIX - 1, masked_image=1, seed=1), 1, False),
        "causal": _joint_data(layouts.causal(2, PREFIX + SUFFIX), 2, False),
        "prefix_only": _joint_data(layouts.prefix_only(2, PREFIX + SUFFIX, pad=4), 3, False),
    }


def _pi05_layouts() -> dict[str, Data]:
    return {
        "pi05": _joint_data(layouts.pi0(2, PREFIX, actions=SUFFIX, state_token=False, seed=4), 4, True),
        "masked_image": _joint_data(
            layouts.pi0(2, PREFIX, actions=SUFFIX, state_token=False, masked_image=0, seed=5), 5, True
        ),
    }


def _batch1_layouts() -> dict[str, Data]:
    return {
        "pi05": _joint_data(layouts.pi0(1, PREFIX, actions=SUFFIX, state_token=False, seed=6), 6, True),
        "prefix_only": _joint_data(layouts.prefix_only(1, PREFIX + SUFFIX, pad=2), 7, True),
    }


def _fast_layouts(seed: int) -> dict[str, Data]:
    return {
        "masked_image": _fast_train_data(layouts.pi0_fast(2, PREFIX, causal=SUFFIX, masked_image=1, seed=seed), seed),
        "padding_mid": _fast_train_data(layouts.pi0_fast(2, PREFIX, causal=SUFFIX, seed=seed + 1), seed + 1),
    }


F32 = ("float32",)
SCENARIOS = {
    s.name: s
    for s in (
        Scenario("pi0", "pi0", _joint, _pi0_layouts),
        Scenario("pi05", "pi05", _joint, _pi05_layouts, F32),
        Scenario("pi05_lora_batch1", "pi05_lora", _joint, _batch1_layouts, F32),
        Scenario(
            "pi0_kv_cache",
            "pi0",
            _pi0_sample,
            lambda: {"padding_mid": _pi0_sample_data(8, None), "masked_image": _pi0_sample_data(9, 1)},
        ),
        Scenario("fast", "fast", _fast_train, lambda: _fast_layouts(10)),
        Scenario(
            "fast_decode",
            "fast",
            _fast_sample,
            lambda: {"masked_image": _fast_sample_data(12, 1), "padding": _fast_sample_data(13, None)},
        ),
        Scenario("fast_lora", "fast_lora", _fast_train, lambda: _fast_layouts(14), F32),
    )
}


def _settings(backend: str | None, verify: bool = False) -> contextlib.AbstractContextManager:
    return flashpatch.enable(backend, verify=verify) if backend else contextlib.nullcontext()


def _perturb(params, seed: int = 0):
    """Random values where openpi initialises to zero, and for LoRA factors, so that they matter."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        if "lora" in jax.tree_util.keystr(path) or not np.any(leaf):
            return (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(one, params)


def _initializer(model: str) -> Callable:
    build, init = MODELS[model]
    return fast_jit(lambda key: init(build("float32"), key)["params"])


@functools.cache
def initial_params(model: str):
    """The model's float32 parameters as init creates them, with flashpatch off."""
    return jax.device_get(_initializer(model)(jax.random.PRNGKey(0)))


@functools.cache
def params(name: str):
    """Scenario `name`'s parameters: its model's, perturbed."""
    return _perturb(initial_params(SCENARIOS[name].model))


@functools.cache
def data(name: str) -> dict[str, Data]:
    return SCENARIOS[name].data()


def fresh_program(name: str, dtype: str) -> Callable:
    """A newly jitted scenario function (nothing cached from other settings or backends)."""
    scenario = SCENARIOS[name]
    return fast_jit(functools.partial(scenario.compute, scenario.build(dtype)))


@functools.cache
def program(name: str, dtype: str) -> Callable:
    return fresh_program(name, dtype)


def evaluate(fn: Callable, name: str, backend: str | None, *, model_params=None, verify: bool = False) -> dict:
    """{layout: results} of `fn` on every layout of scenario `name`, with flashpatch as asked."""
    model_params = params(name) if model_params is None else model_params
    with _settings(backend, verify):
        return {layout: jax.device_get(fn(model_params, d)) for layout, d in data(name).items()}


@functools.cache
def results(name: str, dtype: str, backend: str | None) -> dict:
    return evaluate(program(name, dtype), name, backend)


# ---------------------------------------------------------------------------------------------
# Comparisons


def _table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """Leaf path -> (shape, dtype)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): (tuple(np.shape(x)), str(np.result_type(x))) for path, x in flat}


def assert_bitwise(got, want, what: str) -> None:
    assert_finite(got, what)
    assert _table(got) == _table(want), f"{what}: trees differ in structure, shapes or dtypes"
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if not np.array_equal(a, b):
            diff = np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))
            raise AssertionError(f"{what}{jax.tree_util.keystr(path)} is not bit-identical (max abs diff {diff:.3g})")


def assert_close(name: str, dtype: str, layout: str, got) -> None:
    """Every leaf within TOL[dtype] of the float32 model with flashpatch off (`got` may hold only
    some of the results, e.g. no gradients).

    A bfloat16 run may in addition be as far from float32 as openpi's own bfloat16 run is.
    """
    what = f"{name}/{layout}/{dtype}"
    assert_finite(got, what)
    want = {key: results(name, "float32", None)[layout][key] for key in got}
    own = {key: results(name, dtype, None)[layout][key] for key in got} if dtype != "float32" else want
    assert _table(got).keys() == _table(want).keys(), f"{what}: trees differ"
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    for (path, out), ref, base in zip(flat, jax.tree.leaves(want), jax.tree.leaves(own), strict=True):
        err, slack = rel_err(out, ref), rel_err(base, ref)
        assert err <= TOL[dtype] + slack, (
            f"{what}{jax.tree_util.keystr(path)}: rel.err {err:.2e} vs the float32 model > "
            f"TOL {TOL[dtype]} + openpi's own {dtype} error {slack:.2e}"
        )


RUNS = [pytest.param(name, dtype, id=f"{name}-{dtype}") for name, s in SCENARIOS.items() for dtype in s.dtypes]


@pytest.mark.parametrize(("name", "dtype"), RUNS)
def test_reference_backend_is_bit_exact(name: str, dtype: str) -> None:
    want = results(name, dtype, None)
    got = results(name, dtype, "reference")
    for layout in want:
        assert_bitwise(got[layout], want[layout], f"{name}/{layout}/{dtype}")


@pytest.mark.parametrize(("name", "dtype"), RUNS)
def test_xla_backend_matches_the_float32_model(name: str, dtype: str) -> None:
    for layout, got in results(name, dtype, "xla").items():
        assert_close(name, dtype, layout, got)


# ---------------------------------------------------------------------------------------------
# The comparisons can fail


class _DropsLastAttendedKey(XlaBackend):
    """A plausible bug: each row ignores the last key it may attend."""

    def attend(self, q, k, v, mask, problem):
        kv_len = mask.shape[-1]
        last = kv_len - 1 - jnp.argmax(mask[..., ::-1], axis=-1)
        return super().attend(q, k, v, mask & (jnp.arange(kv_len) != last[..., None]), problem)


#: One scenario per path through the adapters (LoRA adds nothing there).
BREAKABLE = ["pi0", "pi05", "pi0_kv_cache", "fast", "fast_decode"]


@pytest.mark.parametrize("name", BREAKABLE)
def test_a_broken_attention_is_caught(monkeypatch, use_backend, name: str) -> None:
    use_backend("xla", _DropsLastAttendedKey())
    for layout, got in evaluate(fresh_program(name, "float32"), name, "xla").items():
        with pytest.raises(AssertionError, match=r"rel\.err"):
            assert_close(name, "float32", layout, got)


def test_fully_masked_rows_matter_downstream(monkeypatch) -> None:
    """pi0-FAST decoding attends the slots of a missing image; in the second layer their keys come
    from rows that attended nothing in the first. openpi gives such rows the mean of V; a core that
    zeroed them would change the decoded logits. With only edge padding (outside the decode window)
    it would not, which is why the layouts include an interior hole."""

    def zeros(v, probs_dtype, num_heads):
        return jnp.zeros((v.shape[0], 1, num_heads, v.shape[3]), jnp.result_type(probs_dtype, v.dtype))

    monkeypatch.setattr(run, "empty_row_value", zeros)
    got = evaluate(fresh_program("fast_decode", "float32"), "fast_decode", "xla")
    want = results("fast_decode", "float32", None)
    hole = rel_err(got["masked_image"]["out"]["decode"], want["masked_image"]["out"]["decode"])
    edge = rel_err(got["padding"]["out"]["decode"], want["padding"]["out"]["decode"])
    assert hole > 100 * TOL["float32"], f"zeroed empty rows left decoding past a hole unchanged (rel.err {hole:.2e})"
    assert edge < TOL["float32"], f"edge padding changed decoding (rel.err {edge:.2e})"


# ---------------------------------------------------------------------------------------------
# Parameters and checkpoints


@pytest.mark.parametrize("model", ["pi05_lora", "fast_lora"])
def test_init_creates_the_same_parameters(use_backend, model: str) -> None:
    """Same names, shapes, dtypes and values (adaRMS and LoRA included; gemma_fast through openpi's init())."""
    counter = CountingXla()
    use_backend("xla", counter)
    with flashpatch.enable("xla"):
        patched = jax.device_get(_initializer(model)(jax.random.PRNGKey(0)))
    assert counter.calls > 0, "init did not go through flashpatch"
    assert_bitwise(patched, initial_params(model), f"{model} params")


def test_checkpoint_saved_unpatched_loads_into_the_patched_model() -> None:
    name = "pi0"
    saved = flax.serialization.to_bytes(params(name))
    with flashpatch.enable("xla"):
        template = jax.eval_shape(_initializer(SCENARIOS[name].model), jax.random.PRNGKey(0))
    loaded = flax.serialization.from_bytes(template, saved)
    assert _table(loaded) == _table(template), "the checkpoint does not fit the patched model's parameters"
    assert_bitwise(loaded, params(name), "loaded params")
    got = evaluate(program(name, "float32"), name, "xla", model_params=loaded)
    for layout, tree in got.items():
        assert_bitwise(tree, results(name, "float32", "xla")[layout], f"{name}/{layout} from checkpoint")
        assert_close(name, "float32", layout, tree)


# ---------------------------------------------------------------------------------------------
# How openpi wraps and transforms the model


def _pure_dict(state) -> dict:
    # nnx.to_pure_dict since flax 0.11; openpi's pinned flax 0.10 has only the State method.
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def _load_pure_dict(state, pure: dict) -> None:
    if hasattr(nnx, "replace_by_pure_dict"):
        nnx.replace_by_pure_dict(state, pure)
    else:
        state.replace_by_pure_dict(pure)


def test_through_nnx_bridge(use_backend) -> None:
    """openpi's Pi0 holds its Gemma as nnx_bridge.ToNNX(module), created with lazy_init(method="init")
    under nnx.eval_shape, and loads parameters into that state."""
    counter = CountingXla()
    use_backend("xla", counter)
    name = "pi05"
    model = SCENARIOS[name].build("float32")

    def create(key):
        llm = nnx_bridge.ToNNX(model)
        llm.lazy_init(rngs=nnx.Rngs(key), method="init", use_adarms=[False, True])
        return llm

    with flashpatch.enable("xla"):
        abstract = nnx.eval_shape(create, jax.random.key(0))
    graphdef, state = nnx.split(abstract)
    assert _table(_pure_dict(state)) == _table(params(name)), "ToNNX under flashpatch made other parameters"
    _load_pure_dict(state, params(name))

    def forward(state, d: Data):
        outs, kv_cache = nnx.merge(graphdef, state)(
            d["inputs"]["xs"], d["positions"], d["mask"], adarms_cond=d["inputs"]["cond"]
        )
        return {"out": outs, "kv_cache": kv_cache}

    counter.calls = 0
    got = evaluate(fast_jit(forward), name, "xla", model_params=state)
    assert counter.calls > 0, "the bridged model did not go through flashpatch"
    for layout, tree in got.items():
        assert_close(name, "float32", layout, tree)


def test_under_vmap(use_backend) -> None:
    """vmap over examples (each a batch of one) gives what the batched model gives."""
    counter = CountingXla()
    use_backend("xla", counter)
    name = "pi0"
    scenario = SCENARIOS[name]
    per_example = jax.vmap(functools.partial(scenario.compute, scenario.build("float32")), in_axes=(None, 0))
    batched = fast_jit(lambda p, d: per_example(p, jax.tree.map(lambda x: x[:, None], d)))
    got = evaluate(batched, name, "xla")
    assert counter.calls > 0, "vmap did not go through flashpatch"
    depth = EXPERT.depth
    for layout, tree in got.items():
        regrouped = {
            "out": jax.tree.map(lambda x: x[:, 0], tree["out"]),
            "kv_cache": jax.tree.map(lambda x: np.swapaxes(x, 0, 1).reshape(depth, -1, *x.shape[3:]), tree["kv_cache"]),
            "d_params": jax.tree.map(lambda x: x.sum(0), tree["d_params"]),
            "d_inputs": jax.tree.map(lambda x: x[:, 0], tree["d_inputs"]),
        }
        assert_close(name, "float32", layout, regrouped)


# ---------------------------------------------------------------------------------------------
# Verify mode and bad input


_VERIFY = re.compile(r"flashpatch verify: (\S+) via xla differs from the original by rel\.err (\S+)")


@pytest.mark.skipif(not verify.works_in_flax_scan(), reason="this JAX/flax rejects callbacks inside nn.scan")
def test_verify_mode_logs_each_target_once_and_then_only_larger_differences(monkeypatch, caplog) -> None:
    """enable(verify=True) logs, per target, its first difference from openpi's einsum and after that
    only a difference larger than any logged before (marked "new largest"); the same work again
    logs nothing."""
    monkeypatch.setattr(verify, "log", verify.VerifyLog())
    caplog.set_level(logging.INFO, logger="flashpatch")

    def run_both() -> list[tuple[str, float, str]]:
        caplog.clear()
        for name in ("pi0", "fast"):
            for layout, tree in evaluate(program(name, "float32"), name, "xla", verify=True).items():
                assert_close(name, "float32", layout, tree)
        records = [r for r in caplog.records if r.name == "flashpatch" and "verify" in r.getMessage()]
        assert all(r.levelno == logging.INFO for r in records), "an agreement was logged above INFO"
        messages = [r.getMessage() for r in records]
        parsed = [(_VERIFY.search(m), m) for m in messages]
        assert all(match for match, _ in parsed), messages
        return [(match.group(1), float(match.group(2)), m) for match, m in parsed]

    first = run_both()
    for site in (GEMMA_SITE, FAST_SITE):
        logged = [(err, message) for s, err, message in first if s == site]
        assert logged, f"verify mode logged nothing for {site}: {first}"
        assert "new largest" not in logged[0][1] and all("new largest" in m for _, m in logged[1:]), logged
        errors = [err for err, _ in logged]
        assert errors == sorted(errors), f"{site}: a logged difference was smaller than an earlier one: {errors}"
        assert errors[-1] < TOL["float32"], logged
    again = run_both()
    assert not again, f"verify mode logged the same differences again: {again}"


def test_verify_mode_says_when_it_cannot_report(monkeypatch) -> None:
    """Where flax's nn.scan rejects callbacks, verify mode warns once per target and the model still runs."""
    monkeypatch.setattr(verify, "works_in_flax_scan", lambda: False)
    jax.clear_caches()  # the verify=True program may already be traced (by the test above)
    with pytest.warns(flashpatch.FlashpatchWarning, match="verify mode cannot report"):
        for layout, tree in evaluate(program("pi0", "float32"), "pi0", "xla", verify=True).items():
            assert_close("pi0", "float32", layout, tree)


def test_wrong_mask_shape_names_attn_mask() -> None:
    pi0, fast = SCENARIOS["pi0"], SCENARIOS["fast"]
    d = data("pi0")["padding_mid"]
    short = {**d, "mask": d["mask"][:, :, :-1]}
    with flashpatch.enable("xla"), pytest.raises(ValueError, match="attn_mask"):
        jax.eval_shape(functools.partial(pi0.compute, pi0.build("float32")), params("pi0"), short)
    d = data("fast")["padding_mid"]
    short = {**d, "mask": d["mask"][:, :, :-1]}
    with flashpatch.enable("xla"), pytest.raises(ValueError, match="attn_mask"):
        jax.eval_shape(functools.partial(fast.compute, fast.build("float32")), params("fast"), short)


def test_wrong_mask_dtype_names_attn_mask() -> None:
    q = jnp.zeros((1, 3, 4, 16))
    k = jnp.zeros((1, 3, 1, 16))
    with pytest.raises(TypeError, match="attn_mask"):
        flashpatch.attention(q, k, k, jnp.ones((1, 1, 3, 3), jnp.float32))


def test_numeric_masks_work_as_in_openpi() -> None:
    """openpi masks with jnp.where(attn_mask, ...), so any nonzero entry attends; gemma_fast.Module
    builds a float mask itself when given none (as openpi's gemma_fast.Module.init does)."""
    model = SCENARIOS["fast"].build("float32")
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5) % VOCAB
    forward = fast_jit(lambda p: model.apply({"params": p}, tokens))
    want = jax.device_get(forward(params("fast")))
    with flashpatch.enable("reference"):
        got = jax.device_get(forward(params("fast")))
    assert_bitwise(got, want, "gemma_fast with its default float mask")
