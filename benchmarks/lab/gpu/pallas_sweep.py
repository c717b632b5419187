"""On the H200: is flashpatch's Pallas kernel exact at openpi's shapes, and how fast is it against the others?

One process, openpi's layout (8 q heads, 1 kv head, head_dim 256, bf16), for each shape:

  correct   the kernel (each candidate tiling) and the whole `pallas` backend against float32: rel.err of
            the output (rows that attend keys) and of dq, dk, dv; at 4 x 16384 the forward only, on a
            slice of rows (a float32 reference of everything would not fit)
  time      median ms of >= 20 synchronised calls after warm-up, forward and forward+backward, every variant
            in rounds of consecutive calls (`common.medians_in_rounds`; timed one after the other, one run's
            kernel forward at 32 x 870 came out 1.8x slower than in three others):
              einsum            openpi's math (`reference_attention`) with the dense mask
              pallas[<config>]  the kernel alone, keys already sorted, one entry per candidate tiling
              flashpatch        `flashpatch.attention(..., backend="pallas")`: mask analysis, key sort, the
                                in-graph chain check and the kernel (what openpi would run)
              cudnn_causal      `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`: plain
                                causal attention, a reference point (not openpi's mask)
              pallas_causal     the kernel on plain causal attention (rank t+1), like for like with the two below
              jax_mha[...]      JAX's own Pallas `mha(causal=True)` with K/V repeated to 8 heads, T padded to a
                                multiple of 128, a reference point (four tilings, two with --quick; its default does
                                not fit sm90)
  memory    XLA's temp + output bytes of each compiled function (`memory_analysis`), and the device's peak

Useful TFLOP/s counts only the (query, key) pairs a variant's mask attends: forward = 4 * N * H * pairs
(QK^T and PV), forward+backward = 3.5 x forward (the backward's five products are 2.5 x the forward, the
FlashAttention papers' convention). pairs = sum of ranks (openpi's mask) or B * T(T+1)/2 (causal).

Shapes (B x T = S): 32 x 870 with a pi0 training mask (padding mid-sequence, a missing image); 2 x 4096
and 4 x 16384 with causal-ish chain masks (pi0-FAST's layout: a bidirectional prefix of T/4 with padding,
then causal). Every variant runs in try/except and records its error; a time budget stops the run
before the device call's limit, the JSON (rewritten after each shape) keeps what ran.

Run (device machine, repository root):
  PYTHONPATH=src PYTHONUNBUFFERED=1 python3 benchmarks/lab/gpu/pallas_sweep.py --budget 220
  [--quick] [--configs sm90-128x64,sm90-64x64] [--shapes 32x870,2x4096]
CPU check of the script itself (interpret mode, tiny shapes): --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, log, medians_in_rounds

import flashpatch
from flashpatch.backends import machine, masks
from flashpatch.backends.pallas import kernel, tiling
from flashpatch.backends.reference import reference_attention
from flashpatch.testing import layouts

HEADS, KV_HEADS, HEAD_DIM = 8, 1, 256
SHAPES = {"32x870": (32, 870, "pi0"), "2x4096": (2, 4096, "chain"), "4x16384": (4, 16384, "chain")}
QUICK_SHAPES = ("32x870", "2x4096")
SMOKE_SHAPES = {"2x120": (2, 120, "pi0"), "1x256": (1, 256, "chain")}
#: The einsum materialises B*N*T*S float32 logits and more for its gradient: past this many pairs it is skipped.
EINSUM_MAX_PAIRS = 2**31
#: JAX's Pallas Triton `mha`: (block_q, block_k, num_warps, backward blocks); T is padded to a multiple of 128.
MHA_TILINGS = ((64, 64, 4, 32), (128, 64, 8, 32), (64, 32, 4, 32), (64, 64, 8, 64))
MHA_MULTIPLE = 128
#: A float32 reference of the whole problem up to this many (B*N*T*S) pairs; beyond, a slice of rows, forward only.
REFERENCE_MAX_PAIRS = 2**30
REFERENCE_ROWS = 1024
#: --smoke: 2x120 checks everything, 1x256 a slice of rows (both branches of the check run on CPU).
SMOKE_REFERENCE_MAX_PAIRS = 2**18


# --- inputs ---


def make_mask(batch: int, length: int, kind: str, seed: int = 0) -> jax.Array:
    """(B, T, T) bool on the device: pi0 training mask, or pi0-FAST's (prefix T/4, then causal)."""
    if kind == "pi0":
        layout = layouts.pi0(batch, length - 51, actions=50, masked_image=1, seed=seed)
    else:
        prefix = length // 4
        layout = layouts.pi0_fast(batch, prefix, causal=length - prefix, masked_image=1, seed=seed)
    valid = jnp.asarray(layout.valid)
    block = jnp.cumsum(jnp.asarray(layout.ar, jnp.int32), axis=1)
    return (block[:, None, :] <= block[:, :, None]) & valid[:, None, :] & valid[:, :, None]


