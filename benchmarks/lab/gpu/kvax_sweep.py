"""On the GPU: does kvax run through flashpatch, is it exact on openpi's masks, and which blocks are fastest?

Sections (JSON written after each, so a timeout still returns what ran):
  import      kvax version and the compat fixes applied
  correct     rel.err vs a float32 reference, forward and dq/dk/dv, NaN checks, at openpi shapes
  time        median ms, forward and forward+backward: einsum, xla, kvax (table), cuDNN (dense mask)
  sweep       kvax forward and backward block/warp/stage candidates at head_dim 256
  short       pi0 sample_actions (51 queries over the cache) and pi0-FAST decode (1 query)
  overhead    kvax through flashpatch (mask analysis, sort, block masks) vs the bare kernel call

Run: PYTHONPATH=<kvax site>:src python benchmarks/lab/gpu/kvax_sweep.py --out DIR [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, log, median_ms, medians_in_rounds, openpi_mask, qkv, rel_err, write

import flashpatch
from flashpatch.backends import cudnn_split, masks
from flashpatch.backends import kvax as kvax_backend
from flashpatch.backends.kvax import compat as kvax_compat
from flashpatch.backends.kvax import tuning as kvax_tuning
from flashpatch.backends.kvax.tuning import Blocks, Tuning
from flashpatch.backends.reference import reference_attention
from flashpatch.testing import layouts

SHAPES = {
    "correct": [(2, 512), (2, 1024), (2, 4096)],
    "time": [(2, 1024), (2, 2048), (2, 4096), (8, 1024), (32, 870)],
    "sweep": [(2, 4096), (8, 1024)],
    "short": [(1, 51, 870), (8, 51, 870), (1, 1, 1024), (1, 1, 4096), (8, 1, 4096)],
    "overhead": [(2, 4096), (32, 870)],
}
SMOKE_SHAPES = {  # CPU check of the script itself
    "correct": [(2, 128)],
    "time": [(2, 128)],
    "sweep": [(2, 128)],
    "short": [(1, 51, 120), (1, 1, 64)],
    "overhead": [(2, 128)],
}
FWD_CANDIDATES = [
    Blocks(128, 64, 8, 2),
    Blocks(128, 64, 8, 3),
    Blocks(128, 128, 8, 3),
    Blocks(64, 64, 4, 2),
    Blocks(128, 32, 4, 2),
]
BWD_CANDIDATES = [
    Blocks(64, 128, 8, 2),
    Blocks(32, 32, 4, 2),
    Blocks(64, 64, 4, 2),
    Blocks(32, 64, 4, 2),
    Blocks(64, 64, 8, 2),
    Blocks(32, 128, 8, 2),
]


#: Variants that are a registered backend with other settings: name -> (backend, factory).
VARIANTS = {
    "cudnn_split-cudnntail": ("cudnn_split", lambda: cudnn_split.CudnnSplitBackend(tail_mode="cudnn")),
}


def _as(name: str, impl):
    """flashpatch.attention through `impl` registered as backend `name` for the duration of the call."""
    from flashpatch import backends

    def run(q, k, v, mask):
        with backends.override(name, impl):
            return flashpatch.attention(q, k, v, mask, settings=flashpatch.Settings(backend=name))

    return run


def attention_fn(backend: str, tuning: Tuning | None = None):
    """fn(q, k, v, mask) for one variant; the mask is an argument so XLA cannot constant-fold its analysis."""
    if backend == "cudnn-dense":
        return lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation="cudnn")
    if backend == "kvax" and tuning is not None:
        return _as("kvax", kvax_backend.KvaxBackend(tuning))
    if backend in VARIANTS:
        name, make = VARIANTS[backend]
        return _as(name, make())
    return lambda q, k, v, mask: flashpatch.attention(q, k, v, mask, settings=flashpatch.Settings(backend=backend))


def fwd_bwd(fn, cot):
    """Loss value and (dq, dk, dv); the cotangent is an argument (a closed-over one is constant-folded)."""

    def loss(q, k, v, mask, cot):
        return jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * cot)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return lambda q, k, v, mask: step(q, k, v, mask, cot)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later sections are cut short")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--backends", default="reference,xla,cudnn-dense,kvax", help="comma-separated variants")
    parser.add_argument("--sections", default="correct,time,sweep,short,overhead")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument("--time-shapes", default="", help="override, e.g. 2x1024,2x4096 (batch x length)")
    parser.add_argument("--correct-shapes", default="", help="override, as --time-shapes")
    parser.add_argument("--correct-backends", default="", help="variants the correct section checks (default: all)")
    parser.add_argument("--head-dim", type=int, default=256, help="for the correct and time sections (openpi: 256)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check the script on CPU")
    args = parser.parse_args()
    start = time.time()
    shapes = dict(SMOKE_SHAPES if args.smoke else SHAPES)
    for section, given in (("time", args.time_shapes), ("correct", args.correct_shapes)):
        if given:
            shapes[section] = [tuple(int(n) for n in item.split("x")) for item in given.split(",")]
    over = lambda: time.time() - start > args.budget  # noqa: E731
    report = {
        "env": environment(" ".join(sys.argv)),
        "import": {},
        "correct": [],
        "time": [],
        "sweep": [],
        "short": [],
        "overhead": [],
    }
    save = lambda: write(args.out, f"kvax_sweep{args.tag}.json", report)  # noqa: E731

    try:
        lib = kvax_compat.load()
        report["import"] = {"ok": True, "version": lib.version, "fixes": lib.fixes}
    except Exception as err:
        report["import"] = {"ok": False, "error": repr(err)}
    log("import", report["import"])
    save()
    wanted = args.backends.split(",")
    backends = [b for b in wanted if b != "kvax" or report["import"].get("ok")]
    sections = set(args.sections.split(","))

    # correctness at openpi shapes
    checked = [b for b in backends if not args.correct_backends or b in args.correct_backends.split(",")]
    for batch, length in shapes["correct"] if "correct" in sections else []:
        if over():
            break
        mask = jnp.asarray(openpi_mask(batch, length))[:, None]
        q, k, v = qkv(batch, length, length, head_dim=args.head_dim, seed=length)
        cot = jax.random.normal(jax.random.PRNGKey(1), q.shape, jnp.float32)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        ref_fn = lambda q, k, v, mask: reference_attention(f32(q), f32(k), f32(v), mask[:, 0], jnp.float32)  # noqa: E731
        with jax.default_matmul_precision("highest"):  # no TF32 in the yardstick
            _, ref_grads = fwd_bwd(ref_fn, cot)(q, k, v, mask)
            ref_out = jax.jit(ref_fn)(q, k, v, mask)
        rows = jnp.any(mask[:, 0], -1)[:, :, None, None]
        for backend in checked:
            entry = {"batch": batch, "len": length, "backend": backend}
            try:
                fn = attention_fn(backend)
                out = jax.jit(fn)(q, k, v, mask)
                _, grads = fwd_bwd(fn, cot)(q, k, v, mask)
                entry.update(
                    fwd=rel_err(out, ref_out),
                    fwd_valid_rows=rel_err(jnp.where(rows, out, 0), jnp.where(rows, ref_out, 0)),
                    **{f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, ref_grads, strict=True)},
                    nan=bool(any(jnp.isnan(x.astype(jnp.float32)).any() for x in (out, *grads))),
                )
            except Exception as err:
                entry["error"] = f"{type(err).__name__}: {str(err)[-400:]}"
            report["correct"].append(entry)
            log("correct", entry)
            save()

    # timings, forward and forward+backward
    for batch, length in shapes["time"] if "time" in sections else []:
        if over():
            break
        mask = jnp.asarray(openpi_mask(batch, length))[:, None]
        sets = [(*qkv(batch, length, length, head_dim=args.head_dim, seed=s), mask) for s in (0, 1)]
        cot = jax.random.normal(jax.random.PRNGKey(2), sets[0][0].shape, jnp.float32)
        # Every variant's forward and fwd+bwd, in rounds (common.medians_in_rounds), on the same inputs.
        fns = {}
        for backend in backends:
            fn = attention_fn(backend)
            fns[(backend, "fwd_ms")] = jax.jit(fn)
            fns[(backend, "fwdbwd_ms")] = fwd_bwd(fn, cot)
        medians = medians_in_rounds(fns, sets, args.repeats)
        entries = []
        for backend in backends:
            entry = {"batch": batch, "len": length, "backend": backend}
            for key in ("fwd_ms", "fwdbwd_ms"):
                value = medians[(backend, key)]
                entry[key if isinstance(value, float) else "error"] = value
            entries.append(entry)
        base = next((e for e in entries if e["backend"] == "reference" and "error" not in e), None)
        for entry in entries:
            if base and "error" not in entry:
                entry["fwd_speedup"] = base["fwd_ms"] / entry["fwd_ms"]
                entry["fwdbwd_speedup"] = base["fwdbwd_ms"] / entry["fwdbwd_ms"]
            log("time", entry)
        report["time"] += entries
        save()

    # block sweep
    if report["import"].get("ok") and "sweep" in sections:
        for batch, length in shapes["sweep"]:
            mask = jnp.asarray(openpi_mask(batch, length))[:, None]
            sets = [(*qkv(batch, length, length, seed=s), mask) for s in (0, 1)]
            cot = jax.random.normal(jax.random.PRNGKey(2), sets[0][0].shape, jnp.float32)
            for fwd in FWD_CANDIDATES:
                if over():
                    break
                entry = {"batch": batch, "len": length, "fwd": str(fwd)}
                try:
                    fn = attention_fn("kvax", Tuning(1 << 30, fwd, BWD_CANDIDATES[0]))
                    entry["fwd_ms"] = median_ms(jax.jit(fn), sets, args.repeats)
                except Exception as err:
                    entry["error"] = f"{type(err).__name__}: {str(err)[-300:]}"
                report["sweep"].append(entry)
                log("sweep", entry)
                save()
            best_fwd = min(
                (e for e in report["sweep"] if e.get("len") == length and "fwd_ms" in e and "bwd" not in e),
                key=lambda e: e["fwd_ms"],
                default=None,
            )
            chosen_fwd = next((b for b in FWD_CANDIDATES if best_fwd and str(b) == best_fwd["fwd"]), FWD_CANDIDATES[0])
            for bwd in BWD_CANDIDATES:
                if over():
                    break
                entry = {"batch": batch, "len": length, "fwd": str(chosen_fwd), "bwd": str(bwd)}
                try:
                    fn = attention_fn("kvax", Tuning(1 << 30, chosen_fwd, bwd))
                    entry["fwdbwd_ms"] = median_ms(fwd_bwd(fn, cot), sets, args.repeats)
                except Exception as err:
                    entry["error"] = f"{type(err).__name__}: {str(err)[-300:]}"
                report["sweep"].append(entry)
                log("sweep", entry)
                save()

    # short queries: pi0 sample_actions and pi0-FAST decode
    for batch, t, s in shapes["short"] if "short" in sections else []:
        if over():
            break
        if t > 1:  # pi0 sample_actions: suffix rows over the valid prefix keys and their own block-causal mask
            prefix_valid = openpi_mask(batch, s)[:, 0, : s - 51]
            mask = layouts.suffix_over_cache(prefix_valid, layouts.pi0(batch, 0, actions=50))
        else:  # pi0-FAST decode: one query over the filled cache slots of a fixed-size cache
            mask = (np.arange(s)[None, None, :] <= s // 2).repeat(batch, 0)
        mask = jnp.asarray(mask)[:, None]
        sets = [(*qkv(batch, t, mask.shape[-1], seed=i), mask) for i in (0, 1)]
        base = None
        for backend in backends:
            entry = {"batch": batch, "q_len": t, "kv_len": mask.shape[-1], "backend": backend}
            try:
                fn = jax.jit(attention_fn(backend))
                ref = reference_attention(*(x.astype(jnp.float32) for x in sets[0][:3]), mask[:, 0], jnp.float32)
                entry["fwd"] = rel_err(fn(*sets[0]), ref)
                entry["fwd_ms"] = median_ms(fn, sets, args.repeats * 2)
                base = base or entry["fwd_ms"]
                entry["speedup"] = base / entry["fwd_ms"]
            except Exception as err:
                entry["error"] = f"{type(err).__name__}: {str(err)[-300:]}"
            report["short"].append(entry)
            log("short", entry)
            save()

    # per-call overhead of the layout work (analysis, sort, block masks) against the bare kernel
    if report["import"].get("ok") and "overhead" in sections and not over():
        for batch, length in shapes["overhead"]:
            mask = jnp.asarray(openpi_mask(batch, length))[:, None]
            sets = [(*qkv(batch, length, length, seed=s), mask) for s in (0, 1)]
            plan = masks.analyze(mask[:, 0])
            tuning = kvax_tuning.choose(256, length)
            q_order, k_order, q_pos, k_pos = kvax_backend.causal_layout(plan)
            g = masks.gather_rows
            sorted_sets = [(g(q, q_order), g(k, k_order), g(v, k_order)) for q, k, v, _ in sets]
            bare = jax.jit(lambda q, k, v: kvax_backend._kvax_causal(q, k, v, q_pos, k_pos, tuning))
            full = jax.jit(attention_fn("kvax"))
            entry = {
                "batch": batch,
                "len": length,
                "bare_kernel_ms": median_ms(bare, sorted_sets, args.repeats),
                "flashpatch_kvax_ms": median_ms(full, sets, args.repeats),
            }
            report["overhead"].append(entry)
            log("overhead", entry)
            save()

    log(f"\n=== done in {time.time() - start:.0f}s ===")
    log("backend        B x T      fwd ms  (x einsum)   fwd+bwd ms (x einsum)")
    for e in report["time"]:
        if "error" in e:
            log(f"{e['backend']:13s} {e['batch']:2d}x{e['len']:5d}  ERROR {e['error'][:80]}")
        else:
            log(
                f"{e['backend']:13s} {e['batch']:2d}x{e['len']:5d}  {e['fwd_ms']:7.3f} ({e['fwd_speedup']:.2f}x)  {e['fwdbwd_ms']:8.3f} ({e['fwdbwd_speedup']:.2f}x)"
            )


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
