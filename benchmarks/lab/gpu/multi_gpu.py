"""On several GPUs: flashpatch under openpi's FSDP mesh, kvax and cuDNN against the original attention.

NOT RUN YET. Written without a multi-GPU machine (the CPU smoke test below is all that has run);
its first run on 2 GPUs is the check, and no result of it exists until then.

openpi's set-up: mesh ("batch", "fsdp") of shape (devices // fsdp, fsdp) held in openpi's own
global (`flashpatch.testing.sharding.set_mesh`, same API), parameters split by openpi's FSDP rule
(4 MiB floor), the batch split over both axes, activations constrained inside every block.

Sections (JSON written to --out/multi_gpu.json after each variant, so a timeout keeps what ran):
  agree   pi0-style two-expert stack (pi0's widths, 2 layers, bf16 activations) under the mesh:
          outputs and gradients (parameters, inputs) of the original bf16 path, kvax and cudnn
          against the float32 original; rel.err, NaN checks, the bf16 rule of
          tests/test_gpu_models.py, flashpatch's fallback warnings (did the backend really run),
          XLA collectives compiled in, outputs still split over the batch
  time    a training step (loss, gradients, SGD update, parameters donated; openpi's shardings) at
          pi0's widths and --depth layers: median ms per step, original vs kvax vs cudnn, compile
          seconds, compiled temp memory per device, first-step loss

Run from the repository root with the kvax and jax-triton wheels in .whl/ (as benchmarks/lab/gpu/run_all.sh):
  bash benchmarks/lab/gpu/run_multi_gpu.sh                  # on the 2-GPU machine; logs and JSON under $OUT
  PYTHONPATH=<kvax site>:src python3 benchmarks/lab/gpu/multi_gpu.py --out DIR [--fsdp N] [--budget S]
CPU smoke test of the script (tiny shapes; kvax/cudnn fall back to the original there, and say so):
  XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=src python benchmarks/lab/gpu/multi_gpu.py \\
    --smoke --out /tmp/multi_gpu
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import statistics
import sys
import time
import traceback
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import environment, log, rel_err, write

import flashpatch
from flashpatch import diagnostics
from flashpatch.testing import gemma, layouts, register, sharding

SUFFIX = 51  # pi0: state token + 50 actions
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DATA = jax.sharding.PartitionSpec(sharding.DATA_AXIS)


def configs(depth: int, smoke: bool) -> list[gemma.Config]:
    """pi0's experts (PaliGemma's Gemma 2B, action expert Gemma 300M) at `depth` layers."""
    if smoke:
        return [
            gemma.Config(width=64, depth=depth, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
            gemma.Config(width=32, depth=depth, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
        ]
    return [gemma.get_config("gemma_2b", depth=depth), gemma.get_config("gemma_300m", depth=depth)]


class Setup:
    """FSDP-sharded float32 parameters of a pi0-style stack and one pi0 batch, placed on the mesh."""

    def __init__(self, mesh, cfgs: list[gemma.Config], batch: int, length: int, min_mbytes: float, seed: int = 0):
        self.cfgs = cfgs
        layout = layouts.pi0(batch, length - SUFFIX, actions=SUFFIX - 1, masked_image=1, seed=seed)
        keys = jax.random.split(jax.random.PRNGKey(seed), 3)
        self.data_sharding = jax.sharding.NamedSharding(mesh, DATA)
        self.batch = jax.device_put(
            (
                jax.random.normal(keys[0], (batch, length - SUFFIX, cfgs[0].width)),
                jax.random.normal(keys[1], (batch, SUFFIX, cfgs[1].width)),
                jnp.asarray(layout.positions),
                jnp.asarray(layout.mask),
            ),
            self.data_sharding,
        )
        small = [x[:1] for x in self.batch]
        model = self.model("float32")
        init = lambda key: nn.Module.init(model, key, [small[0], small[1]], small[2], small[3])  # noqa: E731
        shapes = jax.eval_shape(init, keys[2])
        self.param_sharding = sharding.fsdp_sharding(shapes, mesh, min_size_mbytes=min_mbytes)
        self.params = jax.jit(init, out_shardings=self.param_sharding)(keys[2])

    def model(self, dtype: str) -> gemma.Module:
        return gemma.Module(configs=self.cfgs, embed_dtype=dtype, vocab_size=128)

    def loss_fn(self, dtype: str):
        """loss(params, prefix, actions, positions, mask) -> (loss, outputs), activations in `dtype`."""
        model = self.model(dtype)

        def loss(params, prefix, actions, positions, mask):
            # regress each expert's output on its input: a loss that the final RMSNorm does not flatten
            (a, b), _ = model.apply(params, [prefix, actions], positions, mask)
            return _mse(a, prefix) + _mse(b, actions), (a, b)

        return loss


def _mse(out, target):
    return jnp.mean((out.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)


def patched(backend: str | None):
    return flashpatch.enable(backend) if backend else contextlib.nullcontext()


@contextlib.contextmanager
def recorded(report: dict):
    """flashpatch's warnings (fallbacks) during tracing and running, into report['flashpatch_warnings']."""
    diagnostics.forget()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", flashpatch.FlashpatchWarning)
        yield
    report["flashpatch_warnings"] = [str(w.message) for w in caught if w.category is flashpatch.FlashpatchWarning]
    report["fell_back"] = bool(report["flashpatch_warnings"])


