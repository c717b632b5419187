"""A multi-expert Gemma like `openpi.models.gemma` (pi0 / pi0.5): same signatures, parameters and math.

Einsum axis names: B batch, T query length, S key length, N query heads, K key/value heads,
G query heads per key/value head, H head dim, D model width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flashpatch.testing import lora, sharding

PALIGEMMA_VOCAB_SIZE = 257_152
BIG_NEG = -2.3819763e38


@dataclasses.dataclass
class Config:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    lora_configs: dict[str, lora.LoRAConfig] = dataclasses.field(default_factory=dict)


_VARIANTS = {
    "tiny": dict(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
    "dummy": dict(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "gemma_300m": dict(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_2b": dict(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
}


def get_config(variant: str, **overrides) -> Config:
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(_VARIANTS)}; got {variant!r}")
    return Config(**{**_VARIANTS[variant], **overrides})


class RMSNorm(nn.Module):
    """RMSNorm; with `cond`, adaptive (pi0.5's adaRMS): scale, shift and a gate from `cond`."""

    @nn.compact
    def __call__(self, x, cond):
        dtype = x.dtype
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        normed = jnp.asarray(x * jnp.reciprocal(jnp.sqrt(var + 1e-06)))
        if cond is None:
            scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1]))
            return (normed * (1 + scale)).astype(dtype), None
        modulation = nn.Dense(x.shape[-1] * 3, kernel_init=nn.initializers.zeros, dtype=dtype)(cond)
        scale, shift, gate = jnp.split(modulation[:, None, :], 3, axis=-1)
        return (normed * (1 + scale) + shift).astype(dtype), gate


class Embedder(nn.Module):
    vocab_size: int
    embed_dim: int

    def setup(self):
        self.input_embedding_table = self.param(
            "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim)
        )

    def encode(self, x):
        x = self.input_embedding_table[(x,)]
        return x * jnp.sqrt(self.embed_dim).astype(x.dtype)

    def decode(self, x):
        return jnp.dot(x, self.input_embedding_table.T)


class Attention(nn.Module):
    """Joint attention over the tokens of all experts; each expert has its own projections."""

    configs: Sequence[Config]

    @nn.compact
    def __call__(self, xs, positions, attn_mask, kv_cache):
        lead = self.configs[0]
        assert all(c.head_dim == lead.head_dim for c in self.configs)
        assert all(c.num_heads == lead.num_heads for c in self.configs)
        assert all(c.num_kv_heads == lead.num_kv_heads for c in self.configs)
        dtype = next(x.dtype for x in xs if x is not None)

        projected = []
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                continue
            attn_lora = cfg.lora_configs.get("attn")
            if cfg.num_kv_heads == cfg.num_heads:
                qkv = lora.Einsum(
                    shape=(3, cfg.num_heads, cfg.width, cfg.head_dim),
                    name=_name("qkv_einsum", i),
                    init_fn=nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0, 1)),
                    lora_config=attn_lora,
                )("BSD,3KDH->3BSKH", x)
                projected.append(tuple(qkv))
            else:
                q = lora.Einsum(
                    shape=(cfg.num_heads, cfg.width, cfg.head_dim),
                    name=_name("q_einsum", i),
                    init_fn=nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
                    lora_config=attn_lora,
                )("BTD,NDH->BTNH", x)
                k, v = lora.Einsum(
                    shape=(2, cfg.num_kv_heads, cfg.width, cfg.head_dim),
                    name=_name("kv_einsum", i),
                    init_fn=nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0, 1)),
                    lora_config=attn_lora,
                )("BSD,2KDH->2BSKH", x)
                projected.append((q, k, v))

        q, k, v = (jnp.concatenate(part, axis=1) for part in zip(*projected, strict=True))
        q = _apply_rope(q, positions=positions)
        q *= lead.head_dim**-0.5
        k = _apply_rope(k, positions=positions)
        assert q.dtype == k.dtype == v.dtype == dtype

        if kv_cache is not None:
            k = jnp.concatenate([kv_cache[0], k], axis=1)
            v = jnp.concatenate([kv_cache[1], v], axis=1)

        b, t, n, h = q.shape
        q = q.reshape(b, t, lead.num_kv_heads, n // lead.num_kv_heads, h)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        if attn_mask.shape != (b, 1, t, k.shape[1]):
            raise ValueError(
                f"Attention mask with shape {attn_mask.shape} but shapes for q and k are: {q.shape} and {k.shape}"
            )
        logits = jnp.where(attn_mask[:, :, None, :, :], logits, BIG_NEG)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)

        out, start = [], 0
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                out.append(None)
                continue
            out.append(
                lora.Einsum(
                    shape=(cfg.num_heads, cfg.head_dim, cfg.width),
                    name=_name("attn_vec_einsum", i),
                    init_fn=nn.initializers.lecun_normal(in_axis=(-3, -2), out_axis=-1),
                    lora_config=cfg.lora_configs.get("attn"),
                )("BTNH,NHD->BTD", encoded[:, start : start + x.shape[1]])
            )
            start += x.shape[1]
        return out, (k, v)


