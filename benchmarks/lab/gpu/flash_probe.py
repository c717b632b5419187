"""FA3 through dew-flash-attn on openpi's masks: the varlen decomposition against cuDNN and the einsum.

One process, every variant in turn (common.medians_in_rounds). For each shape: correctness of the
segments decomposition (forward and gradients against float32 openpi math, rows with keys; NaN
in padding), whether rows with no keys come out as zeros, and fwd / fwd+bwd medians of:
einsum (openpi's math + openpi's value for empty rows), cudnn, cudnn_split, flash (segments, mask
analysis inside the call), flash_planned (the analysis done once outside: a model call's layers
share it), flash_no_causal (pi0 masks: the causal call left out), fa3_dense (no mask at all: the
kernel's floor, not exact).

    python benchmarks/lab/gpu/flash_probe.py [--quick] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
import common

import flashpatch
from flashpatch.backends import masks
from flashpatch.backends.flash import segments as sg
from flashpatch.core.run import empty_row_value
from flashpatch.testing import layouts
from flashpatch.testing.conformance import float32_reference


def dew_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    from dew_flash_attn import flash_mha_varlen

    return flash_mha_varlen(
        q, k, v, cu_q, max_q, softmax_scale=1.0, is_causal=causal, key_cu_seqlens=cu_k, key_max_seqlen=max_k
    )


def shapes(quick: bool):
    yield "pi0_b32", layouts.pi0(32, 816, actions=50, masked_image=1, seed=0).mask
    yield "pi0fast_b32", layouts.pi0_fast(32, 768, causal=250, masked_image=1, seed=1).mask
    yield "pi0fast_long_b8", layouts.pi0_fast(8, 1024, causal=1024, masked_image=1, seed=2).mask
    yield "pi0_b2_t4096", layouts.pi0(2, 4045, actions=50, masked_image=1, seed=3).mask
    if not quick:
        yield "pi0_b4_t16384", layouts.pi0(4, 16333, actions=50, masked_image=1, seed=4).mask


def flash_fn(slots=(sg.CONSTANT_SLOTS, sg.CAUSAL_SLOTS), with_causal=True):
    def f(q, k, v, mask):
        m = mask[:, 0]
        mp = masks.analyze(m)
        p = sg.plan(mp, *slots)
        out = sg.attend(
            q, *masks.sorted_keys(k, v, mp, p.k_order), p, mp.rank, dew_kernel, *slots, with_causal=with_causal
        )
        fill = empty_row_value(v, q.dtype, q.shape[2])
        return jnp.where((mp.rank > 0)[:, :, None, None], out.astype(q.dtype), fill), p.exact

    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    t0 = time.time()
    env = common.environment(" ".join(sys.argv))
    common.log(env)
    results = {"environment": env, "cases": []}
    out_dir = os.environ.get("OUT", "/tmp/flash_probe")
    for name, mask_np in shapes(args.quick):
        if time.time() - t0 > args.budget_s:
            common.log(f"{name}: skipped (budget)")
            results["cases"].append({"name": name, "skipped": "budget"})
            continue
        b, t, s = mask_np.shape
        case = {"name": name, "B": b, "T": t, "S": s}
        try:
            q, k, v = common.qkv(b, t, s, seed=1)
            mask = jnp.asarray(mask_np)[:, None]
            rank = mask_np.sum(-1)
            case["useful_pairs"] = int(rank.sum())
            has_causal = "fast" in name
            flash = flash_fn(with_causal=True)
            fl = jax.jit(lambda q, k, v, m: flash(q, k, v, m)[0])
            # correctness
            out, exact = jax.jit(flash)(q, k, v, mask)
            ref = float32_reference(q, k, v, mask)
            rows = (rank > 0)[:, :, None, None]
            case["exact_plan"] = bool(exact)
            case["fwd_err"] = common.rel_err(jnp.where(rows, out, 0), jnp.where(rows, ref, 0))
            case["fwd_finite"] = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
            cot = jax.random.normal(jax.random.PRNGKey(3), out.shape, jnp.float32)
            loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask).astype(jnp.float32) * cot)  # noqa: E731
            g = jax.jit(jax.grad(loss(fl), argnums=(0, 1, 2)))(q, k, v)
            gr = jax.jit(jax.grad(loss(float32_reference), argnums=(0, 1, 2)))(q, k, v)
            case["grad_err"] = {n: common.rel_err(a, e) for n, a, e in zip("qkv", g, gr, strict=True)}
            case["grad_finite"] = all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in g)
            # raw kernel on rows without keys: zeros?
            mp = masks.analyze(mask[:, 0])
            p = sg.plan(mp)
            slots = (sg.CONSTANT_SLOTS, sg.CAUSAL_SLOTS)
            raw = jax.jit(
                lambda q, k, v: sg.attend(
                    q, *masks.sorted_keys(k, v, mp, p.k_order), p, mp.rank, dew_kernel, *slots, with_causal=True
                )
            )(q, k, v)
            case["raw_empty_rows_maxabs"] = float(jnp.max(jnp.abs(jnp.where(rows, 0, raw.astype(jnp.float32)))))
            # NaN in padding
            keys = mask_np.any(-2)[:, :, None, None]
            qn = jnp.where(rows, q, jnp.nan)
            kn = jnp.where(keys, k, jnp.nan)
            on = fl(qn, kn, v, mask)
            case["nan_padding_finite"] = bool(jnp.all(jnp.isfinite(on.astype(jnp.float32))))
            gn = jax.jit(jax.grad(loss(fl), argnums=(0, 1, 2)))(qn, kn, v)
            case["nan_padding_grad_finite"] = all(
                bool(jnp.all(jnp.isfinite(jnp.where(r, x, 0).astype(jnp.float32))))
                for x, r in zip(gn, (rows, keys, True), strict=True)
            )
            common.log(name, {k_: v_ for k_, v_ in case.items()})

            # timing
            def via(backend):
                settings = flashpatch.Settings(backend=backend)
                return lambda q, k, v, m: flashpatch.attention(q, k, v, m, settings=settings)

            p_fixed = p
            variants = {
                "einsum": via("reference"),
                "cudnn": via("cudnn"),
                "cudnn_split": via("cudnn_split"),
                "flash": lambda q, k, v, m: flash(q, k, v, m)[0],
                "flash_planned": lambda q, k, v, m: sg.attend(
                    q, k, v, p_fixed, dew_kernel, sg.CONSTANT_SLOTS, sg.CAUSAL_SLOTS, has_causal
                ),
                "fa3_dense": lambda q, k, v, m: __import__("dew_flash_attn").flash_mha(q, k, v, softmax_scale=1.0),
            }
            if not has_causal:
                variants["flash_no_causal"] = lambda q, k, v, m: flash_fn(with_causal=False)(q, k, v, m)[0]
            fwd = {key: jax.jit(f) for key, f in variants.items()}
            bwd = {
                key: jax.jit(jax.grad(lambda q, k, v, m, f=f: jnp.sum(f(q, k, v, m).astype(jnp.float32)), (0, 1, 2)))
                for key, f in variants.items()
            }
            inputs = [(q, k, v, mask)] + [(*common.qkv(b, t, s, seed=i + 10), mask) for i in range(2)]
            case["fwd_ms"] = common.medians_in_rounds(fwd, inputs, repeats=args.repeats)
            case["fwd_bwd_ms"] = common.medians_in_rounds(bwd, inputs, repeats=args.repeats)
            flops = 4 * 8 * 256 * case["useful_pairs"]
            case["tflops_fwd"] = {
                key: flops / (ms * 1e-3) / 1e12 for key, ms in case["fwd_ms"].items() if isinstance(ms, float)
            }
            case["tflops_fwd_bwd"] = {
                key: 3.5 * flops / (ms * 1e-3) / 1e12 for key, ms in case["fwd_bwd_ms"].items() if isinstance(ms, float)
            }
        except Exception as err:
            case["error"] = f"{type(err).__name__}: {err}"[-2000:]
            traceback.print_exc()
        results["cases"].append(case)
        common.write(out_dir, "flash_probe.json", results)
        common.log(name, "fwd", case.get("fwd_ms"), "fwd+bwd", case.get("fwd_bwd_ms"))

    common.log("\n| case | variant | fwd ms | fwd+bwd ms | TFLOP/s fwd | fwd+bwd |")
    for case in results["cases"]:
        for key, ms in (case.get("fwd_ms") or {}).items():
            fb = case["fwd_bwd_ms"].get(key)
            tf = case["tflops_fwd"].get(key, float("nan"))
            tb = case["tflops_fwd_bwd"].get(key, float("nan"))
            fms = f"{ms:.3f}" if isinstance(ms, float) else str(ms)[:60]
            bms = f"{fb:.3f}" if isinstance(fb, float) else str(fb)[:60]
            common.log(f"| {case['name']} | {key} | {fms} | {bms} | {tf:.0f} | {tb:.0f} |")
    for case in results["cases"]:
        common.log(
            case["name"],
            "exact",
            case.get("exact_plan"),
            "fwd_err",
            case.get("fwd_err"),
            "grad_err",
            case.get("grad_err"),
            "empty",
            case.get("raw_empty_rows_maxabs"),
            "nan ok",
            case.get("nan_padding_finite"),
            case.get("nan_padding_grad_finite"),
            case.get("error", ""),
        )


if __name__ == "__main__":
    main()