def make_qkv(batch: int, length: int, seed: int = 0):
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = (jax.random.normal(kq, (batch, length, HEADS, HEAD_DIM)) * HEAD_DIM**-0.5).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (batch, length, KV_HEADS, HEAD_DIM)).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (batch, length, KV_HEADS, HEAD_DIM)).astype(jnp.bfloat16)
    cot = jax.random.normal(kc, q.shape, jnp.float32)
    return q, k, v, cot


def prefix_reference(q, k, v, rank):
    """float32 attention of row t over keys [0, rank[b, t]), rows with rank 0 -> 0 (the kernel's contract)."""
    g = q.shape[2] // k.shape[2]
    kk = jnp.repeat(k.astype(jnp.float32), g, axis=2)
    vv = jnp.repeat(v.astype(jnp.float32), g, axis=2)
    visible = jnp.arange(k.shape[1])[None, None, :] < rank[:, :, None]
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kk, precision="highest")
    logits = jnp.where(visible[:, None], logits, -jnp.inf)
    logits = jnp.where(jnp.any(visible, -1)[:, None, :, None], logits, 0.0)
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), vv, precision="highest")
    return jnp.where((rank > 0)[:, :, None, None], out, 0.0)


def causal_rank(batch: int, length: int) -> jax.Array:
    """(B, T) ranks of plain causal attention: row t attends keys [0, t]."""
    return jnp.broadcast_to(jnp.arange(1, length + 1, dtype=jnp.int32), (batch, length))


