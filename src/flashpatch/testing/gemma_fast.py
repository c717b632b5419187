"""A Gemma like `openpi.models.gemma_fast` (pi0-FAST): same signatures, parameters and math.

One expert; the KV cache has a fixed size (the mask's key length) and an index per batch row.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from flashpatch.testing import lora

BIG_NEG = -2.3819763e38


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        dtype = x.dtype
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1]))
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        normed = jnp.asarray(x * jnp.reciprocal(jnp.sqrt(var + 1e-06)))
        return (normed * (1 + scale)).astype(dtype)


class Embedder(nn.Module):
    vocab_size: int
    embed_dim: int

    def setup(self):
        self.input_embedding_table = self.param(
            "input_embedding", nn.initializers.zeros_init(), (self.vocab_size, self.embed_dim)
        )

    def encode(self, x):
        x = self.input_embedding_table[(x,)]
        return x * jnp.sqrt(self.embed_dim).astype(x.dtype)

    def decode(self, x):
        return jnp.dot(x, self.input_embedding_table.T)


class Attention(nn.Module):
    num_heads: int
    num_kv_heads: int
    features: int
    head_dim: int
    cache_dtype: str | None = None
    lora_config: lora.LoRAConfig | None = None

    def setup(self):
        if self.num_kv_heads == self.num_heads:
            self.qkv_einsum = lora.Einsum(
                shape=(3, self.num_heads, self.features, self.head_dim),
                name="qkv_einsum",
                init_fn=nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0, 1)),
                lora_config=self.lora_config,
            )
        else:
            self.q_einsum = lora.Einsum(
                shape=(self.num_heads, self.features, self.head_dim),
                name="q_einsum",
                init_fn=nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
                lora_config=self.lora_config,
            )
            self.kv_einsum = lora.Einsum(
                shape=(2, self.num_kv_heads, self.features, self.head_dim),
                name="kv_einsum",
                init_fn=nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0, 1)),
                lora_config=self.lora_config,
            )
        self.attn_vec_einsum = lora.Einsum(
            shape=(self.num_heads, self.head_dim, self.features),
            name="attn_vec_einsum",
            init_fn=nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
            lora_config=self.lora_config,
        )

    def _init_cache(self, k, v, cache_size):
        """A cache of `cache_size` slots holding k, v in its first slots; idx = next free slot."""
        dtype = self.cache_dtype or k.dtype
        pad = ((0, 0), (0, cache_size - k.shape[1]), (0, 0), (0, 0))
        idx = jnp.zeros((k.shape[0],), dtype=jnp.int32) + k.shape[1]
        return idx, jnp.pad(k.astype(dtype), pad), jnp.pad(v.astype(dtype), pad)

    def _update_cache(self, k, v, idx, k_cache, v_cache):
        """Write one new token at slot idx[0]."""
        assert k.shape[1] == 1, "Only support kv-cache updates of length 1"
        dtype = self.cache_dtype or k.dtype
        at = (0, idx[0], 0, 0)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(dtype), at)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(dtype), at)
        return idx + 1, k_cache, v_cache

    @nn.compact
    def __call__(self, x, positions, attn_mask, kv_cache, decode, deterministic=True):
        dtype = x.dtype
        if self.num_kv_heads == self.num_heads:
            q, k, v = self.qkv_einsum("BSD,3KDH->3BSKH", x)
        else:
            q = self.q_einsum("BTD,NDH->BTNH", x)
            k, v = self.kv_einsum("BSD,2KDH->2BSKH", x)
        q = _apply_rope(q, positions=positions)  # float32 from here on
        q *= self.head_dim**-0.5
        k = _apply_rope(k, positions=positions)

        if kv_cache is None:
            idx, k_cache, v_cache = self._init_cache(k, v, attn_mask.shape[-1])
        else:
            idx, k_cache, v_cache = self._update_cache(k, v, *kv_cache)
        k, v = k_cache, v_cache

        b, t, n, h = q.shape
        q = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        if attn_mask.shape != (b, 1, t, k.shape[1]):
            raise ValueError(
                f"Attention mask with shape {attn_mask.shape} but shapes for q and k are: {q.shape} and {k.shape}"
            )
        logits = jnp.where(attn_mask[:, :, None, :, :], logits, BIG_NEG)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
        return self.attn_vec_einsum("BTNH,NHD->BTD", encoded), (idx, k_cache, v_cache)


class Block(nn.Module):
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    head_dim: int
    hidden_dim: int
    dropout: float = 0.0
    dropout_bdims: tuple[int, ...] = ()
    cache_dtype: str | None = None
    lora_configs: dict = dataclasses.field(default_factory=dict)

    def setup(self):
        self.pre_attention_norm = RMSNorm()
        self.attn = Attention(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            features=self.embed_dim,
            head_dim=self.head_dim,
            cache_dtype=self.cache_dtype,
            lora_config=self.lora_configs.get("attn"),
        )
        self.pre_ffw_norm = RMSNorm()
        self.mlp = lora.FeedForward(
            features=self.embed_dim,
            hidden_dim=self.hidden_dim,
            name="mlp",
            lora_config=self.lora_configs.get("ffn"),
        )
        self.drop = nn.Dropout(self.dropout, self.dropout_bdims) if self.dropout else lambda x, _: x

    def __call__(self, x, kv_cache, positions, attn_mask, decode, deterministic=True):
        attended, kv_cache = self.attn(
            self.pre_attention_norm(x), positions, attn_mask, kv_cache, decode, deterministic
        )
        x = x + self.drop(attended, deterministic)
        return x + self.drop(self.mlp(self.pre_ffw_norm(x)), deterministic), kv_cache


class Module(nn.Module):
    """Embedder, scanned (and by default rematerialised) blocks, final norm, tied unembedding."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    embed_dtype: str = "float32"
    dropout: float = 0.0
    cache_dtype: str | None = None
    remat_policy: str = "nothing_saveable"
    lora_configs: dict = dataclasses.field(default_factory=dict)

    @nn.compact
    def __call__(
        self,
        tokens=None,
        embedded_prefix=None,
        embed_only=False,
        positions=None,
        mask=None,
        decode=False,
        kv_cache=None,
        deterministic=True,
    ):
        """Logits, kv_cache for `embedded_prefix` followed by `tokens` (or their embedding only)."""
        embedder = Embedder(vocab_size=self.vocab_size, embed_dim=self.width, name="embedder")
        parts = [p for p in (embedded_prefix, None if tokens is None else embedder.encode(tokens)) if p is not None]
        x = jnp.concatenate(parts, axis=-2).astype(self.embed_dtype)
        if embed_only:
            return x
        b, t, _ = x.shape
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)[None, :]
        if mask is None:
            mask = nn.attention.make_causal_mask(jnp.ones([b, t]))
        if mask.ndim == 3:
            mask = mask[:, None, :, :]

        block = Block
        if self.remat_policy != "none":
            block = nn.remat(
                Block,
                prevent_cse=False,
                static_argnums=(5, 6),
                policy=getattr(jax.checkpoint_policies, self.remat_policy),
            )
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=self.depth,
        )(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            embed_dim=self.width,
            head_dim=self.head_dim,
            hidden_dim=self.mlp_dim,
            dropout=self.dropout,
            cache_dtype=self.cache_dtype,
            lora_configs=self.lora_configs,
            name="layers",
        )
        x, kv_cache = layers(x, kv_cache, positions, mask, decode, deterministic)
        return embedder.decode(RMSNorm(name="final_norm")(x)), kv_cache

    def init(self):
        """Create every parameter, as openpi's convenience init does (one token, the default float mask)."""
        self(jnp.zeros((1, 1), dtype=jnp.int32))


def _apply_rope(x, *, positions, max_wavelength=10_000):
    """Rotary embedding of x (B, L, H, D) at positions (B, L); the result stays float32, as in openpi."""
    fraction = (2.0 / x.shape[-1]) * jnp.arange(x.shape[-1] // 2, dtype=jnp.float32)
    angle = (positions[..., None] / max_wavelength ** fraction[None, None, :])[..., None, :]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
