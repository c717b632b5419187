"""Check, on a CUDA GPU, the assumptions the cudnn backend rests on, and time its two mask paths.

    PYTHONPATH=src python benchmarks/lab/gpu/cudnn_probe.py [--size 4096] [--batch 2] [--out cudnn_probe.json]

Prints (and writes as JSON) what JAX's cuDNN attention does with the inputs the backend avoids
giving it (rows with no key, keys past the sequence lengths, NaN in masked keys), whether the
backend runs at openpi's shapes without falling back, and forward / forward+backward times of the
backend's lengths path, its dense path and openpi's einsum at T = S = size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashpatch.backends import cudnn
from flashpatch.backends.base import Problem
from flashpatch.backends.reference import reference_attention

HEADS, KV_HEADS, HEAD_DIM = 8, 1, 256


def _inputs(batch: int, t: int, s: int, seed: int = 0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = (jax.random.normal(kq, (batch, t, HEADS, HEAD_DIM)) * HEAD_DIM**-0.5).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (batch, s, KV_HEADS, HEAD_DIM)).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (batch, s, KV_HEADS, HEAD_DIM)).astype(jnp.bfloat16)
    return q, k, v


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))) for x in jax.tree.leaves(tree))


def _raw(q, k, v, **kwargs):
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="cudnn", **kwargs)


def _raw_grads(q, k, v, **kwargs):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(_raw(q, k, v, **kwargs).astype(jnp.float32)), argnums=(0, 1, 2)))(
        q, k, v
    )


def raw_cudnn_behaviour() -> dict:
    """What cuDNN gives where the backend steps around it (even T and S, so JAX accepts grads)."""
    q, k, v = _inputs(2, 64, 96)
    found = {}
    lengths = dict(
        query_seq_lengths=jnp.array([40, 64], jnp.int32), key_value_seq_lengths=jnp.array([50, 96], jnp.int32)
    )
    out = jax.jit(lambda q, k, v: _raw(q, k, v, **lengths))(q, k, v)
    dq, dk, dv = _raw_grads(q, k, v, **lengths)
    found["lengths: output rows past q length"] = {
        "finite": _finite(out[0, 40:]),
        "max_abs": float(jnp.max(jnp.abs(out[0, 40:].astype(jnp.float32)))),
    }
    found["lengths: dq rows past q length finite and zero"] = [_finite(dq[0, 40:]), bool(jnp.all(dq[0, 40:] == 0))]
    found["lengths: dk, dv past kv length finite and zero"] = [
        _finite(dk[0, 50:]) and _finite(dv[0, 50:]),
        bool(jnp.all(dk[0, 50:] == 0) & jnp.all(dv[0, 50:] == 0)),
    ]

    mask = jnp.ones((2, 1, 64, 96), bool).at[:, :, 3].set(False)  # row 3 attends nothing
    out = jax.jit(lambda q, k, v: _raw(q, k, v, mask=mask))(q, k, v)
    grads = _raw_grads(q, k, v, mask=mask)
    found["dense: all-False row, output and grads finite"] = [_finite(out), _finite(grads)]

    nan_mask = jnp.ones((2, 1, 64, 96), bool).at[:, :, :, 7].set(False)  # key 7 attended by no row
    k_nan = k.at[:, 7].set(jnp.nan)
    out = jax.jit(lambda q, k, v: _raw(q, k, v, mask=nan_mask))(q, k_nan, v)
    found["dense: NaN in a masked key leaks into the output (the backend zeroes such keys)"] = not _finite(out)

    for name, t in (("decode T=1 GQA, dense", 1), ("decode T=2 GQA, dense", 2)):
        qd = q[:, :t]
        m = jnp.arange(96)[None, None, None, :] < jnp.array([30, 80])[:, None, None, None]
        m = jnp.broadcast_to(m, (2, 1, t, 96))
        out = jax.jit(lambda q, k, v, m=m: _raw(q, k, v, mask=m))(qd, k, v)
        ref = reference_attention(qd, k, v, m[:, 0], jnp.float32)
        found[f"{name}: rel.err vs einsum"] = _rel(out, ref)
    return found


def _rel(out, ref) -> float:
    out, ref = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def _time(fn, *args, reps: int = 20) -> float:
    """Median milliseconds of a jitted call after warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timings(batch: int, size: int) -> dict:
    q, k, v = _inputs(batch, size, size)
    valid = jnp.arange(size)[None, :] < jnp.array([size - size // 16 * (b % 2) for b in range(batch)])[:, None]
    right_padded = valid[:, :, None] & valid[:, None, :]  # padded bidirectional prefix: lengths path
    block = (jnp.arange(size) >= size // 2)[None, :].astype(jnp.int32)  # prefix then one block: dense path
    prefix_lm = (block[:, None, :] <= block[:, :, None]) & right_padded
    results = {}
    for mask_name, mask in (("padding-right", right_padded), ("prefix+block, padded", prefix_lm)):
        variants = {
            "einsum (openpi)": lambda q, k, v, m=mask: reference_attention(q, k, v, m, jnp.bfloat16),
            "cudnn backend": lambda q, k, v, m=mask: cudnn.cudnn_attention(q, k, v, m, jnp.bfloat16),
            "cudnn backend, dense only": lambda q, k, v, m=mask: cudnn.cudnn_attention(
                q, k, v, m, jnp.bfloat16, use_seq_lengths=False
            ),
            "jax cudnn, dense mask, raw": lambda q, k, v, m=mask: _raw(q, k, v, mask=m[:, None]),
        }
        for name, fn in variants.items():
            fwd = jax.jit(fn)
            bwd = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
            results[f"{mask_name} | {name} | fwd ms"] = _time(fwd, q, k, v)
            results[f"{mask_name} | {name} | fwd+bwd ms"] = _time(bwd, q, k, v)
    return results


def backend_accepts() -> dict:
    """unsupported() at openpi's shapes (None = cuDNN runs), and what the machine reports."""
    accepts = {
        "jax": jax.__version__,
        "cudnn_version": cudnn.cudnn_version(),
        "compute_capability": cudnn.compute_capability(),
        "device": str(jax.devices()[0].device_kind),
    }
    backend = cudnn.CudnnBackend()
    for t, s in ((816, 816), (51, 867), (1, 1024), (4096, 4096)):
        for q_dtype in ("bfloat16", "float32"):
            problem = Problem(2, t, s, HEADS, KV_HEADS, HEAD_DIM, q_dtype, "bfloat16", "bfloat16", q_dtype, "gpu")
            accepts[f"unsupported(T={t}, S={s}, q {q_dtype})"] = backend.unsupported(problem)
    return accepts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="T = S for the timings")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default="cudnn_probe.json")
    args = parser.parse_args()
    report = {
        "backend": backend_accepts(),
        "raw cudnn": raw_cudnn_behaviour(),
        "timings": timings(args.batch, args.size),
    }
    text = json.dumps(report, indent=2, default=lambda x: np.asarray(x).tolist())
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
