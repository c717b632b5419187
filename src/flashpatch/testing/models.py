"""pi0, pi0.5 and pi0-FAST with openpi's model API, built on flashpatch's openpi-compatible Gemma.

`Pi0Config` and `Pi0FASTConfig` take the fields of openpi's (`openpi.models.pi0_config.Pi0Config`,
`openpi.models.pi0_fast.Pi0FASTConfig`) that shape the attention, and their models have openpi's entry
points: `config.create(rng)`, `config.fake_obs(b)`, `config.fake_act(b)`, `model.compute_loss(rng, obs,
actions, train=...)` and `model.sample_actions(rng, obs, ...)`. The Gemma stacks inside are
`flashpatch.testing.gemma` / `gemma_fast` (openpi's signatures, parameters and math), wrapped as
openpi wraps them (`nnx.bridge.ToNNX`), with openpi's masks, positions and KV-cache use. What differs:
images go through a linear patch embedding instead of SigLIP, and the image size is small, so that the
whole model runs on a CPU. The benchmark's openpi mode runs on these where openpi is not importable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct
from flax.nnx import bridge

from flashpatch.testing import gemma, gemma_fast

PATCH = 4
EOS_TOKEN = 1


@struct.dataclass
class Observation:
    """openpi's `Observation`: images in [-1, 1], their masks, the state and the tokenized prompt."""

    images: dict[str, jax.Array]
    image_masks: dict[str, jax.Array]
    state: jax.Array
    tokenized_prompt: jax.Array | None = None
    tokenized_prompt_mask: jax.Array | None = None
    token_ar_mask: jax.Array | None = None
    token_loss_mask: jax.Array | None = None


def make_attn_mask(input_mask: jax.Array, ar_mask: jax.Array) -> jax.Array:
    """openpi's rule: token i sees valid token j iff cumsum(ar)[j] <= cumsum(ar)[i] (and i is valid)."""
    ar_mask = jnp.broadcast_to(ar_mask, input_mask.shape)
    block = jnp.cumsum(ar_mask, axis=1)
    return (block[:, None, :] <= block[:, :, None]) & input_mask[:, None, :] & input_mask[:, :, None]


def posemb_sincos(pos: jax.Array, dim: int, min_period: float, max_period: float) -> jax.Array:
    fraction = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    angle = jnp.einsum("i,j->ij", pos, 2 * jnp.pi / period, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


class PatchEmbed(nnx.Module):
    """The stand-in for SigLIP: (B, H, W, 3) -> (B, (H / 4) * (W / 4), width) by one linear map of 4x4 patches."""

    def __init__(self, width: int, dtype: str, rngs: nnx.Rngs):
        self.proj = nnx.Linear(PATCH * PATCH * 3, width, rngs=rngs)
        self.dtype = dtype

    def __call__(self, image: jax.Array) -> jax.Array:
        b, h, w, c = image.shape
        patches = image.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)
        return self.proj(patches).astype(self.dtype)


def _embed_images(embed: PatchEmbed, obs: Observation) -> tuple[list[jax.Array], list[jax.Array]]:
    """Each camera's image tokens and their validity (the camera's mask, per token), in the images' order."""
    tokens = [embed(image) for image in obs.images.values()]
    masks = [obs.image_masks[name] for name in obs.images]
    valid = [jnp.broadcast_to(mask[:, None], t.shape[:2]) for mask, t in zip(masks, tokens, strict=True)]
    return tokens, valid


