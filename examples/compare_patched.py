"""Run a small openpi-compatible pi0 Gemma stack unpatched and patched; print what ran, the difference and the time.

    python examples/compare_patched.py [--backend xla|auto|cudnn_split|...] [--length 1024] [--batch 2]

Forward and backward (loss and gradients with respect to all parameters): openpi's original einsum
attention first, then the same jitted function under `flashpatch.enable(backend)`. The default backend
is `xla` on a CPU (where `auto` keeps the einsum at this size, since it is faster there) and `auto` on a
GPU. The output names the backend that actually ran each attention layer, and why. On a CPU `xla` is often
slower than the einsum at these sizes: it is there for memory (O(T)), not speed. A run at the default size
took 25 s on a quiet 2-core CPU machine (2026-12-05).
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import flashpatch
from flashpatch.core import selection
from flashpatch.testing import gemma, layouts, register
from flashpatch.tools import args as cli_args

DTYPES = ("float32", "bfloat16")
SUFFIX = 11  # a state token and 10 action tokens, as pi0's suffix (shortened)
MIN_LENGTH = SUFFIX + 8


def build(length: int, batch: int, dtype: str):
    configs = [gemma.get_config("dummy", width=128, depth=2), gemma.get_config("dummy", width=64, depth=2)]
    model = gemma.Module(configs=configs, embed_dtype=dtype, vocab_size=32)
    layout = layouts.pi0(batch, length - SUFFIX, actions=SUFFIX - 1, masked_image=1)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    prefix = jax.random.normal(keys[0], (batch, length - SUFFIX, configs[0].width))
    actions = jax.random.normal(keys[1], (batch, SUFFIX, configs[1].width))
    inputs = ([prefix, actions], jnp.asarray(layout.positions), jnp.asarray(layout.mask))
    params = nn.Module.init(model, keys[2], *inputs)
    # openpi zero-initialises some weights; random values make every path visible in the output.
    params = jax.tree.map(lambda p, k: p + 0.05 * jax.random.normal(k, p.shape), params, _keys_like(params))
    return model, params, inputs


def _keys_like(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.PRNGKey(1), len(leaves))))


def timed(fn, *args, repeats: int = 5):
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, statistics.median(times) * 1e3


def main() -> int:
    parser = cli_args.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backend",
        metavar="NAME",
        type=cli_args.one_of(flashpatch.backend_choices, "--backend"),
        help=f"one of {', '.join(flashpatch.backend_choices())} (default: xla on a CPU, auto on a GPU)",
    )
    parser.add_argument("--length", type=cli_args.positive_int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--batch", type=cli_args.positive_int, default=2, help="sequences (default 2)")
    parser.add_argument(
        "--dtype",
        default="float32",
        metavar="DTYPE",
        type=cli_args.one_of(DTYPES, "--dtype"),
        help=f"{', '.join(DTYPES)} (default float32)",
    )
    args = parser.parse_args()
    if args.length < MIN_LENGTH:
        parser.error(f"--length must be at least {MIN_LENGTH} (the suffix is {SUFFIX} tokens); got {args.length}")
    backend = args.backend or ("xla" if jax.default_backend() == "cpu" else "auto")
    register()  # patch these fixture modules as flashpatch patches openpi's

    model, params, (xs, positions, mask) = build(args.length, args.batch, args.dtype)

    def loss(params, xs, positions, mask):
        outs, _ = model.apply(params, xs, positions, mask)
        return sum(jnp.mean(o.astype(jnp.float32) ** 2) for o in outs), outs

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ((_, ref_outs), ref_grads), ref_ms = timed(step, params, xs, positions, mask)
    with flashpatch.enable(backend), selection.recording() as choices:
        ((_, outs), grads), ms = timed(step, params, xs, positions, mask)

    def worst(a, b):
        return max(
            float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(a, b, strict=True)
        )

    ran = sorted({choice.backend for choice in choices})
    print(f"device {jax.devices()[0].device_kind}, B={args.batch}, T={args.length}, {args.dtype}")
    print(f"flashpatch.enable({backend!r}) ran: {', '.join(ran) or 'nothing (no attention call was traced)'}")
    for reason in sorted({choice.reason for choice in choices}):
        print(f"  because {reason}")
    print(
        f"max |patched - original|: outputs {worst(outs, ref_outs):.3g}, gradients "
        f"{worst(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):.3g}"
    )
    label = "+".join(ran) if ran else backend
    print(f"forward+backward: original einsum {ref_ms:.1f} ms, flashpatch ({label}) {ms:.1f} ms")
    for line in explain(backend, ran, jax.default_backend()):
        print(line)
    return 0


def explain(backend: str, ran: list[str], platform: str) -> list[str]:
    """What the numbers above mean, for the backend asked for and what ran."""
    if ran == ["reference"] and backend == "auto":
        return ["(the einsum itself ran: auto found no faster exact path for this shape here; try --backend xla)"]
    if ran == ["reference"] and backend != "reference":
        hint = "; on a CPU, try --backend xla" if platform == "cpu" else ""
        return [f"({backend} cannot run here, so the original einsum ran{hint})"]
    if "xla" in ran and platform == "cpu":
        return [
            "(on a CPU at this size the einsum is usually faster: xla, blockwise attention in plain JAX, is there",
            " for memory, O(T) instead of the B x N x T x S logits, which lets long sequences fit; the speed-ups",
            " are on a GPU, docs/benchmarks.md)",
        ]
    return []


if __name__ == "__main__":
    raise SystemExit(main())
