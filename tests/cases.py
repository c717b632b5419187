"""Attention problems in openpi's layouts (and a few that are not), shared by the backend tests."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from flashpatch.testing import layouts


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mask: np.ndarray  # (B, T, S) bool
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 16
    structured: bool = True  # the mask is block-causal (a chain), as openpi's are

    def arrays(self, dtype, seed: int = 0):
        """Fresh random q (pre-scaled like openpi), k, v and the (B, 1, T, S) mask."""
        b, t, s = self.mask.shape
        key = jax.random.PRNGKey(zlib.crc32(self.name.encode()) + seed)
        kq, kk, kv = jax.random.split(key, 3)
        q = jax.random.normal(kq, (b, t, self.num_heads, self.head_dim), jnp.float32) * self.head_dim**-0.5
        k = jax.random.normal(kk, (b, s, self.num_kv_heads, self.head_dim), jnp.float32)
        v = jax.random.normal(kv, (b, s, self.num_kv_heads, self.head_dim), jnp.float32)
        return q.astype(dtype), k.astype(dtype), v.astype(dtype), jnp.asarray(self.mask)[:, None]


def _decode_mask(batch: int, cache: int, filled: np.ndarray, start: np.ndarray) -> np.ndarray:
    """pi0-FAST decode step: one query over cache slots [start, filled] (later slots are empty)."""
    idx = np.arange(cache)
    return ((idx[None, :] >= start[:, None]) & (idx[None, :] <= filled[:, None]))[:, None, :]


def _random_mask(batch: int, t: int, s: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, t, s)) < 0.5
    mask[:, 0, :] = False  # one fully masked row
    return mask


def all_cases() -> list[Case]:
    prefix = layouts.pi0(2, 40, actions=9, seed=1)
    return [
        Case("pi0_padding_mid", layouts.pi0(2, 48, actions=10, seed=0).mask),
        Case("pi0_masked_image", layouts.pi0(3, 64, actions=10, masked_image=1, seed=2).mask),
        Case("pi05", layouts.pi0(2, 40, actions=12, state_token=False, seed=3).mask),
        Case("pi0_fast", layouts.pi0_fast(2, 40, causal=13, masked_image=2, seed=4).mask),
        Case("causal_odd", layouts.causal(2, 37).mask),
        Case("prefix_padded", layouts.prefix_only(2, 29, pad=5).mask),
        Case("batch1", layouts.pi0(1, 33, actions=7, seed=5).mask),
        Case("gqa_2kv", layouts.pi0(2, 24, actions=5, seed=6).mask, num_heads=4, num_kv_heads=2),
        Case("mha", layouts.causal(1, 19).mask, num_heads=2, num_kv_heads=2, head_dim=8),
        Case(
            "suffix_over_cache",
            layouts.suffix_over_cache(prefix.valid[:, :40], layouts.pi0(2, 0, actions=9, seed=7)),
        ),
        Case("decode_t1", _decode_mask(2, 41, filled=np.array([17, 30]), start=np.array([0, 4]))),
        Case("arbitrary", _random_mask(2, 21, 23, seed=8), structured=False),
    ]


CASES = {case.name: case for case in all_cases()}
