"""openpi's own gemma.Module (dummy width, real depth and heads) under one fallback decision per stack.

Prints whether this JAX's conditional forwards inputs (the decision needs it), then for each backend: the
conditionals in the training jaxpr (one per stack and its transpose, against one per layer per pass), the
largest relative error of outputs and gradients against float32 with flashpatch off, and that of a
mask the backend refuses (random, so the exact fallback runs for the whole stack). Usage:
  python3 benchmarks/lab/gpu/stack_probe.py --openpi-src .openpi/src --backends flash,pallas
"""

from __future__ import annotations

import argparse
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--openpi-src", required=True)
    parser.add_argument("--backends", default="flash,pallas")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prefix", type=int, default=700)
    parser.add_argument("--suffix", type=int, default=51)
    args = parser.parse_args()
    sys.path.insert(0, args.openpi_src)
    import flax.linen as nn
    from openpi.models import gemma

    import flashpatch
    from flashpatch import stack

    print("cond forwards inputs:", stack.cond_forwards_inputs(), flush=True)
    configs = [gemma.get_config("gemma_300m"), gemma.get_config("gemma_300m")]
    b, t = args.batch, args.prefix + args.suffix
    rng = np.random.default_rng(0)
    valid = np.ones((b, t), bool)
    for row in range(b):
        valid[row, rng.integers(args.prefix // 2, args.prefix) : args.prefix] = False  # padded prompts
    ar = np.zeros(t, bool)
    ar[args.prefix] = ar[args.prefix + 1] = True  # state token, then the action block
    cum = np.cumsum(ar)
    good = (cum[None, :] <= cum[:, None])[None] & valid[:, None, :] & valid[:, :, None]
    bad = good & (rng.random((b, t, t)) < 0.9)
    embedded = [
        jnp.asarray(rng.standard_normal((b, args.prefix, configs[0].width)), jnp.float32),
        jnp.asarray(rng.standard_normal((b, args.suffix, configs[1].width)), jnp.float32),
    ]
    positions = jnp.asarray(np.cumsum(valid, axis=1) - 1, jnp.int32)

    def build(dtype):
        return gemma.Module(configs=configs, embed_dtype=dtype)

    model32, model16 = build("float32"), build("bfloat16")
    params = nn.Module.init(model32, jax.random.PRNGKey(0), embedded, positions, jnp.asarray(good))

    def loss(model, p, x, mask):
        out, _ = model.apply(p, x, positions, mask)
        return sum(jnp.sum(o.astype(jnp.float32) * 0.01) for o in out if o is not None), out

    def run(model, p, mask):
        return jax.jit(jax.value_and_grad(lambda p, x: loss(model, p, x, mask), argnums=(0, 1), has_aux=True))(
            p, embedded
        )

    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    def worst(got, want):
        return max(rel(a, c) for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))

    for name, mask in (("openpi mask", good), ("refused mask", bad)):
        mask = jnp.asarray(mask)
        with flashpatch.disable():
            want = run(model32, params, mask)
            einsum = run(model16, params, mask)
        print(f"{name}: einsum bf16 vs f32 worst rel err {worst(einsum, want):.2e}", flush=True)
        for backend in args.backends.split(","):
            with flashpatch.enable(backend), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = run(model16, params, mask)
                jax.block_until_ready(got)
                jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(model16, p, embedded, mask)[0]))(params)
            conds = str(jaxpr).count(" cond[")
            said = sorted({str(w.message)[:110] for w in caught if "flashpatch" in str(w.message)})
            nan = any(bool(jnp.any(~jnp.isfinite(x))) for x in jax.tree.leaves(got))
            print(f"  {backend}: conds {conds}, worst rel err {worst(got, want):.2e}, non-finite {nan}, said {said}")


if __name__ == "__main__":
    main()
