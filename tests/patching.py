"""Small models and probes for the toggle tests: which path did an attention call take?

- `tiny_attention()`: openpi's Gemma attention (the `flashpatch.testing` copy) at toy size, with
  parameters drawn by NumPy from `jax.eval_shape`, since compiling JAX's PRNG for every parameter
  shape costs seconds on a 2-core CPU;
- `spy_attention()`: records every call into `flashpatch.core.attention.attention` (made while tracing);
- `ZeroBackend`: an `xla` backend whose attention is all zeros, so a patched Attention returns
  exact zeros and the compiled path can be read off its output.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashpatch.backends.base import DenseBackend
from flashpatch.core import attention as core
from flashpatch.switch.settings import Settings
from flashpatch.testing import gemma

TINY = gemma.get_config("tiny")


def numpy_params(shapes: Any, seed: int = 0) -> Any:
    """Concrete arrays (normal, scale 0.5) for a tree of ShapeDtypeStructs."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype), shapes)


@dataclasses.dataclass(frozen=True)
class TinyAttention:
    """One gemma.Attention with its parameters and a causal call on `seq` tokens."""

    module: gemma.Attention
    params: Any
    x: jax.Array
    positions: jax.Array
    mask: jax.Array

    def __call__(self, params: Any = None, x: jax.Array | None = None) -> jax.Array:
        params = self.params if params is None else params
        x = self.x if x is None else x
        out, _ = self.module.apply(params, [x], self.positions, self.mask, None)
        return out[0]

    def trace(self) -> jax.ShapeDtypeStruct:
        """Trace a call without compiling or running it (enough to see which path it takes)."""
        return jax.eval_shape(self, self.params)


def tiny_attention(seq: int = 8) -> TinyAttention:
    module = gemma.Attention(configs=(TINY,))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, seq, TINY.width)), jnp.float32)
    positions = jnp.arange(seq)[None]
    mask = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), [x], positions, mask, None))
    return TinyAttention(module, numpy_params(shapes), x, positions, mask)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    settings: Settings | None
    site: str
    thread: int


def spy_attention(monkeypatch: pytest.MonkeyPatch) -> list[AttentionCall]:
    """Record each call a patched model makes into flashpatch's attention core.

    Patched modules look `core.attention` up at call time. The layout guard's abstract dry run (once
    per module and input shapes) goes through its own shape-only core, so it is not recorded.
    """
    calls: list[AttentionCall] = []
    real = core.attention

    def spy(*args, **kwargs):
        settings = Settings(kwargs["backend"], verify=kwargs.get("verify", False))
        calls.append(AttentionCall(settings, kwargs.get("site", ""), threading.get_ident()))
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "attention", spy)
    return calls


class ZeroBackend(DenseBackend):
    """Stands in for `xla`: attention output all zeros, so patched results are unmistakable."""

    name = "xla"

    def attend(self, q, k, v, mask, problem):
        return jnp.zeros(q.shape, problem.out_dtype)


def ran_patched(out: jax.Array) -> bool:
    """True for the ZeroBackend's output, False for the original attention's (never all zero here)."""
    out = np.asarray(out)
    assert np.isfinite(out).all(), "NaN/inf in an attention output"
    return not out.any()
