"""pi0's two-expert Gemma (prefix expert + action expert): a full training step, and pi0's inference.

Training: loss + gradients + AdamW update of every Gemma parameter (float32, as openpi trains),
bf16 activations, remat per layer as openpi's Gemma does, prefix + suffix in one pass with pi0's
mask. The loss stands in for pi0's flow-matching loss (mean squared error on the action tokens'
outputs); SigLIP and the small action/time projections are left out, their cost does not depend
on the attention path.

Inference as pi0.sample_actions does it: prefill the prefix into the KV cache, then
`denoise_steps` passes of the suffix (state + action tokens) over the cache, each feeding the next
(x <- x + dt * out stands in for the Euler step on the projected velocity). Parameters in bf16, as
openpi's policies load them.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from flashpatch.bench.harness import Harness, Lazy, Variant
from flashpatch.bench.optimizer import openpi_adamw
from flashpatch.bench.records import Record
from flashpatch.testing import gemma, layouts, register

#: The step's embedder is unused (inputs arrive embedded, as pi0 passes them), so keep it tiny.
UNUSED_VOCAB = 8


def make_model(harness: Harness) -> gemma.Module:
    o = harness.options
    configs = [gemma.get_config(o.prefix_expert, depth=o.depth), gemma.get_config(o.action_expert, depth=o.depth)]
    return gemma.Module(configs=configs, embed_dtype="bfloat16", vocab_size=UNUSED_VOCAB)


def init_params(model: gemma.Module, key: jax.Array):
    return nn.Module.init(model, key, [False, False], method=gemma.Module.init)["params"]


@dataclasses.dataclass(frozen=True)
class TrainBatch:
    prefix: jax.Array  # (B, P, D_prefix) bf16
    suffix: jax.Array  # (B, A + 1, D_action) bf16: state token + action tokens
    positions: jax.Array  # (B, T) int32
    mask: jax.Array  # (B, T, T) bool
    target: jax.Array  # (B, A, D_action) float32


jax.tree_util.register_dataclass(
    TrainBatch, data_fields=["prefix", "suffix", "positions", "mask", "target"], meta_fields=[]
)


def _widths(model: gemma.Module) -> tuple[int, int]:
    return model.configs[0].width, model.configs[1].width


def make_train_batches(harness: Harness, model: gemma.Module, size: int) -> list[TrainBatch]:
    o = harness.options
    prefix_len = size - o.action_horizon - 1
    layout = layouts.pi0(o.train_batch, prefix_len, actions=o.action_horizon, masked_image=1, seed=o.seed)
    wp, wa = _widths(model)
    positions, mask = jnp.asarray(layout.positions), jnp.asarray(layout.mask)  # one (B, T, T) mask, shared
    out = []
    for i in range(o.input_sets):
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(o.seed * 1000 + 100 + i), 3)
        out.append(
            TrainBatch(
                prefix=jax.random.normal(k1, (o.train_batch, prefix_len, wp)).astype(jnp.bfloat16),
                suffix=jax.random.normal(k2, (o.train_batch, o.action_horizon + 1, wa)).astype(jnp.bfloat16),
                positions=positions,
                mask=mask,
                target=jax.random.normal(k3, (o.train_batch, o.action_horizon, wa)),
            )
        )
    return out


def make_train_step(model: gemma.Module, optimizer, actions: int):
    def loss_fn(params, batch: TrainBatch):
        (_, suffix_out), _ = model.apply({"params": params}, [batch.prefix, batch.suffix], batch.positions, batch.mask)
        return jnp.mean(jnp.square(suffix_out[:, -actions:].astype(jnp.float32) - batch.target))

    def step(params, opt_state, batch: TrainBatch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _train_case(harness, variant: Variant, size: int, init, opt_init, step, batches: Lazy[list[TrainBatch]]):
    o = harness.options

    def body(rec: Record) -> None:
        data = batches.get()
        params = init.get()(jax.random.PRNGKey(o.seed))  # same parameters for every variant
        opt_state = opt_init(params)
        compiled = harness.compile(
            rec, variant, step, params, opt_state, data[0], context=variant.model_context(), donate=(0, 1)
        )
        state = [params, opt_state]
        del params, opt_state
        losses = []

        def call(i: int):
            state[0], state[1], loss = compiled(state[0], state[1], data[i % len(data)])
            losses.append(loss)
            return loss, state  # waited on whole: the step ends with the optimizer update

        result = harness.time(rec, "step", call, group_small_calls=False)
        harness.compare_to_einsum(rec, "loss_rel_diff_vs_einsum", losses[0])
        if not all(np.isfinite(float(loss)) for loss in losses):
            raise FloatingPointError("training loss became NaN or inf")
        rec.ms = result.median_ms
        rec.metrics["steps_per_s"] = 1e3 / result.median_ms
        rec.metrics["tokens_per_s"] = o.train_batch * size * 1e3 / result.median_ms
        state.clear()

    return body


@dataclasses.dataclass(frozen=True)
class InferInputs:
    prefix: jax.Array  # (B, P, D_prefix)
    prefix_positions: jax.Array
    prefix_mask: jax.Array  # (B, P, P)
    noise: jax.Array  # (B, A + 1, D_action): the suffix tokens at t = 1
    suffix_positions: jax.Array  # (B, A + 1)
    suffix_mask: jax.Array  # (B, A + 1, P + A + 1)


jax.tree_util.register_dataclass(
    InferInputs,
    data_fields=["prefix", "prefix_positions", "prefix_mask", "noise", "suffix_positions", "suffix_mask"],
    meta_fields=[],
)


def make_infer_inputs(harness: Harness, model: gemma.Module, size: int) -> list[InferInputs]:
    o = harness.options
    prefix_len = size - o.action_horizon - 1
    full = layouts.pi0(o.infer_batch, prefix_len, actions=o.action_horizon, masked_image=1, seed=o.seed)
    prefix_valid = full.valid[:, :prefix_len]
    suffix = layouts.pi0(o.infer_batch, 0, actions=o.action_horizon)
    suffix_positions = prefix_valid.sum(-1)[:, None] + np.cumsum(suffix.valid, axis=1) - 1
    wp, wa = _widths(model)
    shared = dict(  # the layout is the same for every input set: one device copy
        prefix_positions=jnp.asarray(full.positions[:, :prefix_len]),
        prefix_mask=jnp.asarray(full.mask[:, :prefix_len, :prefix_len]),
        suffix_positions=jnp.asarray(suffix_positions, jnp.int32),
        suffix_mask=jnp.asarray(layouts.suffix_over_cache(prefix_valid, suffix)),
    )
    out = []
    for i in range(o.input_sets):
        k1, k2 = jax.random.split(jax.random.PRNGKey(o.seed * 1000 + 200 + i))
        out.append(
            InferInputs(
                prefix=jax.random.normal(k1, (o.infer_batch, prefix_len, wp)).astype(jnp.bfloat16),
                noise=jax.random.normal(k2, (o.infer_batch, o.action_horizon + 1, wa)).astype(jnp.bfloat16),
                **shared,
            )
        )
    return out


def make_sampler(model: gemma.Module, steps: int):
    """pi0.sample_actions' two phases: prefill (prefix -> KV cache) and the denoising loop over the cache."""

    def prefill(params, x: InferInputs):
        _, cache = model.apply({"params": params}, [x.prefix, None], x.prefix_positions, x.prefix_mask)
        return cache

    def denoise(params, cache, x: InferInputs):
        dt = -1.0 / steps

        def step(_, tokens):
            (_, out), _ = model.apply(
                {"params": params}, [None, tokens], x.suffix_positions, x.suffix_mask, kv_cache=cache
            )
            return (tokens + dt * out).astype(tokens.dtype)

        return lax.fori_loop(0, steps, step, x.noise)

    return prefill, denoise


