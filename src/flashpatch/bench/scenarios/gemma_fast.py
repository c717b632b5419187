"""pi0-FAST's Gemma: prefill the KV cache, then decode token by token, as pi0_fast.sample_actions does.

The cache has a fixed size (prefill length + decode steps); the prefix is left-to-right aligned
(padding first) and each decode step attends the filled slots [prefix start, prefill + step].
Parameters in bf16 (as openpi's policies load them), cache in bf16 (openpi's cache_dtype).
Decoding runs a fixed number of greedy steps (no early stop at EOS) inside one jitted loop.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flashpatch.bench.harness import Harness, Lazy, Variant
from flashpatch.bench.records import Record
from flashpatch.testing import gemma, gemma_fast, layouts, register


def make_model(harness: Harness) -> gemma_fast.Module:
    o = harness.options
    cfg = gemma.get_config(o.prefix_expert, depth=o.depth)
    return gemma_fast.Module(
        width=cfg.width,
        depth=cfg.depth,
        mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=o.vocab_size,
        embed_dtype="bfloat16",
        cache_dtype="bfloat16",
    )


def make_params(model: gemma_fast.Module, key: jax.Array):
    """bf16 parameters; the embedding is random (its zero init would make every decoded token zero)."""
    init_key, embed_key = jax.random.split(key)
    params = nn.Module.init(model, init_key, tokens=jnp.zeros((1, 1), jnp.int32))["params"]
    table = params["embedder"]["input_embedding"]
    params["embedder"]["input_embedding"] = jax.random.normal(embed_key, table.shape) * 0.02
    return jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)


def left_to_right_align(valid: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """openpi's left_to_right_align: roll each row so that its trailing padding comes first."""
    valid, mask = valid.copy(), mask.copy()
    for b in range(valid.shape[0]):
        shift = -(int(np.max(np.nonzero(valid[b])[0])) + 1)
        valid[b] = np.roll(valid[b], shift)
        mask[b] = np.roll(mask[b], shift, axis=(0, 1))
    return valid, mask


@dataclasses.dataclass(frozen=True)
class Prompt:
    embedded: jax.Array  # (B, P, D) bf16: images + prompt, left-to-right aligned
    positions: jax.Array  # (B, P)
    mask: jax.Array  # (B, P, P + decode_steps): the prefix mask, padded to the cache size
    prefill_len: jax.Array  # (B,) valid prefix tokens
    prefix_start: jax.Array  # (B,) first valid slot


jax.tree_util.register_dataclass(
    Prompt, data_fields=["embedded", "positions", "mask", "prefill_len", "prefix_start"], meta_fields=[]
)


def make_prompts(harness: Harness, model: gemma_fast.Module, cache_size: int) -> list[Prompt]:
    o = harness.options
    prefill = cache_size - o.decode_steps
    layout = layouts.pi0_fast(o.decode_batch, prefill, causal=0, seed=o.seed)  # prompt padding at the end
    valid, mask = left_to_right_align(layout.valid, layout.mask)
    mask = np.pad(mask, ((0, 0), (0, 0), (0, o.decode_steps)))
    prefill_len = valid.sum(-1)
    shared = dict(  # the layout is the same for every input set: one device copy
        positions=jnp.asarray(np.cumsum(valid, axis=1) - 1, jnp.int32),
        mask=jnp.asarray(mask),
        prefill_len=jnp.asarray(prefill_len, jnp.int32),
        prefix_start=jnp.asarray(prefill - prefill_len, jnp.int32),
    )
    out = []
    for i in range(o.input_sets):
        key = jax.random.PRNGKey(o.seed * 1000 + 300 + i)
        embedded = jax.random.normal(key, (o.decode_batch, prefill, model.width)).astype(jnp.bfloat16)
        out.append(Prompt(embedded=embedded, **shared))
    return out


def make_decoder(model: gemma_fast.Module, steps: int):
    def prefill(params, prompt: Prompt):
        logits, cache = model.apply(
            {"params": params},
            embedded_prefix=prompt.embedded,
            positions=prompt.positions,
            mask=prompt.mask,
            decode=True,
        )
        return logits[:, -1:], cache

    def decode(params, last_logit, cache, prompt: Prompt):
        prefill_size = prompt.embedded.shape[1]
        slots = jnp.arange(prefill_size + steps)[None, None, :]

        def step(i, carry):
            last_logit, cache = carry
            token = jnp.argmax(last_logit, axis=-1)
            mask = (slots >= prompt.prefix_start[:, None, None]) & (slots < prefill_size + i + 1)
            positions = prompt.prefill_len[:, None] + i + 1  # as openpi's sample_actions numbers them
            return model.apply(
                {"params": params}, tokens=token, positions=positions, mask=mask, decode=True, kv_cache=cache
            )

        last_logit, _ = lax.fori_loop(0, steps, step, (last_logit, cache))
        return last_logit

    return prefill, decode


def _cases(harness: Harness, variant: Variant, size: int, model, params: Lazy, prompts: Lazy[list[Prompt]]):
    """Two bodies sharing state: prefill (times it, keeps the caches) and decode (uses them)."""
    o = harness.options
    prefill, decode = make_decoder(model, o.decode_steps)
    shared: dict[str, object] = {}

    def prefill_body(rec: Record) -> None:
        data, weights = prompts.get(), params.get()
        n = len(data)
        compiled = harness.compile(rec, variant, prefill, weights, data[0], context=variant.model_context())
        result = harness.time(rec, "prefill", lambda i: compiled(weights, data[i % n]))
        shared["filled"] = [compiled(weights, prompt) for prompt in data]
        harness.compare_to_einsum(rec, "rel_diff_vs_einsum", shared["filled"][0][0])
        rec.ms = result.median_ms
        rec.metrics["tokens_per_s"] = o.decode_batch * data[0].embedded.shape[1] * 1e3 / result.median_ms

    def decode_body(rec: Record) -> None:
        data, weights = prompts.get(), params.get()
        filled = shared.pop("filled")
        n = len(data)
        compiled = harness.compile(rec, variant, decode, weights, *filled[0], data[0], context=variant.model_context())
        result = harness.time(rec, "decode", lambda i: compiled(weights, *filled[i % n], data[i % n]))
        rec.ms = result.median_ms / o.decode_steps
        rec.metrics["decode_ms"] = result.median_ms
        rec.metrics["tokens_per_s"] = o.decode_batch * o.decode_steps * 1e3 / result.median_ms

    return prefill_body, decode_body, shared


def run(harness: Harness) -> None:
    register()
    o = harness.options
    model = make_model(harness)
    harness.budget.begin("gemma_fast")
    params = Lazy(lambda: jax.jit(functools.partial(make_params, model))(jax.random.PRNGKey(o.seed)))
    for size in o.cache_sizes:
        prompts = Lazy(functools.partial(make_prompts, harness, model, size))
        for variant in harness.variants:
            prefill_body, decode_body, shared = _cases(harness, variant, size, model, params, prompts)
            first = harness.run_case("gemma_fast", "prefill", variant, size, o.decode_batch, prefill_body)
            if first.status == "ok":
                harness.run_case("gemma_fast", "decode", variant, size, o.decode_batch, decode_body)
            else:
                harness.run_case(
                    "gemma_fast",
                    "decode",
                    variant,
                    size,
                    o.decode_batch,
                    lambda rec, why=first.status: harness.skip(rec, f"prefill {why}"),
                )
            shared.clear()
        prompts.drop()
    params.drop()
