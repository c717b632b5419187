"""A pi0-style model and a synthetic task it can learn, for end-to-end training parity runs.

The model follows openpi's `Pi0.compute_loss` (models/pi0.py) around our openpi-compatible two-expert
Gemma (`flashpatch.testing.gemma`): a prefix of "observation" tokens (camera chunks, then a prompt whose
tail is padding, all bidirectional) for the first expert, a suffix of one state token (its own causal
block) and `horizon` action tokens (one block) for the action expert, openpi's masks and positions, and
pi0's flow-matching loss. SigLIP is replaced by a linear projection of synthetic patch features.

The task is learnable: each sample has a hidden vector z and a task id. Every camera token is a noisy
linear view of z, the first prompt token names the task, the state shows a quarter of z, and the actions
go in a straight line from tanh(z @ W0[task]) to tanh(z @ W1[task]). The action tokens learn the task and
most of z only by attending to the prefix, so any error in attention shows up in the loss.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flashpatch.testing import gemma
from flashpatch.testing.models import make_attn_mask, posemb_sincos


@dataclasses.dataclass(frozen=True)
class Layout:
    """Token counts of one sequence: camera chunks and prompt (prefix), state and actions (suffix)."""

    cameras: tuple[int, ...]
    prompt: int
    horizon: int
    action_dim: int
    obs_dim: int = 64
    vocab: int = 256

    def __post_init__(self) -> None:
        if not self.cameras or min(self.cameras) < 1:
            raise ValueError(f"cameras must be a non-empty tuple of positive token counts; got {self.cameras}")
        if self.prompt < 2:
            raise ValueError(f"prompt must hold at least 2 tokens (task id and one word); got {self.prompt}")
        if self.horizon < 1 or self.action_dim < 1:
            raise ValueError(f"horizon and action_dim must be positive; got {self.horizon}, {self.action_dim}")

    @classmethod
    def for_seq_len(
        cls, seq_len: int, *, cameras: int = 3, prompt: int = 48, horizon: int = 50, action_dim: int = 32
    ) -> Layout:
        """Split a total length T like openpi's pi0: `cameras` image chunks, prompt, state token, actions.

        openpi's pi0 has 3 x 256 image tokens, a 48-token prompt, 1 state and 50 action tokens (T = 867).
        """
        images = seq_len - prompt - 1 - horizon
        if images < cameras:
            raise ValueError(
                f"seq_len must leave at least one token per camera after prompt ({prompt}), state (1) and "
                f"actions ({horizon}); got seq_len={seq_len}"
            )
        chunks = tuple(len(c) for c in np.array_split(np.arange(images), cameras))
        return cls(cameras=chunks, prompt=prompt, horizon=horizon, action_dim=action_dim)

    @property
    def image_len(self) -> int:
        return sum(self.cameras)

    @property
    def prefix_len(self) -> int:
        return self.image_len + self.prompt

    @property
    def seq_len(self) -> int:
        return self.prefix_len + 1 + self.horizon


class Batch(NamedTuple):
    """One batch of observations and target actions, in openpi's terms."""

    images: jax.Array  # (B, image_len, obs_dim) float32: patch features of all cameras, in order
    image_masks: jax.Array  # (B, cameras) bool: False where the camera is missing
    prompt: jax.Array  # (B, prompt) int32
    prompt_mask: jax.Array  # (B, prompt) bool: False on the padded tail
    state: jax.Array  # (B, action_dim) float32
    actions: jax.Array  # (B, horizon, action_dim) float32


