"""On the GPU: where cudnn_split's time goes, against cuDNN's own floor (issue 9).

Times, forward and forward+backward, side by side on the same inputs (pi0 layout, bf16, 8/1 heads,
head_dim 256): the einsum; raw cuDNN with the dense mask and with no mask at all (the floor); raw
cuDNN with sequence lengths on inputs sorted beforehand (the head alone); the mask analysis alone;
cudnn_split's computation without flashpatch's conditionals; then flashpatch's core around it, one
piece at a time (mask check and fill; the fallback conditional, trivial or real, with and without
rematerialisation; the warning inside the fallback branch or in a second conditional, as earlier cores
had it; the fallback's conditional before the fast path, as the core has it now, ordered or not);
flashpatch's cudnn_split, cudnn and kvax; for the chain backends pallas and flash, their own work
(analysis, key sort, kernel) without the core's conditional and fill, with the fill alone, the whole backend,
and the whole stack under one decision (`*_stack_cond`: analysis and conditional once, outside the scan).

`--layers L` runs each variant L times in a row inside one `lax.scan` (each layer's queries are the last
layer's output), as openpi's layer stack does, and reports ms per layer: costs paid once per call
(dispatch, host callbacks' bookkeeping) spread over the layers, costs paid per layer (a conditional's
predicate read by the host) do not.

Run: PYTHONPATH=src python benchmarks/lab/gpu/split_profile.py --out DIR [--shapes 32x870,2x4096] [--layers 8]
    [--variants einsum,core_cond_remat,...]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, log, medians_in_rounds, openpi_mask, qkv, write

import flashpatch
from flashpatch import backends
from flashpatch.backends import cudnn_split, masks
from flashpatch.backends.base import Problem
from flashpatch.backends.reference import reference_attention
from flashpatch.core import run as core
from flashpatch.core import selection


def variants(problem: Problem) -> dict:
    """name -> fn(q, k, v, mask (B, 1, T, S)); everything a variant needs besides q, k, v is derived from the mask."""

    def sorted_head(q, k, v, mask):
        parts = cudnn_split.split(masks.analyze(mask[:, 0]))
        return cudnn_split.head_attention(
            masks.permute_rows(q, parts.q_order),
            masks.permute_rows(k, parts.k_order),
            masks.permute_rows(v, parts.k_order),
            parts,
            "cudnn",
        )

    def analysis(q, k, v, mask):
        parts = cudnn_split.split(masks.analyze(mask[:, 0]))
        return q * parts.head_rows[:, None, None, None].astype(q.dtype)

    def bare_split(q, k, v, mask):
        parts = cudnn_split.split(masks.analyze(mask[:, 0]))
        return cudnn_split.split_attention(q, k, v, mask[:, 0], parts, problem, mode="einsum", implementation="cudnn")

    backend = cudnn_split.CudnnSplitBackend()

    def bounded_fallback(q, k, v, mask, accepted):
        batch, t, s = mask.shape
        zeroed = [jnp.where(accepted, jnp.zeros((), x.dtype), x) for x in (q, k, v)]
        return jax.nn.dot_product_attention(
            *zeroed,
            mask=mask[:, None],
            scale=1.0,
            query_seq_lengths=jnp.full((batch,), jnp.where(accepted, 1, t), jnp.int32),
            key_value_seq_lengths=jnp.full((batch,), jnp.where(accepted, 1, s), jnp.int32),
            implementation=backend.implementation,
        )

    def staged(cond: str, warn: str = ""):
        """The core's composition around cudnn_split, rebuilt here piece by piece to time each piece.

        cond: "none" (fast path only), "trivial" (a conditional that selects the fast path or zeros),
        "plain" (the real fallback in the conditional), "remat" (the fallback rematerialised, as the core does),
        "select" (a candidate with no conditional: the dense cuDNN fallback always runs, on zeroed inputs cut
        to one row and one key when the fast path is accepted, and a select keeps the right result),
        "early" (the core since run 17: the rematerialised fallback's conditional first, then the fast path,
        ordered after it, and a select), "early_unordered" (the same without the ordering).
        warn: "" (none), "branch" (a callback without operands inside the fallback branch, as the core does),
        "cond" (a conditional of its own, as the core did before commit "one conditional").
        """

        def run(q, k, v, mask):
            mask = mask[:, 0]
            plan = masks.analyze(mask)
            early = cond.startswith("early")
            if not early:
                fast = backend.attend(q, k, v, mask, plan, problem)
            if cond != "none":
                accepted = backend.accepts(plan, problem)
                fallback = backend.attend_fallback
                if cond == "remat" or early:
                    fallback = jax.checkpoint(fallback, static_argnums=(4,))
                if warn == "branch":
                    inner = fallback

                    def fallback(*args):
                        jax.debug.callback(lambda: None)
                        return inner(*args)

                if early:
                    skipped = jnp.zeros(q.shape, problem.out_dtype)
                    other = jax.lax.cond(accepted, lambda: skipped, lambda: fallback(q, k, v, mask, problem))
                    inputs = core._after((q, k, v), other) if cond == "early" else (q, k, v)
                    fast = jnp.where(accepted, backend.attend(*inputs, mask, plan, problem), other)
                elif cond == "trivial":
                    fast = jax.lax.cond(accepted, lambda: fast, lambda: jnp.zeros_like(fast))
                elif cond == "select":
                    fast = jnp.where(accepted, fast, bounded_fallback(q, k, v, mask, accepted).astype(fast.dtype))
                else:
                    fast = jax.lax.cond(accepted, lambda: fast, lambda: fallback(q, k, v, mask, problem))
                if warn == "cond":
                    jax.lax.cond(accepted, lambda: None, lambda: jax.debug.callback(lambda: None))
            fill = core.empty_row_value(v, problem.probs_dtype, problem.num_heads)
            return jnp.where((plan.rank > 0)[:, :, None, None], fast, fill)

        return run

    def flashpatch_backend(name):
        settings = flashpatch.Settings(backend=name)
        return lambda q, k, v, mask: flashpatch.attention(q, k, v, mask, settings=settings)

    def attend_only(name):
        """A chain backend's own work (analysis, sort, kernel) without the core's conditional and fill."""
        chain = backends.get(name)

        def run(q, k, v, mask):
            return chain.attend(q, k, v, mask[:, 0], masks.analyze(mask[:, 0]), problem)

        return run

    def filled(out, v, plan):
        """The core's empty-row fill: openpi's value where a row attends no key."""
        fill = core.empty_row_value(v, problem.probs_dtype, problem.num_heads)
        return jnp.where((plan.rank > 0)[:, :, None, None], out.astype(problem.out_dtype), fill)

    def attend_fill(name):
        """A chain backend's own work and the core's empty-row fill, without the fallback conditional."""
        chain = backends.get(name)

        def run(q, k, v, mask):
            plan = masks.analyze(mask[:, 0])
            return filled(chain.attend(q, k, v, mask[:, 0], plan, problem), v, plan)

        return run

    def stack_cond(name):
        """The whole layer stack under one decision: analysis and the fallback conditional once, outside the scan.

        A candidate for openpi's stack (the mask is the same in every layer): one conditional per stack chooses
        a scan of the fast path (own work and fill per layer) or a scan of the rematerialised fallback, against
        the core's one conditional per layer. `stacked` hands it the number of layers.
        """
        chain = backends.get(name)
        dense = selection.fallback_for(chain, problem)

        def run(q, k, v, mask, layers):
            mask = mask[:, 0]
            plan = masks.analyze(mask)

            def fast_layer(x, _):
                return filled(chain.attend(x, k, v, mask, plan, problem), v, plan).astype(x.dtype), None

            @jax.checkpoint
            def fallback_layer(x, _):
                return filled(dense.attend(x, k, v, mask, problem), v, plan).astype(x.dtype), None

            return jax.lax.cond(
                chain.accepts(plan, problem),
                lambda: jax.lax.scan(fast_layer, q, None, length=layers)[0],
                lambda: jax.lax.scan(fallback_layer, q, None, length=layers)[0],
            )

        run.whole_stack = True
        return run

    return {
        "einsum": lambda q, k, v, mask: reference_attention(q, k, v, mask[:, 0], jnp.bfloat16),
        "cudnn_raw_dense": lambda q, k, v, mask: jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=1.0, implementation="cudnn"
        ),
        "cudnn_raw_nomask": lambda q, k, v, mask: jax.nn.dot_product_attention(
            q, k, v, scale=1.0, implementation="cudnn"
        ),
        "analysis_only": analysis,
        "head_only_sorted": sorted_head,
        "split_no_conds": bare_split,
        "core_no_cond": staged("none"),
        "core_trivial_cond": staged("trivial"),
        "core_cond": staged("plain"),
        "core_cond_remat": staged("remat"),
        "core_cond_remat_warnbranch": staged("remat", warn="branch"),
        "core_cond_remat_warncond": staged("remat", warn="cond"),
        "core_early": staged("early"),
        "core_early_unordered": staged("early_unordered"),
        "core_early_warnbranch": staged("early", warn="branch"),
        "core_select": staged("select"),
        "core_select_warncond": staged("select", warn="cond"),
        "flashpatch_cudnn_split": flashpatch_backend("cudnn_split"),
        "flashpatch_cudnn": flashpatch_backend("cudnn"),
        "flashpatch_kvax": flashpatch_backend("kvax"),
        "pallas_attend_only": attend_only("pallas"),
        "flashpatch_pallas": flashpatch_backend("pallas"),
        "flash_attend_only": attend_only("flash"),
        "flashpatch_flash": flashpatch_backend("flash"),
        "pallas_attend_fill": attend_fill("pallas"),
        "pallas_stack_cond": stack_cond("pallas"),
        "flash_attend_fill": attend_fill("flash"),
        "flash_stack_cond": stack_cond("flash"),
    }


def stacked(fn, layers: int):
    """fn applied `layers` times in a lax.scan, each layer's queries the last one's output (openpi's stack).

    A variant marked `whole_stack` builds its own stack from the number of layers (`stack_cond`).
    """
    if getattr(fn, "whole_stack", False):
        return lambda q, k, v, mask: fn(q, k, v, mask, layers)
    if layers == 1:
        return fn

    def run(q, k, v, mask):
        def layer(x, _):
            return fn(x, k, v, mask).astype(x.dtype), None

        return jax.lax.scan(layer, q, None, length=layers)[0]

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="32x870,2x4096")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget", type=float, default=200.0)
    parser.add_argument("--layers", type=int, default=1, help="variant applied this many times in a scan; ms per layer")
    parser.add_argument("--variants", default="", help="comma-separated subset of the variants (default: all)")
    args = parser.parse_args()
    start = time.time()
    report = {"env": environment(" ".join(sys.argv)), "layers": args.layers, "rows": []}
    for item in args.shapes.split(","):
        if time.time() - start > args.budget:
            break
        batch, length = (int(n) for n in item.split("x"))
        mask = jnp.asarray(openpi_mask(batch, length))[:, None]
        sets = [(*qkv(batch, length, length, seed=s), mask) for s in (0, 1)]
        cot = jax.random.normal(jax.random.PRNGKey(2), sets[0][0].shape, jnp.float32)
        problem = Problem.of(*sets[0][:3], jnp.bfloat16, jax.default_backend())  # "cpu": kernels interpreted
        chosen = variants(problem)
        if args.variants:
            unknown = set(args.variants.split(",")) - set(chosen)
            if unknown:
                raise SystemExit(f"--variants: unknown {sorted(unknown)}; known: {sorted(chosen)}")
            chosen = {name: chosen[name] for name in args.variants.split(",")}
        fns = {}
        for name, fn in chosen.items():
            fn = stacked(fn, args.layers)
            fns[(name, "fwd_ms")] = jax.jit(lambda q, k, v, mask, cot, fn=fn: fn(q, k, v, mask))
            if name != "analysis_only":
                loss = lambda q, k, v, mask, cot, fn=fn: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * cot)  # noqa: E731
                fns[(name, "fwdbwd_ms")] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        # Every variant in rounds (common.medians_in_rounds), so drift over the run falls on all alike.
        medians = medians_in_rounds(fns, [(*inputs, cot) for inputs in sets], args.repeats)
        for name in chosen:
            row = {"batch": batch, "len": length, "variant": name, "layers": args.layers}
            for key in ("fwd_ms", "fwdbwd_ms"):
                value = medians.get((name, key))
                if value is not None:
                    row[key if isinstance(value, float) else "error"] = (
                        value if isinstance(value, str) else value / args.layers
                    )
            report["rows"].append(row)
            log("profile", row)
        write(args.out, "split_profile.json", report)
    log(f"\n=== done in {time.time() - start:.0f}s; ms per layer of {args.layers} ===")
    for r in report["rows"]:
        times = f"{r.get('fwd_ms', float('nan')):7.3f}  {r.get('fwdbwd_ms', float('nan')):7.3f}"
        log(f"{r['batch']:2d}x{r['len']:5d}  {r['variant']:28s} {times}  {r.get('error', '')[:60]}")


if __name__ == "__main__":
    main()