def collectives(compiled) -> dict[str, int]:
    text = compiled.as_text()
    return {name: len(re.findall(rf"\b{name}(?:-start)?\(", text)) for name in COLLECTIVES}


def tree_err(out, ref) -> float:
    return max(rel_err(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True))


def finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(tree))


def within_bf16(err: float, original_err: float) -> bool:
    """tests/test_gpu_models.py's rule: not much further from float32 than the original bf16 path."""
    return err <= 1.25 * original_err + 2e-3


def agree(args, mesh, variants: list[str], result: dict, save, over) -> None:
    batch = args.agree_batch or 2 * jax.device_count()
    setup = Setup(mesh, configs(2, args.smoke), batch, args.length, args.min_param_mbytes)
    result.update(batch=batch, length=args.length, depth=2, variants={})

    def run(dtype: str, backend: str | None):
        fn = jax.jit(jax.value_and_grad(setup.loss_fn(dtype), argnums=(0, 1, 2), has_aux=True))
        with sharding.set_mesh(mesh), patched(backend):
            compiled = fn.lower(setup.params, *setup.batch).compile()
            (_, outs), grads = compiled(setup.params, *setup.batch)
        return outs, grads, compiled

    ref_outs, ref_grads, _ = run("float32", None)
    for name in ["original", *variants]:
        if over():
            result["variants"][name] = {"skipped": "time budget"}
            continue
        entry: dict = {}
        try:
            with recorded(entry):
                outs, grads, compiled = run("bfloat16", None if name == "original" else name)
            entry.update(
                fwd=tree_err(outs, ref_outs),
                grad_params=tree_err(grads[0], ref_grads[0]),
                grad_inputs=tree_err(grads[1:], ref_grads[1:]),
                finite=finite((outs, grads)),
                collectives=collectives(compiled),
                outputs_batch_sharded=all(
                    x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, DATA), x.ndim) for x in outs
                ),
            )
            original = result["variants"].get("original", entry)
            entry["within_bf16_rule"] = all(
                within_bf16(entry[k], original[k]) for k in ("fwd", "grad_params", "grad_inputs")
            )
        except Exception as err:  # one variant failing (OOM, kvax refusing the mesh) must not stop the rest
            entry["error"] = f"{type(err).__name__}: {err}"[:2000]
            entry["traceback"] = traceback.format_exc()[-4000:]
        result["variants"][name] = entry
        log(f"agree {name}: { ({k: v for k, v in entry.items() if k != 'traceback'}) }")
        save()


