"""Run a small openpi-compatible pi0 Gemma stack unpatched and patched; print the difference and the time.

    python examples/compare_patched.py [--backend auto|reference|xla|kvax|cudnn] [--length 1024]

Forward and backward (loss and gradients with respect to all parameters), the original einsum
attention first, then the same jitted function under `flashpatch.enable(backend)`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import flashpatch
from flashpatch.testing import gemma, layouts, register


def build(length: int, batch: int, dtype: str):
    configs = [gemma.get_config("dummy", width=128, depth=2), gemma.get_config("dummy", width=64, depth=2)]
    model = gemma.Module(configs=configs, embed_dtype=dtype, vocab_size=32)
    suffix = 11
    layout = layouts.pi0(batch, length - suffix, actions=suffix - 1, masked_image=1)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    prefix = jax.random.normal(keys[0], (batch, length - suffix, configs[0].width))
    actions = jax.random.normal(keys[1], (batch, suffix, configs[1].width))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=flashpatch.BACKEND_NAMES)
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence (prefix + suffix)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("flashpatch").setLevel(logging.INFO)
    register()  # patch these fixture modules as flashpatch patches openpi's

    model, params, (xs, positions, mask) = build(args.length, args.batch, args.dtype)

    def loss(params, xs, positions, mask):
        outs, _ = model.apply(params, xs, positions, mask)
        return sum(jnp.mean(o.astype(jnp.float32) ** 2) for o in outs), outs

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    ((_, ref_outs), ref_grads), ref_ms = timed(step, params, xs, positions, mask)
    with flashpatch.enable(args.backend):
        ((_, outs), grads), ms = timed(step, params, xs, positions, mask)

    def worst(a, b):
        return max(
            float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(a, b, strict=True)
        )

    out_err = worst(outs, ref_outs)
    grad_err = worst(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))
    print(f"device {jax.devices()[0].device_kind}, B={args.batch}, T={args.length}, {args.dtype}")
    print(f"max |patched - original|: outputs {out_err:.3g}, gradients {grad_err:.3g}")
    print(f"forward+backward: original {ref_ms:.1f} ms, flashpatch ({args.backend}) {ms:.1f} ms")


if __name__ == "__main__":
    main()
