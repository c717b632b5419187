"""openpi's own models, unpatched against flashpatch, with the attention-free step as the ceiling.

Cases (each for every variant: the einsum, each backend asked for, `auto`, the ceiling):

- `<model>_train`: one training step of openpi's `compute_loss(train=True)` (its image augmentation,
  remat and scan included), loss and gradients of every parameter, AdamW with global-norm clipping as
  openpi's default optimizer; float32 parameters, bf16 compute. pi0, pi0.5 and pi0-FAST at their default
  prompt lengths; pi0 and pi0-FAST with a long prompt (`*_long_train`); pi0 with a huge one
  (`pi0_huge_train`, asked for by name). pi0-FAST's training rows end in a causal run: the second half of
  each row's prompt tokens, as its action tokens are.
- `<model>_sample`: `sample_actions` (pi0 / pi0.5: prefill + 10 denoising steps; pi0-FAST: prefill and
  greedy decoding with the KV cache), bf16 parameters as openpi's policies load them.
- `pi0_fit` (asked for by name): the largest prompt that trains pi0 at the long-prompt batch on this
  device, einsum against `auto` (whatever --backends says), over the prompt lengths `openpi_fit_prompts`.

Every batch is openpi's fake observation filled with random images, state and tokens, prompts padded
to random lengths and the second camera missing in every third row, so that the masks have padding in
the middle. Gradient agreement: step 0's loss and gradients against the same model and batch computed
in float32 (openpi's `dtype="float32"`), for the einsum and for flashpatch alike.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashpatch.bench import ceiling, openpi_models
from flashpatch.bench.harness import EINSUM, Harness, Lazy, Variant
from flashpatch.bench.optimizer import openpi_adamw
from flashpatch.bench.records import Record

#: pi0-FAST tokens decoded per sample_actions call (openpi's default is 256, with an early stop at EOS).
DECODE_STEPS = 64


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str  # pi0 | pi05 | pi0_fast
    kind: str  # train | sample
    batch: int
    max_token_len: int | None = None  # None: the model's default


def cases(options) -> list[Case]:
    o = options
    prompt = o.openpi_long_prompt
    every = {
        "pi0_train": Case("pi0_train", "pi0", "train", o.openpi_batch),
        "pi05_train": Case("pi05_train", "pi05", "train", o.openpi_batch),
        "pi0_long_train": Case("pi0_long_train", "pi0", "train", o.openpi_long_batch, prompt),
        "pi0_huge_train": Case("pi0_huge_train", "pi0", "train", o.openpi_long_batch, o.openpi_huge_prompt),
        "pi0_fast_train": Case("pi0_fast_train", "pi0_fast", "train", o.openpi_batch),
        "pi0_fast_long_train": Case("pi0_fast_long_train", "pi0_fast", "train", o.openpi_long_batch, prompt),
        "pi0_sample": Case("pi0_sample", "pi0", "sample", 1),
        "pi05_sample": Case("pi05_sample", "pi05", "sample", 1),
        "pi0_fast_sample": Case("pi0_fast_sample", "pi0_fast", "sample", 1),
    }
    return [every[name] for name in o.openpi_cases if name in every]


def _config(models: openpi_models.Models, case: Case, dtype: str, max_token_len: int | None = None):
    length = max_token_len or case.max_token_len
    extra = {} if length is None else {"max_token_len": length}
    if case.model == "pi0_fast":
        return models.pi0_fast(dtype=dtype, **extra)
    return models.pi0(pi05=case.model == "pi05", dtype=dtype, **extra)


@dataclasses.dataclass
class Batch:
    """Observation and actions as a flat list of arrays, to pass to jitted steps as arguments.

    Arguments, not closed-over constants: XLA would fold the masks' analysis at compile time. Flat: JAX's
    argument bookkeeping rebuilds pytrees around placeholders, which openpi's type-checked Observation rejects.
    """

    leaves: list
    treedef: Any

    def unpack(self, leaves: list | None = None):
        """(observation, actions), from `leaves` (tracers inside a step) or the stored arrays."""
        return jax.tree.unflatten(self.treedef, self.leaves if leaves is None else leaves)


def fill_batch(config, batch: int, seed: int, train: bool = False) -> Batch:
    """openpi's fake observation and actions with random content, padded prompts, a missing camera."""
    rng = np.random.default_rng(seed)
    obs = config.fake_obs(batch)
    actions = config.fake_act(batch)
    images = {k: jnp.asarray(rng.uniform(-1, 1, v.shape), v.dtype) for k, v in obs.images.items()}
    masks = {k: jnp.ones(v.shape, jnp.bool_) for k, v in obs.image_masks.items()}
    second = list(masks)[1]
    masks[second] = jnp.asarray(np.arange(batch) % 3 != 2)  # missing in every third row
    tokens = obs.tokenized_prompt.shape[1]
    lengths = rng.integers(max(1, tokens // 4), tokens + 1, batch)
    prompt_mask = np.arange(tokens)[None, :] < lengths[:, None]
    prompt = np.where(prompt_mask, rng.integers(2, 1000, (batch, tokens)), 0)
    fields = dict(
        images=images,
        image_masks=masks,
        state=jnp.asarray(rng.normal(size=obs.state.shape), obs.state.dtype),
        tokenized_prompt=jnp.asarray(prompt, obs.tokenized_prompt.dtype),
        tokenized_prompt_mask=jnp.asarray(prompt_mask),
    )
    if getattr(obs, "token_ar_mask", None) is not None:
        # pi0-FAST: training rows end in a causal run (openpi's tokenizer puts the action tokens there);
        # here the second half of each row's tokens. At sampling, the prompt is all prefix.
        causal = prompt_mask & (np.arange(tokens)[None, :] >= (lengths // 2)[:, None]) if train else False
        fields["token_ar_mask"] = jnp.asarray(np.asarray(causal, bool) & prompt_mask, obs.token_ar_mask.dtype)
        fields["token_loss_mask"] = jnp.asarray(prompt_mask & causal if train else prompt_mask)
    leaves, treedef = jax.tree.flatten(
        (obs.replace(**fields), jnp.asarray(rng.uniform(-1, 1, actions.shape), actions.dtype))
    )
    return Batch(leaves, treedef)


class Built:
    """One model: graph, parameters (float32) and the rest of its state, built once per case."""

    def __init__(self, config, seed: int):
        from flax import nnx

        import flashpatch

        with flashpatch.disable():  # creating the model traces its init; no need for flashpatch there
            model = config.create(jax.random.key(seed))
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.params = _fill_zeros(params, seed)
        self.action_horizon = config.action_horizon

    def merged(self, params, graphdef=None):
        from flax import nnx

        return nnx.merge(graphdef or self.graphdef, params, self.rest)


def _fill_zeros(params, seed: int, scale: float = 0.02):
    """Zero-initialised parameters get small random values, as a trained checkpoint has.

    openpi starts some weights at zero (pi0.5's adaRMS modulation, which gates the action expert's
    attention and MLP to nothing; every RMSNorm scale). Left at zero, the actions would not depend on
    attention at all and a comparison of outputs could not fail; the timings are unaffected either way.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 17), len(leaves))
    filled = [
        scale * jax.random.normal(key, leaf.shape, leaf.dtype)
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.any(leaf))
        else leaf
        for leaf, key in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, filled)


def _train_fns(built: Built, batch: Batch, seed: int):
    optimizer = openpi_adamw()

    def loss_fn(params, leaves, step, graphdef=None):
        obs, actions = batch.unpack(leaves)
        rng = jax.random.fold_in(jax.random.key(seed), step)
        model = built.merged(params, graphdef)
        return jnp.mean(model.compute_loss(rng, obs, actions, train=True))

    def step(params, opt_state, leaves, step_index):
        import optax

        loss, grads = jax.value_and_grad(loss_fn)(params, leaves, step_index)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer, loss_fn, step


def sequence_length(built: Built, batch: Batch, case: Case) -> int:
    """Tokens per sequence that attention sees: the embedded prefix, plus pi0's suffix in training."""
    embed = "embed_inputs" if case.model == "pi0_fast" else "embed_prefix"

    def prefix_of(params, leaves):
        return getattr(built.merged(params), embed)(batch.unpack(leaves)[0])[0]

    prefix = jax.eval_shape(prefix_of, built.params, batch.leaves).shape[1]
    if case.model == "pi0_fast" or case.kind == "sample":
        return prefix
    return prefix + built.action_horizon + (0 if case.model == "pi05" else 1)


def _sequence_lazy(built: Lazy, data: Lazy, case: Case) -> Lazy:
    """The case's sequence length, traced once for all its variants."""
    return Lazy(lambda: sequence_length(built.get(), data.get(), case))


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = cost.get("flops") if isinstance(cost, dict) else None
    return float(flops) if flops else None


def _train_body(harness: Harness, variant: Variant, case: Case, built: Lazy, data: Lazy, grads: Lazy, seq: Lazy):
    o = harness.options

    def body(rec: Record) -> None:
        model, batch = built.get(), data.get()
        optimizer, loss_fn, step = _train_fns(model, batch, o.seed)
        params = jax.tree.map(jnp.copy, model.params)
        opt_state = optimizer.init(params)
        compiled = harness.compile(
            rec,
            variant,
            step,
            params,
            opt_state,
            batch.leaves,
            np.int32(0),
            context=variant.model_context(),
            donate=(0, 1),
        )
        flops = _flops(compiled)
        if flops:
            rec.metrics["gflop_per_step"] = flops / 1e9
        state = [params, opt_state]
        del params, opt_state
        losses = []

        def call(i: int):
            state[0], state[1], loss = compiled(state[0], state[1], batch.leaves, np.int32(i))
            losses.append(loss)
            return loss, state

        rec.metrics["seq_len"] = seq.get()
        result = harness.time(rec, "step", call, group_small_calls=False)
        if not all(np.isfinite(float(x)) for x in losses):
            raise FloatingPointError("training loss became NaN or inf")
        rec.ms = result.median_ms
        rec.metrics["loss_step0"] = float(losses[0])
        rec.metrics["steps_per_s"] = 1e3 / result.median_ms
        state.clear()
        if o.openpi_grad_check and case.name != "fit" and variant.name != ceiling.NAME:
            _grad_agreement(rec, variant, model, batch, loss_fn, grads)

    return body


def _grad_agreement(rec: Record, variant: Variant, model: Built, batch: Batch, loss_fn, grads: Lazy) -> None:
    """Loss and gradients at step 0 against the float32 model, as rel. errors (global over all parameters)."""
    ref_loss, ref_grads = grads.get()
    with variant.model_context():
        loss, got = jax.jit(jax.value_and_grad(loss_fn))(model.params, batch.leaves, np.int32(0))
    rec.metrics["grad_rel_err_vs_f32"] = tree_rel_err(got, ref_grads)
    rec.metrics["loss_rel_err_vs_f32"] = abs(float(loss) - ref_loss) / max(abs(ref_loss), 1e-30)


def tree_rel_err(got, ref) -> float:
    """||got - ref|| / ||ref|| over every leaf of two gradient trees at once; NaN or inf anywhere raises."""

    @jax.jit
    def sums(got, ref):
        pairs = zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
        squares = [(jnp.sum(jnp.square(g.astype(jnp.float32) - r)), jnp.sum(jnp.square(r))) for g, r in pairs]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(got)]))
        return sum(d for d, _ in squares), sum(n for _, n in squares), finite

    diff, norm, finite = sums(got, ref)
    if not bool(finite):
        raise FloatingPointError("gradients have NaN or inf")
    return float(jnp.sqrt(diff) / jnp.maximum(jnp.sqrt(norm), 1e-30))


def _float32_grads(models, case: Case, built: Lazy, data: Lazy, seed: int):
    """Step 0's loss and gradients of the same parameters and batch, computed in float32."""
    from flax import nnx

    import flashpatch

    model = built.get()
    config32 = _config(models, case, "float32")
    with flashpatch.disable():  # only the graph is needed: build it abstractly (no second copy of the weights)
        try:
            reference = nnx.eval_shape(lambda: config32.create(jax.random.key(seed)))
        except Exception:
            reference = config32.create(jax.random.key(seed))
    graphdef32, _, _ = nnx.split(reference, nnx.Param, ...)
    del reference
    batch = data.get()
    _, loss_fn, _ = _train_fns(model, batch, seed)
    with flashpatch.disable(), jax.default_matmul_precision("highest"):
        loss, got = jax.jit(jax.value_and_grad(functools.partial(loss_fn, graphdef=graphdef32)))(
            model.params, batch.leaves, np.int32(0)
        )
    return float(loss), got


def _to_bf16(p: jax.Array) -> jax.Array:
    """Parameters as openpi's policies load them for inference: floating ones in bf16."""
    return p.astype(jnp.bfloat16) if jnp.issubdtype(p.dtype, jnp.floating) else p


def _sample_body(harness: Harness, variant: Variant, case: Case, built: Lazy, data: Lazy, seq: Lazy):
    def body(rec: Record) -> None:
        model, batch = built.get(), data.get()
        params = jax.tree.map(_to_bf16, model.params)

        def sample(params, leaves, rng):
            obs, actions = batch.unpack(leaves)
            policy = model.merged(params)
            if case.model == "pi0_fast":
                return policy.sample_actions(rng, obs, max_decoding_steps=DECODE_STEPS)
            noise = jax.random.normal(rng, actions.shape)
            # What the model adds to the noise it starts from (compared across variants: the noise is the same).
            return policy.sample_actions(rng, obs, num_steps=10, noise=noise) - noise

        rngs = [jax.random.key(harness.options.seed + i) for i in range(harness.options.input_sets)]
        leaves = batch.leaves
        compiled = harness.compile(rec, variant, sample, params, leaves, rngs[0], context=variant.model_context())
        rec.metrics["seq_len"] = seq.get()
        result = harness.time(rec, "sample", lambda i: compiled(params, leaves, rngs[i % len(rngs)]))
        rec.ms = result.median_ms
        out = compiled(params, leaves, rngs[0])
        if case.model == "pi0_fast":
            harness.compare_tokens_to_einsum(rec, out)
        else:
            harness.compare_to_einsum(rec, "rel_diff_vs_einsum", out)

    return body


def run(harness: Harness) -> None:
    o = harness.options
    models = openpi_models.load(o.openpi_src, size=o.openpi_size)
    harness.notes.append(f"openpi mode: {models.description}")
    harness.models["openpi"] = models.source
    harness.notes.extend(models.notes)
    harness.budget.begin("openpi")
    with ceiling.registered():
        variants = [*harness.variants, Variant(ceiling.NAME)]
        for case in cases(o):
            built = Lazy(functools.partial(Built, _config(models, case, "bfloat16"), o.seed))
            config = _config(models, case, "bfloat16")
            data = Lazy(functools.partial(fill_batch, config, case.batch, o.seed, case.kind == "train"))
            grads = Lazy(functools.partial(_float32_grads, models, case, built, data, o.seed))
            seq = _sequence_lazy(built, data, case)
            for variant in variants:
                if case.kind == "train":
                    body = _train_body(harness, variant, case, built, data, grads, seq)
                else:
                    body = _sample_body(harness, variant, case, built, data, seq)
                harness.run_case("openpi", case.name, variant, _prompt(models, case), case.batch, body)
            built.drop()
            data.drop()
            grads.drop()
        if "pi0_fit" in o.openpi_cases:
            fit(harness, models, [Variant(EINSUM), Variant("auto")])  # what the case is: einsum against auto
    add_ceiling_shares(harness.records)


def _prompt(models, case: Case) -> int:
    """The case's prompt length (the size its records are keyed on)."""
    return case.max_token_len or _config(models, case, "bfloat16").max_token_len


def add_ceiling_shares(records: list[Record]) -> None:
    """Per openpi case: each variant's share of the gain the attention-free step shows over the einsum."""
    by_case: dict[tuple[str, int], dict[str, Record]] = {}
    for rec in records:
        if rec.scenario == "openpi" and rec.status == "ok" and rec.ms:
            by_case.setdefault((rec.case, rec.size), {})[rec.variant] = rec
    for found in by_case.values():
        base, top = found.get(EINSUM), found.get(ceiling.NAME)
        if base is None or top is None:
            continue
        for rec in found.values():
            share = share_of_ceiling(base.ms, rec.ms, top.ms)
            if share is not None and rec.variant not in (EINSUM, ceiling.NAME):
                rec.metrics["ceiling_share"] = share
        # XLA counts no FLOPs for cuDNN's fused attention, so a flash variant's count is the model without its
        # attention: the ceiling's should be about that. Far below it, XLA has removed work the model needs.
        others = [r.metrics["gflop_per_step"] for r in found.values() if r is not top and "gflop_per_step" in r.metrics]
        top.notes = [n for n in top.notes if not n.startswith(_DEAD_CODE)]
        if "gflop_per_step" in top.metrics and others:
            ratio = top.metrics["gflop_per_step"] / min(others)
            top.metrics["gflop_vs_leanest"] = ratio
            if ratio < 0.5:
                top.notes.append(
                    f"{_DEAD_CODE}: the ceiling step counts {ratio:.0%} of the FLOPs of the leanest other variant, "
                    "so XLA may have removed work the model needs and this ceiling is not one attention could reach"
                )


_DEAD_CODE = "ceiling check"


def fit(harness: Harness, models, variants: list[Variant]) -> None:
    """The largest prompt that trains pi0 at the long-prompt batch: two timed steps per rung, einsum vs auto."""
    o = harness.options
    for prompt in o.openpi_fit_prompts:
        case = Case("fit", "pi0", "train", o.openpi_long_batch, prompt)
        built = Lazy(functools.partial(Built, _config(models, case, "bfloat16"), o.seed))
        data = Lazy(functools.partial(fill_batch, _config(models, case, "bfloat16"), case.batch, o.seed, True))
        seq = _sequence_lazy(built, data, case)
        for variant in variants:
            body = _train_body(harness, variant, case, built, data, Lazy(lambda: None), seq)
            harness.run_case("openpi", "fit", variant, prompt, case.batch, body)
        built.drop()
        data.drop()


def share_of_ceiling(einsum_ms: float, variant_ms: float, ceiling_ms: float) -> float | None:
    """How much of the gain an attention-free step would give this variant takes: 0 = none, 1 = all."""
    possible = einsum_ms - ceiling_ms
    if possible <= 0:
        return None
    return (einsum_ms - variant_ms) / possible


__all__ = ["Case", "cases", "fill_batch", "run", "share_of_ceiling"]
