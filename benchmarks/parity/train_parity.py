"""End-to-end training parity: a pi0-style model trained with and without flashpatch.

Trains the same model (benchmarks/parity/pi0_task.py: our openpi-compatible two-expert Gemma with pi0's
masks, positions and flow-matching loss) on a synthetic, learnable task, from the same parameters with
the same batches and noise in the same order: once unpatched (flashpatch off) and once per backend.
Writes, under --out: results_T<T>.json per sequence length, training-parity.png (curves overlaid, every
T found in --out) and summary.md (final losses, gaps, step times, memory).

    python benchmarks/parity/train_parity.py --steps 2000 --seq-lens 867,2048 --out parity-out     # GPU
    python benchmarks/parity/train_parity.py --steps 30 --width 32 --depth 2 --seq-len 67 --dtype float32 \
        --horizon 10 --action-dim 8 --prompt 8 --batch 4 --out /tmp/parity                  # CPU smoke
    python benchmarks/parity/train_parity.py --openpi --out parity-openpi                            # real openpi
    python benchmarks/parity/train_parity.py --seq-len 2048 --seeds 0,1,2 --backends cudnn_split --out p2048  # over seeds
    python benchmarks/parity/train_parity.py --seq-len 2048 --backends cudnn_split --float32-run --out p32  # + float32 einsum

Several commands may write into the same --out (one per T, say): the PNG and summary cover them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time

import jax
import parity
import parity_report  # a sibling file: python puts the script's directory on sys.path
import pi0_task as pi0

import flashpatch
from flashpatch.testing import register


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 2000; --openpi: 5)")
    lengths = p.add_mutually_exclusive_group()
    lengths.add_argument("--seq-len", type=int, help="total sequence length T (prefix + state + actions)")
    lengths.add_argument("--seq-lens", type=_int_list, help="several T, comma-separated, run one after another")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=512, help="width of the prefix expert")
    p.add_argument("--expert-width", type=int, default=None, help="width of the action expert (default width/2)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8, help="query heads (one key/value head, as openpi's Gemma)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="activation dtype")
    p.add_argument("--cameras", type=int, default=3, help="image chunks in the prefix")
    p.add_argument("--prompt", type=int, default=48, help="prompt tokens (the tail of each is padding)")
    p.add_argument("--horizon", type=int, default=50, help="action tokens")
    p.add_argument("--action-dim", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task, and of the run unless --seeds is given")
    p.add_argument(
        "--seeds",
        type=_int_list,
        default=None,
        help="several run seeds (initial parameters, batches, noise), comma-separated, on the same task: each seed "
        "trains every run; the summary compares the means over seeds",
    )
    p.add_argument("--eval-every", type=int, default=250, help="held-out loss every N steps (0: never)")
    p.add_argument(
        "--backends",
        type=_name_list,
        default=None,
        help=f"comma-separated, from {', '.join(flashpatch.backends.names())} "
        "(default: every backend that runs on this platform)",
    )
    p.add_argument(
        "--float32-run",
        action="store_true",
        help=f"add a run '{parity.FLOAT32}': openpi's einsum in float32 inside the bf16 model (how far bf16 "
        "rounding inside attention moves training)",
    )
    p.add_argument("--out", type=pathlib.Path, required=True, help="directory for JSON, PNG and summary")
    p.add_argument("--openpi", action="store_true", help="drive real openpi's Pi0 instead (see openpi_parity.py)")
    p.add_argument("--openpi-variant", default="dummy", help="--openpi: Gemma variant of both experts")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 5 if args.openpi else 2000
    if args.steps < 1:
        p.error(f"--steps must be positive; got {args.steps}")
    if args.openpi and args.float32_run:
        p.error("--float32-run applies to the pi0-style model, not to --openpi")
    return args


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 867,2048; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in flashpatch.backends.names()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backends {unknown}; known: {', '.join(flashpatch.backends.names())}")
    return names


def layout_for(args: argparse.Namespace, seq_len: int) -> pi0.Layout:
    return pi0.Layout.for_seq_len(
        seq_len, cameras=args.cameras, prompt=args.prompt, horizon=args.horizon, action_dim=args.action_dim
    )


def run_seq_len(args: argparse.Namespace, seq_len: int, backend_names: list[str], seed: int | None = None) -> dict:
    """Train every run at one length; `seed` (from --seeds) replaces --seed for the runs, not for the task."""
    layout = layout_for(args, seq_len)
    model = pi0.build(
        layout,
        width=args.width,
        depth=args.depth,
        expert_width=args.expert_width,
        num_heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
    )
    task = pi0.Task.create(layout, seed=args.seed + 1)
    run_seed = args.seed if seed is None else seed
    config = parity.TrainConfig(
        steps=args.steps, batch=args.batch, learning_rate=args.lr, seed=run_seed, eval_every=args.eval_every
    )
    print(
        f"T={seq_len}, run seed {run_seed}: cameras {layout.cameras}, prompt {layout.prompt}, 1 state, "
        f"{layout.horizon} actions",
        flush=True,
    )
    record = {
        "seq_len": seq_len,
        "run_seed": run_seed,
        "layout": {"cameras": layout.cameras, "prompt": layout.prompt, "horizon": layout.horizon},
        "args": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
        "environment": _environment(),
        "window": max(1, min(50, args.steps // 20)),  # steps per moving average of the "curves" gap
        "final_steps": max(1, min(100, args.steps // 20)),  # steps averaged into the final loss
        "runs": [],
        "gaps": {},
    }
    path = args.out / (f"results_T{seq_len}.json" if seed is None else f"results_T{seq_len}_seed{seed}.json")
    progress = _Progress(args.steps)

    def on_run(result: parity.RunResult) -> None:
        record["runs"].append(result.to_json())
        line = f"  {result.name}: compile {result.compile_s:.1f} s, median step {result.median_step_s * 1e3:.2f} ms"
        line += f", final loss {result.losses[-record['final_steps'] :].mean():.5f}"
        if result.name != parity.UNPATCHED:
            baseline = record["runs"][0]["losses"]
            gap = parity.compare(result.losses, baseline, window=record["window"], final_steps=record["final_steps"])
            record["gaps"][result.name] = dataclasses.asdict(gap)
            line += (
                f", final vs unpatched {gap.final_rel_diff:.3g}, max rel gap {gap.max_rel_gap_smoothed:.3g} (smoothed)"
            )
        print(line, flush=True)
        for note in result.notes:
            print(f"    {note}", flush=True)
        path.write_text(json.dumps(record, indent=1))  # after every run: a cut-off command keeps what ran

    parity.run_parity(model, task, config, backend_names, on_run=on_run, on_step=progress)
    return record


class _Progress:
    """A line every 10% of a run, with the time so far."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.every = max(1, steps // 10)
        self.started = time.perf_counter()

    def __call__(self, name: str, step: int, loss: float) -> None:
        if step == 0:
            self.started = time.perf_counter()
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            print(
                f"    {name} step {step + 1}/{self.steps} loss {loss:.5f} ({time.perf_counter() - self.started:.1f} s)",
                flush=True,
            )


def _environment() -> dict:
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "platform": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.openpi:
        import openpi_parity

        return openpi_parity.main(args)
    register()  # patch our openpi-compatible Gemma like openpi's
    backend_names = args.backends if args.backends is not None else parity.runnable_backends()
    if args.float32_run:
        backend_names = [*backend_names, parity.FLOAT32]
    lengths = args.seq_lens or [args.seq_len or 867]
    for seq_len in lengths:  # every length checked before the first run starts
        try:
            layout_for(args, seq_len)
        except ValueError as err:
            print(f"train_parity.py: --seq-len {seq_len}: {err}", file=sys.stderr)
            return 2
    print(f"{_environment()}; backends: unpatched, {', '.join(backend_names)}", flush=True)
    for seq_len in lengths:
        for seed in args.seeds or [None]:
            run_seq_len(args, seq_len, backend_names, seed)
    for path in parity_report.render(args.out):
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
