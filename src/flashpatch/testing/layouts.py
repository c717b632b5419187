"""openpi's attention-mask layouts, for tests and benchmarks: pi0, pi0.5, pi0-FAST, with padding.

openpi builds every mask from two per-token vectors: `input_mask` (valid token or padding) and
`ar_mask` (True where a token starts a new causal block). Row i attends key j iff both are valid
and cumsum(ar_mask)[j] <= cumsum(ar_mask)[i].
"""

from __future__ import annotations

import dataclasses

import numpy as np


def make_attn_mask(input_mask: np.ndarray, ar_mask: np.ndarray) -> np.ndarray:
    """(B, L, L) bool mask from input_mask (B, L) and ar_mask (B, L) or (L,), as openpi does."""
    input_mask = np.asarray(input_mask, bool)
    ar = np.broadcast_to(np.asarray(ar_mask, bool), input_mask.shape)
    block = np.cumsum(ar, axis=1)
    causal = block[:, None, :] <= block[:, :, None]
    return causal & input_mask[:, None, :] & input_mask[:, :, None]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Token flags for a batch: valid (B, L) and starts-a-block (B, L)."""

    name: str
    valid: np.ndarray
    ar: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return make_attn_mask(self.valid, self.ar)

    @property
    def positions(self) -> np.ndarray:
        return (np.cumsum(self.valid, axis=1) - 1).astype(np.int32)


def pi0(
    batch: int,
    prefix: int,
    *,
    actions: int = 50,
    state_token: bool = True,
    images: int = 3,
    masked_image: int | None = None,
    seed: int = 0,
) -> Layout:
    """pi0 (state_token=True) or pi0.5 (False) training layout.

    Prefix: `images` equal image chunks then a prompt whose tail is padding (a different amount per
    row), all bidirectional; then the suffix: optional state token (its own block) and `actions`
    tokens (one block). `masked_image` marks one image chunk as missing (all padding) in odd rows:
    padding in the middle of the sequence, as when a camera is absent.
    """
    rng = np.random.default_rng(seed)
    suffix = actions + int(state_token)
    length = prefix + suffix
    valid = np.ones((batch, length), bool)
    ar = np.zeros((batch, length), bool)
    image_len = prefix // (images + 1)
    prompt_start = image_len * images
    for b in range(batch):
        pad = int(rng.integers(1, max(2, prefix - prompt_start)))
        valid[b, prefix - pad : prefix] = False
        if masked_image is not None and b % 2 == 1:
            valid[b, masked_image * image_len : (masked_image + 1) * image_len] = False
    ar[:, prefix] = True
    if state_token:
        ar[:, prefix + 1] = True
    return Layout("pi0" if state_token else "pi05", valid, ar)


def pi0_fast(batch: int, prefix: int, *, causal: int = 32, masked_image: int | None = None, seed: int = 0) -> Layout:
    """pi0-FAST training layout: bidirectional prefix with padded prompt, then `causal` tokens."""
    rng = np.random.default_rng(seed)
    length = prefix + causal
    valid = np.ones((batch, length), bool)
    ar = np.zeros((batch, length), bool)
    image_len = prefix // 4
    for b in range(batch):
        pad = int(rng.integers(1, max(2, prefix - 3 * image_len)))
        valid[b, prefix - pad : prefix] = False
        if masked_image is not None and b % 2 == 1:
            valid[b, masked_image * image_len : (masked_image + 1) * image_len] = False
    ar[:, prefix:] = True
    return Layout("pi0_fast", valid, ar)


def causal(batch: int, length: int) -> Layout:
    valid = np.ones((batch, length), bool)
    return Layout("causal", valid, np.ones((batch, length), bool))


def prefix_only(batch: int, length: int, *, pad: int = 0) -> Layout:
    valid = np.ones((batch, length), bool)
    if pad:
        valid[:, length - pad :] = False
    return Layout("prefix", valid, np.zeros((batch, length), bool))


def suffix_over_cache(prefix_valid: np.ndarray, suffix: Layout) -> np.ndarray:
    """pi0's sample_actions mask: suffix rows see every valid prefix key, then the suffix's own mask."""
    batch, t = suffix.valid.shape
    seen = np.broadcast_to(prefix_valid[:, None, :], (batch, t, prefix_valid.shape[1]))
    return np.concatenate([seen, suffix.mask], axis=-1)
