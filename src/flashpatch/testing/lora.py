"""LoRA-capable Einsum and FeedForward with openpi's parameter names and math."""

from __future__ import annotations

import math
import re

import flax.linen as nn
import flax.struct as struct
import jax.numpy as jnp


@struct.dataclass
class LoRAConfig:
    rank: int
    alpha: float = 1.0
    init_fn: nn.initializers.Initializer = nn.initializers.normal(stddev=0.01)
    rslora: bool = False
    axes: tuple[int, int] = (-2, -1)
    label: str = "L"

    @property
    def scaling_value(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class Einsum(nn.Module):
    """`einsum(eqn, x, w)` with an optional low-rank update w_a @ w_b on two axes of w."""

    shape: tuple[int, ...]
    init_fn: nn.initializers.Initializer = nn.initializers.zeros
    lora_config: LoRAConfig | None = None

    def setup(self):
        self.w = self.param("w", self.init_fn, self.shape)
        cfg = self.lora_config
        if cfg:
            shape_a, shape_b = list(self.shape), list(self.shape)
            shape_a[cfg.axes[1]] = cfg.rank
            shape_b[cfg.axes[0]] = cfg.rank
            self.w_a = self.param("lora_a", cfg.init_fn, shape_a)
            self.w_b = self.param("lora_b", cfg.init_fn, shape_b)

    @nn.compact
    def __call__(self, eqn: str, x):
        dtype = x.dtype
        y = jnp.einsum(eqn, x, self.w.astype(dtype))
        cfg = self.lora_config
        if cfg:
            eqn_a, eqn_b = self._lora_equations(eqn)
            low = jnp.einsum(eqn_a, x, self.w_a.astype(dtype))
            y = y + jnp.einsum(eqn_b, low, self.w_b.astype(dtype)) * cfg.scaling_value
        return y

    def _lora_equations(self, eqn: str) -> tuple[str, str]:
        cfg = self.lora_config
        match = re.fullmatch(r"(.*),(.*)->(.*)", eqn)
        if match is None or cfg.label in eqn:
            raise ValueError(f"cannot add LoRA to einsum {eqn!r}")
        lhs, rhs, out = match.groups()
        in_label, out_label = (rhs[a] for a in cfg.axes)
        mid = out.replace(out_label, cfg.label)
        return (
            f"{lhs},{rhs.replace(out_label, cfg.label)}->{mid}",
            f"{mid},{rhs.replace(in_label, cfg.label)}->{out}",
        )


class FeedForward(nn.Module):
    """Gated GELU MLP with optional LoRA on both matrices."""

    features: int
    hidden_dim: int
    lora_config: LoRAConfig | None = None

    def setup(self):
        self.w_gating = self.param(
            "gating_einsum",
            nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
            (2, self.features, self.hidden_dim),
        )
        self.w_linear = self.param(
            "linear", nn.initializers.lecun_normal(in_axis=-2, out_axis=-1), (self.hidden_dim, self.features)
        )
        self.gating_lora = self.linear_lora = None
        cfg = self.lora_config
        if cfg:
            self.gating_lora = (
                self.param("gating_einsum_lora_a", cfg.init_fn, (2, self.features, cfg.rank)),
                self.param("gating_einsum_lora_b", cfg.init_fn, (2, cfg.rank, self.hidden_dim)),
            )
            self.linear_lora = (
                self.param("linear_lora_a", cfg.init_fn, (self.hidden_dim, cfg.rank)),
                self.param("linear_lora_b", cfg.init_fn, (cfg.rank, self.features)),
            )

    @nn.compact
    def __call__(self, x):
        gate_lora = up_lora = None
        if self.gating_lora is not None:
            gate_lora = (self.gating_lora[0][0], self.gating_lora[1][0])
            up_lora = (self.gating_lora[0][1], self.gating_lora[1][1])
        gate = nn.gelu(_dot(x, self.w_gating[0], gate_lora))
        up = _dot(x, self.w_gating[1], up_lora)
        return _dot(gate * up, self.w_linear, self.linear_lora)


def _dot(x, w, low_rank):
    y = jnp.dot(x, w.astype(x.dtype))
    if low_rank is not None:
        y = y + jnp.dot(jnp.dot(x, low_rank[0].astype(x.dtype)), low_rank[1].astype(x.dtype))
    return y


__all__ = ["Einsum", "FeedForward", "LoRAConfig"]
