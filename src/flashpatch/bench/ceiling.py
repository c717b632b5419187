"""The attention-free ceiling: the same model step with the attention core replaced by O(B*S*H) work.

What a step would cost if attention were free. The stand-in still reads every key and value of every
row (each output row is the mean over all keys of k + v, broadcast over the heads of its kv group,
plus a small multiple of q), so every token's projections, and with them the whole prefix expert,
stay live in the graph and in the backward pass. A stand-in where each row read only its own token
would let XLA delete the prefix expert from a training step and report a ceiling no attention could
reach. The benchmark checks this from the compiled step's FLOP count (see scenarios/openpi.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from flashpatch import backends
from flashpatch.backends.base import DenseBackend, Problem

NAME = "ceiling"
Q_WEIGHT = 1e-3


class CeilingBackend(DenseBackend):
    """Not attention: mean over keys of (k + v) per kv head, plus Q_WEIGHT * q. For the benchmark only."""

    name = NAME
    dtypes = ("float32", "bfloat16", "float16")

    def attend(self, q, k, v, mask, problem: Problem) -> jax.Array:
        n = q.shape[2]
        pooled = jnp.mean(k.astype(jnp.float32) + v.astype(jnp.float32), axis=1)  # (B, K, H)
        pooled = jnp.repeat(pooled, n // k.shape[2], axis=1)[:, None]  # (B, 1, N, H)
        return (pooled + Q_WEIGHT * q.astype(jnp.float32)).astype(problem.out_dtype)


@contextlib.contextmanager
def registered() -> Iterator[str]:
    """The ceiling as backend 'ceiling' inside the block (so `enable('ceiling')` runs it), gone after."""
    backends.register(NAME, CeilingBackend)
    try:
        yield NAME
    finally:
        backends.unregister(NAME)
