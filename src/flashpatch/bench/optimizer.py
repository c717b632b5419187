"""AdamW with global-norm clipping, as openpi trains pi0 (its defaults); float32 moments."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class AdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


class AdamW(NamedTuple):
    learning_rate: float = 2.5e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-10
    clip_norm: float = 1.0

    def init(self, params: Any) -> AdamState:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return AdamState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.copy, zeros))

    def update(self, params: Any, grads: Any, state: AdamState) -> tuple[Any, AdamState]:
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        scale = jnp.minimum(1.0, self.clip_norm / jnp.maximum(norm, 1e-12))
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: self.b1 * m + (1 - self.b1) * g * scale, state.mu, grads)
        nu = jax.tree.map(lambda v, g: self.b2 * v + (1 - self.b2) * jnp.square(g * scale), state.nu, grads)
        mu_hat = 1 - self.b1 ** count.astype(jnp.float32)
        nu_hat = 1 - self.b2 ** count.astype(jnp.float32)

        def step(p, m, v):
            delta = (m / mu_hat) / (jnp.sqrt(v / nu_hat) + self.eps) + self.weight_decay * p.astype(jnp.float32)
            return (p.astype(jnp.float32) - self.learning_rate * delta).astype(p.dtype)

        return jax.tree.map(step, params, mu, nu), AdamState(count, mu, nu)