def _infer_case(harness, variant: Variant, size: int, model, params: Lazy, inputs: Lazy[list[InferInputs]]):
    o = harness.options
    prefill, denoise = make_sampler(model, o.denoise_steps)

    def body(rec: Record) -> None:
        data, weights = inputs.get(), params.get()
        n = len(data)
        prefill_c = harness.compile(rec, variant, prefill, weights, data[0], context=variant.model_context())
        caches = [prefill_c(weights, x) for x in data]
        denoise_c = harness.compile(rec, variant, denoise, weights, caches[0], data[0], context=variant.model_context())
        t_prefill = harness.time(rec, "prefill", lambda i: prefill_c(weights, data[i % n]), primary=False)
        t_denoise = harness.time(
            rec, "denoise", lambda i: denoise_c(weights, caches[i % n], data[i % n]), primary=False
        )
        total = harness.time(rec, "sample", lambda i: denoise_c(weights, prefill_c(weights, data[i % n]), data[i % n]))
        harness.compare_to_einsum(rec, "rel_diff_vs_einsum", denoise_c(weights, prefill_c(weights, data[0]), data[0]))
        rec.ms = total.median_ms
        rec.metrics["prefill_ms"] = t_prefill.median_ms
        rec.metrics["denoise_ms"] = t_denoise.median_ms
        tokens = data[0].prefix.shape[1] + o.denoise_steps * data[0].noise.shape[1]
        rec.metrics["tokens_per_s"] = o.infer_batch * tokens * 1e3 / total.median_ms

    return body


def run(harness: Harness) -> None:
    register()
    o = harness.options
    model = make_model(harness)
    init = Lazy(lambda: jax.jit(functools.partial(init_params, model)))

    optimizer = openpi_adamw()
    opt_init = jax.jit(optimizer.init)
    step = make_train_step(model, optimizer, o.action_horizon)

    harness.budget.begin("gemma/train")
    for size in o.train_sizes:
        batches = Lazy(functools.partial(make_train_batches, harness, model, size))
        for variant in harness.variants:
            body = _train_case(harness, variant, size, init, opt_init, step, batches)
            harness.run_case("gemma", "train", variant, size, o.train_batch, body)
        batches.drop()

    harness.budget.begin("gemma/infer")
    params = Lazy(lambda: jax.tree.map(lambda p: p.astype(jnp.bfloat16), init.get()(jax.random.PRNGKey(o.seed))))
    for size in o.infer_sizes:
        inputs = Lazy(functools.partial(make_infer_inputs, harness, model, size))
        for variant in harness.variants:
            harness.run_case(
                "gemma",
                "infer",
                variant,
                size,
                o.infer_batch,
                _infer_case(harness, variant, size, model, params, inputs),
            )
        inputs.drop()
    params.drop()