def rel_err(out, ref, rows=None) -> float:
    out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
    if rows is not None:
        out, ref = jnp.where(rows, out, 0.0), jnp.where(rows, ref, 0.0)
    return float(jnp.linalg.norm(out - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[-600:]}"


# --- variants: each a function of (q, k, v) in openpi's layout ---


def variants(batch, length, mask, plan, configs, interpret: bool, quick: bool):
    """name -> (fn(q, k, v, mask, rank), pairs, note); the `pallas[...]` entries get keys sorted by the caller.

    The mask and ranks are arguments, not closed-over constants: XLA would fold a 1 GB mask into the program.
    """
    rank = plan.rank
    pairs = int(np.asarray(rank, np.int64).sum())
    causal_pairs = batch * length * (length + 1) // 2
    out: dict = {}
    if batch * HEADS * length * length <= EINSUM_MAX_PAIRS:
        out["einsum"] = (lambda q, k, v, m, r: reference_attention(q, k, v, m, jnp.bfloat16), pairs, "dense mask")
    for config in configs:
        out[f"pallas[{config.name}]"] = (
            lambda q, k, v, m, r, config=config: kernel.flash_attention(q, k, v, r, config=config, interpret=interpret),
            pairs,
            "sorted keys",
        )
    causal = causal_rank(batch, length)
    out["pallas_causal"] = (
        lambda q, k, v, m, r: kernel.flash_attention(q, k, v, causal, interpret=interpret),
        causal_pairs,
        "plain causal, this GPU's default tiling",
    )
    settings = flashpatch.Settings(backend="pallas")
    out["flashpatch"] = (lambda q, k, v, m, r: flashpatch.attention(q, k, v, m[:, None], settings=settings), pairs, "")
    if interpret:  # cuDNN and JAX's Triton mha need the GPU
        return out
    out["cudnn_causal"] = (
        lambda q, k, v, m, r: jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=True, implementation="cudnn"),
        causal_pairs,
        "plain causal",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as jax_attention
    # (block_q, block_k, num_warps, backward blocks): the default (128 x 128) needs more shared memory than an H200
    # has at head_dim 256; these four are the ones the kernel probes of 2026-12-01 took the best of.
    tilings = MHA_TILINGS[:2] if quick else MHA_TILINGS
    for block_q, block_k, warps, back in tilings:
        sizes = jax_attention.BlockSizes(
            block_q=block_q, block_k=block_k, block_q_dkv=back, block_kv_dkv=back, block_q_dq=back, block_kv_dq=back
        )

        def mha(q, k, v, m, r, sizes=sizes, warps=warps):
            # its blocks must divide T: pad the end with zeros (under a causal mask no real row sees a padded key)
            g = q.shape[2] // k.shape[2]
            pad = -q.shape[1] % MHA_MULTIPLE
            q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
            k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
            o = jax_attention.mha(
                q, k, v, None, sm_scale=1.0, causal=True, block_sizes=sizes, num_warps=warps, num_stages=2
            )
            return o[:, : o.shape[1] - pad]

        out[f"jax_mha[q{block_q}k{block_k}w{warps}b{back}]"] = (mha, causal_pairs, "K/V repeated, plain causal")
    return out


def with_grad(fn):
    """(q, k, v, mask, rank, cot) -> loss and d(q, k, v) of sum(fn(q, k, v, mask, rank) * cot)."""

    def loss(q, k, v, mask, rank, cot):
        return jnp.sum(fn(q, k, v, mask, rank).astype(jnp.float32) * cot)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


def compiled_bytes(jitted, *args) -> dict:
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
        return {"temp_bytes": int(analysis.temp_size_in_bytes), "output_bytes": int(analysis.output_size_in_bytes)}
    except Exception as err:
        return {"memory_error": error_text(err)}


# --- one shape ---


def run_shape(name, batch, length, kind, args, configs, interpret, deadline, record) -> None:
    log(f"== {name}: B={batch} T=S={length} {kind} mask")
    q, k, v, cot = make_qkv(batch, length)
    mask = make_mask(batch, length, kind)
    plan = jax.jit(masks.analyze)(mask)
    assert bool(plan.exact), "the benchmark's mask must be a chain"
    order = masks.key_order(plan)
    k_sorted, v_sorted = masks.gather_rows(k, order), masks.gather_rows(v, order)
    found = variants(batch, length, mask, plan, configs, interpret, args.quick)
    shape = record["shapes"].setdefault(name, {"batch": batch, "length": length, "mask": kind, "variants": {}})
    shape["pairs"] = found[next(iter(found))][1] if found else None
    real_rows = (plan.rank > 0)[:, :, None, None]

    # correctness of the kernel (every candidate) and the backend against float32
    whole = batch * HEADS * length * length <= (SMOKE_REFERENCE_MAX_PAIRS if args.smoke else REFERENCE_MAX_PAIRS)
    rows = slice(length - min(REFERENCE_ROWS, length), length)  # without `whole`: the causal tail, the longest rows
    check = {}
    ref_out = None
    try:
        if whole:
            reference = lambda q, k, v, m, r: prefix_reference(q, k, v, r)  # noqa: E731
            ref_out = jax.jit(reference)(q, k_sorted, v_sorted, mask, plan.rank)
            ref_grads = jax.jit(with_grad(reference))(q, k_sorted, v_sorted, mask, plan.rank, cot)[1]
            f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
            openpi_ref = jax.jit(lambda q, k, v, m: reference_attention(f32(q), f32(k), f32(v), m, jnp.float32))(
                q, k, v, mask
            )
        else:
            ref_out = jax.jit(lambda q, k, v, r: prefix_reference(q[:, rows], k, v, r[:, rows]))(
                q, k_sorted, v_sorted, plan.rank
            )
    except Exception as err:
        check["reference"] = error_text(err)
        ref_out = None
    causal_ref = None
    if whole:
        try:
            causal_ref = jax.jit(prefix_reference)(q, k, v, causal_rank(batch, length))
        except Exception as err:
            check["causal_reference"] = error_text(err)
    for vname, (fn, _, note) in found.items():
        if "plain causal" in note and causal_ref is not None and time.monotonic() <= deadline:
            try:  # the reference points: forward only, against float32 causal attention
                out = jax.jit(fn)(q, k, v, mask, plan.rank)
                check[vname] = {"out": rel_err(out, causal_ref), "finite": bool(jnp.all(jnp.isfinite(out)))}
            except Exception as err:
                check[vname] = error_text(err)
            continue
        if not (vname.startswith("pallas[") or vname == "flashpatch") or ref_out is None:
            continue
        if time.monotonic() > deadline:
            check[vname] = "skipped: time budget"
            continue
        sorted_inputs = vname.startswith("pallas[")
        inputs = ((q, k_sorted, v_sorted) if sorted_inputs else (q, k, v)) + (mask, plan.rank)
        try:
            out = jax.jit(fn)(*inputs)
            entry = {"finite": bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))}
            if whole:
                want = ref_out if sorted_inputs else openpi_ref
                entry["out"] = rel_err(out, want, real_rows if sorted_inputs else None)
                if sorted_inputs:
                    grads = jax.jit(with_grad(fn))(*inputs, cot)[1]
                    for gname, got, exp in zip("qkv", grads, ref_grads, strict=True):
                        entry[f"d{gname}"] = rel_err(got, exp)
                    entry["grads_finite"] = all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)
            else:
                entry["out_rows"] = rel_err(out[:, rows], ref_out, real_rows[:, rows])
            check[vname] = entry
        except Exception as err:
            check[vname] = error_text(err)
            log(f"   correct {vname}: {check[vname][:300]}")
    shape["correct"] = check
    log(f"   correct: {json.dumps(check, default=str)[:1500]}")

    # timings: every variant compiled and warmed within the budget, then all timed in rounds
    # (common.medians_in_rounds), so a drift of clocks or memory over the run falls on every variant alike
    fns = {}
    for vname, (fn, pairs, note) in found.items():
        entry = shape["variants"].setdefault(vname, {"pairs": pairs, "note": note})
        qkv = (q, k_sorted, v_sorted) if vname.startswith("pallas[") else (q, k, v)
        for mode in ("fwd", "fwd+bwd"):
            if time.monotonic() > deadline:
                entry[mode] = "skipped: time budget"
                continue
            args_ = (*qkv, mask, plan.rank) if mode == "fwd" else (*qkv, mask, plan.rank, cot)
            jitted = jax.jit(fn if mode == "fwd" else with_grad(fn))
            try:
                entry[mode] = compiled_bytes(jitted, *args_)
                fns[(vname, mode)] = lambda jitted=jitted, args_=args_: jitted(*args_)
            except Exception as err:
                entry[mode] = error_text(err)
                log(f"   {vname:28s} {mode:8s} failed: {entry[mode][:300]}")
    medians = medians_in_rounds(fns, [()], repeats=args.repeats, warmup=2)
    for (vname, mode), ms in medians.items():
        entry = shape["variants"][vname]
        if isinstance(ms, str):
            entry[mode] = ms
            log(f"   {vname:28s} {mode:8s} failed: {ms[:300]}")
            continue
        flops = 4 * HEADS * HEAD_DIM * entry["pairs"] * (1.0 if mode == "fwd" else 3.5)
        entry[mode] = {"ms": ms, "tflops": flops / ms / 1e9, **entry[mode]}
        log(f"   {vname:28s} {mode:8s} {ms:9.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s")