def train_step_timing(args, mesh, variants: list[str], result: dict, save, over) -> None:
    cfgs = configs(args.depth, args.smoke)
    result.update(batch=args.batch, length=args.length, depth=args.depth, variants={})
    for name in ["original", *variants]:
        if over():
            result["variants"][name] = {"skipped": "time budget"}
            continue
        entry: dict = {}
        try:
            setup = Setup(mesh, cfgs, args.batch, args.length, args.min_param_mbytes)
            loss_fn = setup.loss_fn("bfloat16")

            def step(params, prefix, actions, positions, mask, loss_fn=loss_fn):
                (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, prefix, actions, positions, mask)
                return jax.tree.map(lambda p, g: p - args.lr * g.astype(p.dtype), params, grads), loss

            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            fn = jax.jit(
                step,
                in_shardings=(setup.param_sharding, *(setup.data_sharding,) * 4),
                out_shardings=(setup.param_sharding, replicated),
                donate_argnums=0,
            )
            with recorded(entry), sharding.set_mesh(mesh), patched(None if name == "original" else name):
                start = time.perf_counter()
                compiled = fn.lower(setup.params, *setup.batch).compile()
                entry["compile_s"] = time.perf_counter() - start
                params, times, losses = setup.params, [], []
                for i in range(args.warmup + args.repeats):
                    start = time.perf_counter()
                    params, loss = compiled(params, *setup.batch)
                    jax.block_until_ready((params, loss))
                    if i >= args.warmup:
                        times.append((time.perf_counter() - start) * 1e3)
                    losses.append(float(loss))
            memory = compiled.memory_analysis()
            entry.update(
                median_ms=statistics.median(times),
                times_ms=times,
                first_loss=losses[0],
                losses_finite=all(map(math.isfinite, losses)),
                temp_bytes_per_device=getattr(memory, "temp_size_in_bytes", None),
                collectives=collectives(compiled),
            )
            del params, setup
        except Exception as err:  # OOM or a backend refusing the mesh: record, go on with the rest
            entry["error"] = f"{type(err).__name__}: {err}"[:2000]
            entry["traceback"] = traceback.format_exc()[-4000:]
        result["variants"][name] = entry
        log(f"time {name}: { ({k: v for k, v in entry.items() if k not in ('traceback', 'times_ms')}) }")
        save()
    original = result["variants"].get("original", {}).get("median_ms")
    for entry in result["variants"].values():
        if original and entry.get("median_ms"):
            entry["speedup_vs_original"] = original / entry["median_ms"]
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", type=int, default=0, help="fsdp axis size (default: every device)")
    parser.add_argument("--backends", default="kvax,cudnn", help="comma-separated flashpatch backends")
    parser.add_argument("--sections", default="agree,time")
    parser.add_argument("--length", type=int, default=1024, help="tokens per example (pi0 layout, 51 suffix)")
    parser.add_argument("--agree-batch", type=int, default=0, help="default: 2 per device")
    parser.add_argument("--batch", type=int, default=8, help="global batch of the timed training step")
    parser.add_argument("--depth", type=int, default=18, help="layers of the timed model (pi0: 18)")
    parser.add_argument("--min-param-mbytes", type=float, default=4.0, help="openpi's FSDP floor (MiB)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds; later variants are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny model, to check the script on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.length, args.batch, args.depth, args.repeats = min(args.length, 120), jax.device_count(), 2, 2
        args.min_param_mbytes = 0.0  # split the toy weights too

    register()
    mesh = sharding.make_mesh(args.fsdp or jax.device_count())
    variants = [b for b in args.backends.split(",") if b]
    start = time.time()
    over = lambda: time.time() - start > args.budget  # noqa: E731
    report = environment(" ".join(sys.argv))
    report.update(
        devices=[str(d) for d in jax.devices()],
        mesh={name: int(size) for name, size in mesh.shape.items()},
        args=vars(args),
    )
    save = lambda: write(args.out, "multi_gpu.json", report)  # noqa: E731
    sections = args.sections.split(",")
    if "agree" in sections:
        agree(args, mesh, variants, report.setdefault("agree", {}), save, over)
    if "time" in sections:
        train_step_timing(args, mesh, variants, report.setdefault("time", {}), save, over)
    report["elapsed_s"] = time.time() - start
    save()
    log(f"wrote {args.out}/multi_gpu.json in {report['elapsed_s']:.0f}s")


if __name__ == "__main__":
    main()
