"""Temporary memory of the attention core, from XLA's analysis of the compiled program.

Doubling T = S should about double what the blockwise "xla" backend needs (its temporaries are
(B, N, T, block) for a fixed block), and about quadruple what openpi's einsum ("reference") needs
(it materialises (B, N, T, S) logits and probabilities), in the forward pass and in forward +
backward. Nothing runs: the programs are only compiled, so the sizes can be realistic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import flashpatch
from flashpatch import backends
from flashpatch.backends.reference import reference_attention

SIZES = (2048, 4096)  # T = S; below ~2048 fixed costs blur the trend (1024 -> 2048: x2.66 for dense einsums)
HEADS, KV_HEADS, HEAD_DIM = 4, 1, 32
LINEAR_MAX, QUADRATIC_MIN = 2.5, 3.5  # growth factor per doubling of T


def temp_bytes(backend: str, length: int, backward: bool) -> int:
    """temp_size_in_bytes of the compiled attention (and its gradient wrt q, k, v) at T = S = length."""
    settings = flashpatch.Settings(backend=backend)

    def forward(q, k, v, mask):
        return flashpatch.attention(q, k, v, mask, settings=settings)

    def loss(q, k, v, mask):
        return jnp.sum(forward(q, k, v, mask).astype(jnp.float32))

    fn = jax.grad(loss, argnums=(0, 1, 2)) if backward else forward
    q = jax.ShapeDtypeStruct((1, length, HEADS, HEAD_DIM), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, KV_HEADS, HEAD_DIM), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 1, length, length), jnp.bool_)
    return jax.jit(fn).lower(q, kv, kv, mask).compile().memory_analysis().temp_size_in_bytes


def growth(backend: str, backward: bool) -> tuple[float, str]:
    small, large = (temp_bytes(backend, t, backward) for t in SIZES)
    ratio = large / small
    return (
        ratio,
        f"{backend}: {small / 2**20:.1f} MiB at T={SIZES[0]} -> {large / 2**20:.1f} MiB at T={SIZES[1]} (x{ratio:.2f})",
    )


PASSES = [pytest.param(False, id="forward"), pytest.param(True, id="forward+backward")]


@pytest.mark.parametrize("backward", PASSES)
def test_xla_memory_grows_linearly_and_the_einsums_quadratically(record_property, backward: bool) -> None:
    xla, xla_says = growth("xla", backward)
    reference, reference_says = growth("reference", backward)
    record_property("temp_memory", f"{xla_says}; {reference_says}")
    assert xla < LINEAR_MAX, f"xla temporary memory is not about linear in T: {xla_says} (vs {reference_says})"
    assert reference > QUADRATIC_MIN, f"reference is not about quadratic in T: {reference_says} (vs {xla_says})"


class _Materialises(backends.DenseBackend):
    """Exact, but through openpi's dense einsums: what the check must reject."""

    name = "materialises"

    def attend(self, q, k, v, mask, problem):
        return reference_attention(q, k, v, mask, problem.probs_dtype)


@pytest.mark.parametrize("backward", PASSES)
def test_the_memory_check_catches_a_quadratic_backend(use_backend, backward: bool) -> None:
    use_backend("xla", _Materialises())
    ratio, says = growth("xla", backward)
    assert ratio > QUADRATIC_MIN, f"a backend that materialises T x S logits did not grow quadratically: {says}"