def _fake_images(names: tuple[str, ...], batch: int, size: int) -> tuple[dict, dict]:
    images = {name: jnp.zeros((batch, size, size, 3), jnp.float32) for name in names}
    return images, {name: jnp.ones((batch,), jnp.bool_) for name in names}


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    """The fields of openpi's Pi0Config that shape attention; `image_size` is this fixture's own."""

    dtype: str = "bfloat16"
    paligemma_variant: str = "dummy"
    action_expert_variant: str = "dummy"
    action_dim: int = 8
    action_horizon: int = 10
    max_token_len: int | None = None
    pi05: bool = False
    image_size: int = 16
    image_keys: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")

    def __post_init__(self) -> None:
        if self.max_token_len is None:
            object.__setattr__(self, "max_token_len", 200 if self.pi05 else 48)
        if self.image_size % PATCH:
            raise ValueError(f"image_size must be a multiple of {PATCH}; got {self.image_size}")

    def create(self, rng: jax.Array) -> Pi0:
        return Pi0(self, nnx.Rngs(rng))

    def fake_obs(self, batch_size: int = 1) -> Observation:
        images, masks = _fake_images(self.image_keys, batch_size, self.image_size)
        return Observation(
            images=images,
            image_masks=masks,
            state=jnp.zeros((batch_size, self.action_dim), jnp.float32),
            tokenized_prompt=jnp.zeros((batch_size, self.max_token_len), jnp.int32),
            tokenized_prompt_mask=jnp.ones((batch_size, self.max_token_len), jnp.bool_),
        )

    def fake_act(self, batch_size: int = 1) -> jax.Array:
        return jnp.zeros((batch_size, self.action_horizon, self.action_dim), jnp.float32)