class Block(nn.Module):
    configs: tuple[Config, ...]
    dropout: float = 0.0
    dropout_bdims: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, xs, kv_cache, positions, attn_mask, adarms_cond, deterministic=True):
        xs = sharding.activation_sharding_constraint(xs)
        drop = nn.Dropout(self.dropout, self.dropout_bdims) if self.dropout else lambda x, _: x
        normed, gates = [], []
        for i, x in enumerate(xs):
            gate = None
            if x is not None:
                x, gate = RMSNorm(name=_name("pre_attention_norm", i))(x, adarms_cond[i])
            normed.append(x)
            gates.append(gate)
        normed = sharding.activation_sharding_constraint(normed)
        attended, kv_cache = Attention(configs=self.configs, name="attn")(normed, positions, attn_mask, kv_cache)
        attended = jax.tree.map(lambda y: drop(y, deterministic), attended)
        attended = sharding.activation_sharding_constraint(attended)
        xs = [_gated_residual(x, y, g) for x, y, g in zip(xs, attended, gates, strict=True)]
        xs = sharding.activation_sharding_constraint(xs)

        mixed, gates = [], []
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            gate = None
            if x is not None:
                x, gate = RMSNorm(name=_name("pre_ffw_norm", i))(x, adarms_cond[i])
                x = lora.FeedForward(
                    features=cfg.width,
                    hidden_dim=cfg.mlp_dim,
                    name=_name("mlp", i),
                    lora_config=cfg.lora_configs.get("ffn"),
                )(x)
            mixed.append(x)
            gates.append(gate)
        mixed = sharding.activation_sharding_constraint(mixed)
        mixed = jax.tree.map(lambda y: drop(y, deterministic), mixed)
        xs = [_gated_residual(x, y, g) for x, y, g in zip(xs, mixed, gates, strict=True)]
        return sharding.activation_sharding_constraint(xs), kv_cache


class Module(nn.Module):
    """The expert stack: embedder (first expert), scanned + rematerialised blocks, final norms."""

    configs: Sequence[Config]
    embed_dtype: str
    dropout: float = 0.0
    dropout_bdims: tuple[int, ...] = ()
    adarms: bool = False
    vocab_size: int = PALIGEMMA_VOCAB_SIZE

    def setup(self):
        assert all(c.depth == self.configs[0].depth for c in self.configs)
        self.embedder = Embedder(vocab_size=self.vocab_size, embed_dim=self.configs[0].width, name="embedder")
        block = nn.remat(Block, prevent_cse=False, static_argnums=(5,), policy=jax.checkpoint_policies.nothing_saveable)
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.configs[0].depth,
        )(configs=tuple(self.configs), dropout=self.dropout, dropout_bdims=self.dropout_bdims)
        self.final_norms = [RMSNorm(name=_name("final_norm", i)) for i in range(len(self.configs))]

    def embed(self, tokens):
        return self.embedder.encode(tokens).astype(self.embed_dtype)

    def __call__(self, embedded, positions, mask, adarms_cond=None, *, kv_cache=None, deterministic=True):
        embedded = jax.tree.map(lambda e: e.astype(self.embed_dtype), embedded)
        mask = jnp.asarray(mask)[:, None, :, :]
        if adarms_cond is None:
            adarms_cond = [None] * len(self.configs)
        embedded, kv_cache = self.layers(embedded, kv_cache, positions, mask, adarms_cond, deterministic)
        return [
            norm(e, a)[0] if e is not None else None
            for norm, e, a in zip(self.final_norms, embedded, adarms_cond, strict=True)
        ], kv_cache

    def init(self, use_adarms: Sequence[bool]):
        """Create every parameter (linen needs one call that reaches them all)."""
        self.embed(jnp.zeros((1, 1), dtype=jnp.int32))
        n = len(self.configs)
        self(
            [jnp.zeros((1, 1, c.width)) for c in self.configs],
            jnp.zeros((1, n), dtype=jnp.int32),
            jnp.zeros((1, n, n), dtype=bool),
            adarms_cond=[jnp.zeros((1, c.width)) if u else None for u, c in zip(use_adarms, self.configs, strict=True)],
        )


def _apply_rope(x, *, positions, max_wavelength=10_000):
    """Rotary embedding of x (B, L, H, D) at positions (B, L); computed in float32, returned in x's dtype."""
    fraction = (2.0 / x.shape[-1]) * jnp.arange(x.shape[-1] // 2, dtype=jnp.float32)
    angle = (positions[..., None] / max_wavelength ** fraction[None, None, :])[..., None, :]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


def _name(name: str, i: int) -> str:
    """Expert 0 keeps the bare name (so PaliGemma checkpoints load); expert i gets '_i'."""
    return name if i == 0 else f"{name}_{i}"


def _gated_residual(x, y, gate):
    if x is None:
        return None
    return x + y if gate is None else x + y * gate