@dataclasses.dataclass(frozen=True)
class Task:
    """The fixed random maps that define the synthetic task (a pytree: arrays are leaves, the rest static)."""

    layout: Layout
    camera_maps: jax.Array  # (cameras, latent, obs_dim)
    state_map: jax.Array  # (latent // 4, action_dim): the state shows the first quarter of z
    action_maps: jax.Array  # (tasks, 2, latent, action_dim): first and last pose of each task's trajectory
    obs_noise: float = 1.0
    missing_camera_rate: float = 0.5

    @classmethod
    def create(cls, layout: Layout, seed: int, *, latent: int = 16, tasks: int = 4) -> Task:
        """Maps drawn with numpy from `seed` (no compilation; the same on every platform)."""
        if tasks + 1 >= layout.vocab:
            raise ValueError(f"tasks must be smaller than the vocabulary ({layout.vocab}) - 1; got {tasks}")
        rng = np.random.default_rng(seed)
        scale = latent**-0.5

        def normal(*shape: int) -> jax.Array:
            return jnp.asarray(rng.standard_normal(shape, np.float32) * scale)

        return cls(
            layout=layout,
            camera_maps=normal(len(layout.cameras), latent, layout.obs_dim),
            state_map=normal(max(1, latent // 4), layout.action_dim),
            action_maps=normal(tasks, 2, latent, layout.action_dim),
        )

    def sample(self, key: jax.Array, batch: int) -> Batch:
        """A batch drawn from `key` alone (jit-friendly; the same key gives the same batch)."""
        lay = self.layout
        k_z, k_task, k_noise, k_missing, k_words, k_len = jax.random.split(key, 6)
        latent = self.camera_maps.shape[1]
        tasks = self.action_maps.shape[0]
        z = jax.random.normal(k_z, (batch, latent))
        task = jax.random.randint(k_task, (batch,), 0, tasks)

        views = jnp.einsum("bl,clf->bcf", z, self.camera_maps)  # (B, cameras, obs_dim)
        camera_of_token = np.repeat(np.arange(len(lay.cameras)), lay.cameras)
        images = views[:, camera_of_token] + self.obs_noise * jax.random.normal(
            k_noise, (batch, lay.image_len, lay.obs_dim)
        )
        # Camera 1 (a wrist camera in openpi's naming) is missing in some samples: padding mid-sequence.
        image_masks = jnp.ones((batch, len(lay.cameras)), bool)
        if len(lay.cameras) > 1:
            missing = jax.random.bernoulli(k_missing, self.missing_camera_rate, (batch,))
            image_masks = image_masks.at[:, 1].set(~missing)
        images = jnp.where(image_masks[:, camera_of_token, None], images, 0.0)

        # Prompt: task id, then words; a random length per sample, the tail padded with 0.
        words = jax.random.randint(k_words, (batch, lay.prompt), tasks + 1, lay.vocab)
        prompt = words.at[:, 0].set(task + 1)
        length = jax.random.randint(k_len, (batch, 1), max(2, lay.prompt // 4), lay.prompt + 1)
        prompt_mask = jnp.arange(lay.prompt)[None, :] < length
        prompt = jnp.where(prompt_mask, prompt, 0).astype(jnp.int32)

        poses = jnp.tanh(jnp.einsum("bl,bpla->bpa", z, self.action_maps[task]))  # (B, 2, action_dim)
        along = jnp.linspace(0.0, 1.0, lay.horizon)[None, :, None]
        actions = (1 - along) * poses[:, :1] + along * poses[:, 1:]  # a straight path from pose 0 to pose 1
        return Batch(
            images=images,
            image_masks=image_masks,
            prompt=prompt,
            prompt_mask=prompt_mask,
            state=z[:, : self.state_map.shape[0]] @ self.state_map,
            actions=actions,
        )


jax.tree_util.register_dataclass(
    Task,
    data_fields=["camera_maps", "state_map", "action_maps"],
    meta_fields=["layout", "obs_noise", "missing_camera_rate"],
)


class Pi0Like(nn.Module):
    """pi0's forward pass for training: prefix and suffix in one call of the two-expert Gemma."""

    prefix_config: gemma.Config
    expert_config: gemma.Config
    layout: Layout
    dtype: str = "bfloat16"

    def setup(self):
        self.llm = gemma.Module(
            configs=[self.prefix_config, self.expert_config], embed_dtype=self.dtype, vocab_size=self.layout.vocab
        )
        width = self.expert_config.width
        self.image_proj = nn.Dense(self.prefix_config.width, name="image_proj")
        self.state_proj = nn.Dense(width, name="state_proj")
        self.action_in_proj = nn.Dense(width, name="action_in_proj")
        self.action_time_mlp_in = nn.Dense(width, name="action_time_mlp_in")
        self.action_time_mlp_out = nn.Dense(width, name="action_time_mlp_out")
        self.action_out_proj = nn.Dense(self.layout.action_dim, name="action_out_proj")

    def __call__(self, obs: Batch, noisy_actions: jax.Array, time: jax.Array) -> jax.Array:
        """The predicted velocity (B, horizon, action_dim) at `noisy_actions`, time `time` (B,)."""
        lay = self.layout
        batch = noisy_actions.shape[0]
        image_valid = jnp.repeat(obs.image_masks, np.asarray(lay.cameras), axis=1, total_repeat_length=lay.image_len)
        prefix = jnp.concatenate([self.image_proj(obs.images).astype(self.dtype), self.llm.embed(obs.prompt)], axis=1)
        prefix_valid = jnp.concatenate([image_valid, obs.prompt_mask], axis=1)

        state_token = self.state_proj(obs.state)[:, None, :]
        action_tokens = self.action_in_proj(noisy_actions)
        time_emb = posemb_sincos(time, self.expert_config.width, min_period=4e-3, max_period=4.0)
        time_tokens = jnp.broadcast_to(time_emb[:, None, :], action_tokens.shape)
        mixed = self.action_time_mlp_in(jnp.concatenate([action_tokens, time_tokens], axis=-1))
        mixed = self.action_time_mlp_out(nn.swish(mixed))
        suffix = jnp.concatenate([state_token, mixed], axis=1)

        input_mask = jnp.concatenate([prefix_valid, jnp.ones((batch, 1 + lay.horizon), bool)], axis=1)
        ar_mask = np.zeros(lay.seq_len, bool)
        ar_mask[lay.prefix_len : lay.prefix_len + 2] = True  # state starts a block, actions start the next
        attn_mask = make_attn_mask(input_mask, jnp.asarray(ar_mask))
        positions = jnp.cumsum(input_mask, axis=1) - 1
        (_, suffix_out), _ = self.llm([prefix, suffix], mask=attn_mask, positions=positions)
        return self.action_out_proj(suffix_out[:, -lay.horizon :])


def flow_matching_loss(model: Pi0Like, params, obs: Batch, key: jax.Array) -> jax.Array:
    """pi0's training loss: x_t = t * noise + (1 - t) * actions, regress noise - actions; a scalar."""
    noise_key, time_key = jax.random.split(key)
    actions = obs.actions
    noise = jax.random.normal(noise_key, actions.shape)
    # pi0 draws t ~ Beta(1.5, 1); its CDF is t**1.5, so u**(2/3) with u uniform has that law and is far
    # cheaper to compile than jax.random.beta's rejection sampler.
    time = jax.random.uniform(time_key, actions.shape[:1]) ** (2 / 3) * 0.999 + 0.001
    t = time[:, None, None]
    x_t = t * noise + (1 - t) * actions
    v_t = model.apply(params, obs, x_t, time)
    return jnp.mean(jnp.square(v_t.astype(jnp.float32) - (noise - actions)))


def build(
    layout: Layout,
    *,
    width: int,
    depth: int,
    expert_width: int | None = None,
    num_heads: int = 8,
    head_dim: int = 64,
    dtype: str = "bfloat16",
) -> Pi0Like:
    """A Pi0Like with a prefix expert of `width` and an action expert of `expert_width` (default width/2).

    Both experts have `depth` layers, MLPs 4x their width, `num_heads` query heads and one key/value head
    (grouped-query attention, as openpi's Gemma configs have).
    """
    expert_width = expert_width or width // 2
    for name, value in (("width", width), ("expert_width", expert_width), ("depth", depth)):
        if value < 1:
            raise ValueError(f"{name} must be positive; got {value}")
    shared = dict(depth=depth, num_heads=num_heads, num_kv_heads=1, head_dim=head_dim)
    return Pi0Like(
        prefix_config=gemma.Config(width=width, mlp_dim=4 * width, **shared),
        expert_config=gemma.Config(width=expert_width, mlp_dim=4 * expert_width, **shared),
        layout=layout,
        dtype=dtype,
    )