def table(record) -> str:
    lines = [
        f"{'shape':9s} {'variant':28s} {'fwd ms':>9s} {'TF/s':>6s} {'f+b ms':>9s} {'TF/s':>6s} "
        f"{'f+b temp MB':>11s} {'err out':>8s} {'err dq':>8s}  note"
    ]
    for sname, shape in record["shapes"].items():
        for vname, entry in shape["variants"].items():
            cells = []
            for mode in ("fwd", "fwd+bwd"):
                value = entry.get(mode)
                if isinstance(value, dict):
                    cells += [f"{value['ms']:9.3f}", f"{value['tflops']:6.1f}"]
                else:
                    cells += [f"{'-':>9s}", f"{'-':>6s}"]
            bwd = entry.get("fwd+bwd")
            temp = (
                f"{bwd['temp_bytes'] / 2**20:11.0f}" if isinstance(bwd, dict) and "temp_bytes" in bwd else f"{'-':>11s}"
            )
            check = shape.get("correct", {}).get(vname)
            if isinstance(check, dict):
                err_out = check.get("out", check.get("out_rows"))
                errs = [f"{err_out:8.1e}" if err_out is not None else f"{'-':>8s}"]
                errs.append(f"{check['dq']:8.1e}" if "dq" in check else f"{'-':>8s}")
            else:
                errs = [f"{'-':>8s}", f"{'-':>8s}"]
            failed = [m for m in ("fwd", "fwd+bwd") if isinstance(entry.get(m), str)]
            note = entry.get("note", "") + (f" [{', '.join(failed)}: {entry[failed[0]][:60]}]" if failed else "")
            lines.append(
                f"{sname:9s} {vname:28s} {' '.join(cells[:2])} {' '.join(cells[2:])} {temp} {' '.join(errs)}  {note}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="32x870 and 2x4096 only, two tilings, fewer reference points"
    )
    parser.add_argument("--budget", type=float, default=220.0, help="seconds; later steps are skipped past it")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per variant (median; at least 20)")
    parser.add_argument("--configs", default="", help="comma-separated tiling names (default: this GPU's candidates)")
    parser.add_argument("--shapes", default="", help="comma-separated BxT from " + ",".join(SHAPES))
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: interpret mode, tiny shapes")
    args = parser.parse_args()
    args.repeats = max(args.repeats, 20)
    start = time.monotonic()
    deadline = start + args.budget
    interpret = args.smoke or jax.default_backend() != "gpu"
    gpu = None if interpret else machine.gpu()
    cc = None if gpu is None else f"{gpu.capability[0]}.{gpu.capability[1]}"
    known = {
        c.name: c for c in (*tiling.SM100, *tiling.SM90, *tiling.SM80, *tiling.SM86, tiling.SMALLEST, tiling.INTERPRET)
    }
    if args.configs:
        configs = [known[name] for name in args.configs.split(",")]
    elif interpret:
        configs = [tiling.INTERPRET]
    else:
        fitting = [c for c in tiling.candidates(cc) if tiling.fits(c, cc, HEAD_DIM, jnp.bfloat16)]
        configs = fitting[:2] if args.quick else fitting
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    names = args.shapes.split(",") if args.shapes else [n for n in shapes if not args.quick or n in QUICK_SHAPES]

    record = {
        "environment": environment(" ".join(sys.argv)),
        "compute_capability": cc,
        "configs": {c.name: repr(c) for c in configs},
        "default_config": tiling.config_for(cc, HEAD_DIM, jnp.bfloat16).name,
        "flops_convention": "fwd = 4*N*H*pairs, fwd+bwd = 3.5 * fwd; pairs = attended (query, key) pairs",
        "shapes": {},
    }
    out_dir = os.environ.get("OUT")

    def save() -> None:
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            Path(out_dir, "pallas_sweep.json").write_text(json.dumps(record, indent=1, default=str))

    log(f"device {record['environment']['device']}, cc {cc}, configs {[c.name for c in configs]}")
    for name in names:
        if time.monotonic() > deadline:
            record["shapes"][name] = {"skipped": "time budget"}
            continue
        batch, length, kind = shapes[name]
        try:
            run_shape(name, batch, length, kind, args, configs, interpret, deadline, record)
        except Exception as err:
            record["shapes"].setdefault(name, {})["error"] = error_text(err)
            log(f"   {name} failed: {traceback.format_exc()[-1500:]}")
        save()
    try:
        stats = jax.devices()[0].memory_stats() or {}
        record["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    except Exception as err:
        record["device_peak_bytes"] = error_text(err)
    record["seconds"] = time.monotonic() - start
    save()
    log(f"\nTFLOP/s: {record['flops_convention']}; peak device memory {record['device_peak_bytes']}")
    log(table(record))


if __name__ == "__main__":
    main()
