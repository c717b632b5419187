"""openpi.models.gemma_fast.Attention (pi0-FAST): one expert, a fixed-size KV cache with an index."""

from __future__ import annotations

from typing import Any

from flashpatch.targets.base import Adapter, Core, check_mask, defining_module, openpi_mask


class GemmaFastAttention(Adapter):
    kind = "gemma_fast"
    call_parameters = ("self", "x", "positions", "attn_mask", "kv_cache", "decode", "deterministic")
    fields = ("num_heads", "num_kv_heads", "features", "head_dim", "cache_dtype", "lora_config")
    methods = ("setup", "_init_cache", "_update_cache")
    helpers = ("_apply_rope",)

    def check(self, module: Any, call: dict[str, Any]) -> None:
        batch, q_len = call["x"].shape[:2]
        kv_cache = call["kv_cache"]
        check_mask(call["attn_mask"], batch, q_len, None if kv_cache is None else kv_cache[1].shape[1])

    def forward(self, module: Any, call: dict[str, Any], core: Core) -> Any:
        home = defining_module(type(module))
        x, positions, attn_mask = call["x"], call["positions"], call["attn_mask"]
        dtype = x.dtype
        if module.num_kv_heads == module.num_heads:
            q, k, v = module.qkv_einsum("BSD,3KDH->3BSKH", x)
        else:
            q = module.q_einsum("BTD,NDH->BTNH", x)
            k, v = module.kv_einsum("BSD,2KDH->2BSKH", x)
        q = home._apply_rope(q, positions=positions) * module.head_dim**-0.5
        k = home._apply_rope(k, positions=positions)

        if call["kv_cache"] is None:
            idx, k_cache, v_cache = module._init_cache(k, v, attn_mask.shape[-1])
        else:
            idx, k_cache, v_cache = module._update_cache(k, v, *call["kv_cache"])

        encoded = core(q, k_cache, v_cache, openpi_mask(attn_mask), probs_dtype=dtype)
        return module.attn_vec_einsum("BTNH,NHD->BTD", encoded), (idx, k_cache, v_cache)
