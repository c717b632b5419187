"""openpi.models.gemma.Attention: several experts share one attention; the cache grows by concatenation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flashpatch.targets.base import Adapter, Core, check_mask, defining_module, openpi_mask


def _lecun(**axes: Any) -> nn.initializers.Initializer:
    return nn.initializers.lecun_normal(**axes)


class GemmaAttention(Adapter):
    kind = "gemma"
    call_parameters = ("self", "xs", "positions", "attn_mask", "kv_cache")
    fields = ("configs",)
    helpers = ("_apply_rope", "_name", "lora.Einsum")

    def check(self, module: Any, call: dict[str, Any]) -> None:
        present = [x for x in call["xs"] if x is not None]
        if not present:
            return
        q_len = sum(x.shape[1] for x in present)
        cached = 0 if call["kv_cache"] is None else call["kv_cache"][0].shape[1]
        check_mask(call["attn_mask"], present[0].shape[0], q_len, cached + q_len)

    def forward(self, module: Any, call: dict[str, Any], core: Core) -> Any:
        home = defining_module(type(module))
        einsum_cls, name = home.lora.Einsum, home._name
        configs = module.configs
        lead = configs[0]
        for attr in ("head_dim", "num_heads", "num_kv_heads"):
            if any(getattr(c, attr) != getattr(lead, attr) for c in configs):
                raise ValueError(f"all experts must share {attr} for joint attention; got {[c for c in configs]}")
        xs = call["xs"]
        dtype = next(x.dtype for x in xs if x is not None)

        parts = []
        for i, (x, config) in enumerate(zip(xs, configs, strict=True)):
            if x is None:
                continue
            lora = config.lora_configs.get("attn")
            heads, width, head_dim = config.num_heads, config.width, config.head_dim
            if config.num_kv_heads == heads:
                qkv = einsum_cls(
                    shape=(3, heads, width, head_dim),
                    name=name("qkv_einsum", i),
                    init_fn=_lecun(in_axis=-2, out_axis=-1, batch_axis=(0, 1)),
                    lora_config=lora,
                )
                parts.append(tuple(qkv("BSD,3KDH->3BSKH", x)))
            else:
                q_proj = einsum_cls(
                    shape=(heads, width, head_dim),
                    name=name("q_einsum", i),
                    init_fn=_lecun(in_axis=-2, out_axis=-1, batch_axis=(0,)),
                    lora_config=lora,
                )
                kv_proj = einsum_cls(
                    shape=(2, config.num_kv_heads, width, head_dim),
                    name=name("kv_einsum", i),
                    init_fn=_lecun(in_axis=-2, out_axis=-1, batch_axis=(0, 1)),
                    lora_config=lora,
                )
                q = q_proj("BTD,NDH->BTNH", x)  # q before kv, as openpi: gradients then sum in its order
                k, v = kv_proj("BSD,2KDH->2BSKH", x)
                parts.append((q, k, v))

        q, k, v = (jnp.concatenate(group, axis=1) for group in zip(*parts, strict=True))
        positions = call["positions"]
        q = home._apply_rope(q, positions=positions) * lead.head_dim**-0.5
        k = home._apply_rope(k, positions=positions)
        if call["kv_cache"] is not None:
            cache_k, cache_v = call["kv_cache"]
            k = jnp.concatenate([cache_k, k], axis=1)
            v = jnp.concatenate([cache_v, v], axis=1)

        # pi0's and pi0.5's masks are a prefix, a state token and an action block: no causal run of several rows.
        encoded = core(q, k, v, openpi_mask(call["attn_mask"]), probs_dtype=dtype, causal_runs=False)

        out, start = [], 0
        for i, (x, config) in enumerate(zip(xs, configs, strict=True)):
            if x is None:
                out.append(None)
                continue
            proj = einsum_cls(
                shape=(config.num_heads, config.head_dim, config.width),
                name=name("attn_vec_einsum", i),
                init_fn=_lecun(in_axis=(-3, -2), out_axis=-1),
                lora_config=config.lora_configs.get("attn"),
            )
            out.append(proj("BTNH,NHD->BTD", encoded[:, start : start + x.shape[1]]))
            start += x.shape[1]
        return out, (k, v)