class Pi0(nnx.Module):
    """pi0 / pi0.5: prefix (images, prompt) for the first expert, suffix (state, actions) for the second."""

    def __init__(self, config: Pi0Config, rngs: nnx.Rngs):
        self.pi05 = config.pi05
        self.action_horizon = config.action_horizon
        self.action_dim = config.action_dim
        prefix_config = gemma.get_config(config.paligemma_variant)
        expert_config = gemma.get_config(config.action_expert_variant)
        llm = bridge.ToNNX(
            gemma.Module(configs=[prefix_config, expert_config], embed_dtype=config.dtype, adarms=config.pi05)
        )
        llm.lazy_init(rngs=rngs, method="init", use_adarms=[False, config.pi05])
        self.PaliGemma = nnx.Dict(llm=llm, img=PatchEmbed(prefix_config.width, config.dtype, rngs))
        width = expert_config.width
        self.action_in_proj = nnx.Linear(config.action_dim, width, rngs=rngs)
        if config.pi05:
            self.time_mlp_in = nnx.Linear(width, width, rngs=rngs)
            self.time_mlp_out = nnx.Linear(width, width, rngs=rngs)
        else:
            self.state_proj = nnx.Linear(config.action_dim, width, rngs=rngs)
            self.action_time_mlp_in = nnx.Linear(2 * width, width, rngs=rngs)
            self.action_time_mlp_out = nnx.Linear(width, width, rngs=rngs)
        self.action_out_proj = nnx.Linear(width, config.action_dim, rngs=rngs)

    def embed_prefix(self, obs: Observation) -> tuple[jax.Array, jax.Array, jax.Array]:
        tokens, valid = _embed_images(self.PaliGemma.img, obs)
        ar = [False] * sum(t.shape[1] for t in tokens)
        if obs.tokenized_prompt is not None:
            tokens.append(self.PaliGemma.llm(obs.tokenized_prompt, method="embed"))
            valid.append(obs.tokenized_prompt_mask)
            ar += [False] * obs.tokenized_prompt.shape[1]
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(valid, axis=1), jnp.asarray(ar)

    def embed_suffix(self, obs: Observation, noisy_actions: jax.Array, time: jax.Array):
        tokens, valid, ar = [], [], []
        batch = noisy_actions.shape[0]
        if not self.pi05:
            tokens.append(self.state_proj(obs.state)[:, None, :])
            valid.append(jnp.ones((batch, 1), jnp.bool_))
            ar += [True]
        actions = self.action_in_proj(noisy_actions)
        time_emb = posemb_sincos(time, self.action_in_proj.out_features, min_period=4e-3, max_period=4.0)
        if self.pi05:
            cond = nnx.swish(self.time_mlp_out(nnx.swish(self.time_mlp_in(time_emb))))
            expert_tokens = actions
        else:
            cond = None
            mixed = jnp.concatenate([actions, jnp.broadcast_to(time_emb[:, None], actions.shape)], axis=-1)
            expert_tokens = self.action_time_mlp_out(nnx.swish(self.action_time_mlp_in(mixed)))
        tokens.append(expert_tokens)
        valid.append(jnp.ones(expert_tokens.shape[:2], jnp.bool_))
        ar += [True] + [False] * (self.action_horizon - 1)
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(valid, axis=1), jnp.asarray(ar), cond

    def compute_loss(self, rng, observation: Observation, actions: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no augmentation in the fixture
        noise_rng, time_rng = jax.random.split(rng)
        noise = jax.random.normal(noise_rng, actions.shape)
        time = jax.random.beta(time_rng, 1.5, 1, actions.shape[:-2]) * 0.999 + 0.001
        x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * actions
        prefix, prefix_valid, prefix_ar = self.embed_prefix(observation)
        suffix, suffix_valid, suffix_ar, cond = self.embed_suffix(observation, x_t, time)
        valid = jnp.concatenate([prefix_valid, suffix_valid], axis=1)
        mask = make_attn_mask(valid, jnp.concatenate([prefix_ar, suffix_ar]))
        positions = jnp.cumsum(valid, axis=1) - 1
        (_, suffix_out), _ = self.PaliGemma.llm(
            [prefix, suffix], mask=mask, positions=positions, adarms_cond=[None, cond]
        )
        v_t = self.action_out_proj(suffix_out[:, -self.action_horizon :])
        return jnp.mean(jnp.square(v_t - (noise - actions)), axis=-1)

    def sample_actions(self, rng, observation: Observation, *, num_steps: int = 10, noise=None) -> jax.Array:
        dt = -1.0 / num_steps
        batch = observation.state.shape[0]
        if noise is None:
            noise = jax.random.normal(rng, (batch, self.action_horizon, self.action_dim))
        prefix, prefix_valid, prefix_ar = self.embed_prefix(observation)
        positions = jnp.cumsum(prefix_valid, axis=1) - 1
        _, kv_cache = self.PaliGemma.llm(
            [prefix, None], mask=make_attn_mask(prefix_valid, prefix_ar), positions=positions
        )

        def step(carry):
            x_t, time = carry
            suffix, suffix_valid, suffix_ar, cond = self.embed_suffix(observation, x_t, jnp.broadcast_to(time, batch))
            over_prefix = jnp.broadcast_to(prefix_valid[:, None, :], (batch, suffix.shape[1], prefix.shape[1]))
            mask = jnp.concatenate([over_prefix, make_attn_mask(suffix_valid, suffix_ar)], axis=-1)
            positions = jnp.sum(prefix_valid, axis=-1)[:, None] + jnp.cumsum(suffix_valid, axis=-1) - 1
            (_, suffix_out), _ = self.PaliGemma.llm(
                [None, suffix], mask=mask, positions=positions, kv_cache=kv_cache, adarms_cond=[None, cond]
            )
            return x_t + dt * self.action_out_proj(suffix_out[:, -self.action_horizon :]), time + dt

        x_0, _ = jax.lax.while_loop(lambda carry: carry[1] >= -dt / 2, step, (noise, 1.0))
        return x_0


@dataclasses.dataclass(frozen=True)
class Pi0FASTConfig:
    """The fields of openpi's Pi0FASTConfig that shape attention; `image_size` is this fixture's own."""

    dtype: str = "bfloat16"
    paligemma_variant: str = "dummy"
    action_dim: int = 8
    action_horizon: int = 10
    max_token_len: int = 32
    image_size: int = 16
    vocab_size: int = 256
    image_keys: tuple[str, ...] = ("base_0_rgb", "base_1_rgb", "wrist_0_rgb")

    def create(self, rng: jax.Array) -> Pi0FAST:
        return Pi0FAST(self, nnx.Rngs(rng))

    def fake_obs(self, batch_size: int = 1) -> Observation:
        images, masks = _fake_images(self.image_keys, batch_size, self.image_size)
        shape = (batch_size, self.max_token_len)
        return Observation(
            images=images,
            image_masks=masks,
            state=jnp.zeros((batch_size, self.action_dim), jnp.float32),
            tokenized_prompt=jnp.zeros(shape, jnp.int32),
            tokenized_prompt_mask=jnp.ones(shape, jnp.bool_),
            token_ar_mask=jnp.zeros(shape, jnp.int32),
            token_loss_mask=jnp.ones(shape, jnp.bool_),
        )

    def fake_act(self, batch_size: int = 1) -> jax.Array:
        return jnp.zeros((batch_size, self.action_horizon, self.action_dim), jnp.float32)


class Pi0FAST(nnx.Module):
    """pi0-FAST: one Gemma over images and prompt; actions decoded as tokens with a fixed-size KV cache."""

    def __init__(self, config: Pi0FASTConfig, rngs: nnx.Rngs):
        variant = dataclasses.asdict(gemma.get_config(config.paligemma_variant))
        variant.pop("lora_configs")
        llm = bridge.ToNNX(
            gemma_fast.Module(
                **variant, vocab_size=config.vocab_size, embed_dtype=config.dtype, cache_dtype=config.dtype
            )
        )
        llm.lazy_init(rngs=rngs, method="init")
        self.PaliGemma = nnx.Dict(llm=llm, img=PatchEmbed(variant["width"], config.dtype, rngs))

    def embed_inputs(self, obs: Observation) -> tuple[jax.Array, jax.Array, jax.Array]:
        tokens, valid = _embed_images(self.PaliGemma.img, obs)
        ar = [jnp.zeros(t.shape[:2], jnp.int32) for t in tokens]
        tokens.append(self.PaliGemma.llm(obs.tokenized_prompt, embed_only=True))
        valid.append(obs.tokenized_prompt_mask)
        ar.append(obs.token_ar_mask)
        return jnp.concatenate(tokens, axis=1), jnp.concatenate(valid, axis=1), jnp.concatenate(ar, axis=1)

    def sample_actions(self, rng, observation: Observation, *, max_decoding_steps: int = 16) -> jax.Array:
        """Greedy decoding: prefill the prompt right-aligned into the cache, then one token per step."""
        del rng
        tokens, valid, ar = self.embed_inputs(observation)
        mask = make_attn_mask(valid, ar)
        tokens, valid, mask = jax.vmap(_right_align)(tokens, valid, mask)
        size = tokens.shape[1]
        filled = jnp.sum(valid, axis=-1)
        start = size - filled
        positions = jnp.cumsum(valid, axis=-1) - 1
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, max_decoding_steps)))
        logits, cache = self.PaliGemma.llm(embedded_prefix=tokens, mask=mask, positions=positions, decode=True)
        out = jnp.zeros((tokens.shape[0], max_decoding_steps), jnp.int32)
        slots = jnp.arange(size + max_decoding_steps)[None, None, :]

        def step(carry):
            last, out, cache, _, i = carry
            token = jnp.argmax(last, axis=-1).astype(jnp.int32)  # (B, 1)
            out = jax.lax.dynamic_update_slice(out, token, (0, i))
            done = jnp.all(token == EOS_TOKEN)
            mask = (slots >= start[:, None, None]) & (slots < size + i + 1)
            embedded = self.PaliGemma.llm(token, embed_only=True)
            logits, cache = self.PaliGemma.llm(
                embedded_prefix=embedded, mask=mask, positions=filled[:, None] + i, decode=True, kv_cache=cache
            )
            return logits[:, -1:], out, cache, done, i + 1

        carry = (logits[:, -1:], out, cache, jnp.bool_(False), jnp.int32(0))
        _, out, *_ = jax.lax.while_loop(lambda c: (~c[3]) & (c[4] < max_decoding_steps), step, carry)
        return out


def _right_align(x: jax.Array, valid: jax.Array, mask: jax.Array):
    """One example: roll tokens so that the valid ones end at the last slot (pi0-FAST prefills that way)."""
    shift = x.shape[0] - (jnp.max(valid * jnp.arange(valid.shape[0])) + 1)
    return jnp.roll(x, shift, axis=0), jnp.roll(valid, shift), jnp.roll(jnp.roll(mask, shift, axis=0), shift, axis=1)


__all__ = ["Observation", "Pi0", "Pi0Config", "Pi0FAST", "Pi0FASTConfig", "make_attn_mask"]
