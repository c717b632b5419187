"""Where does the blockwise `xla` backend overtake the einsum on CPU? (feeds `flashpatch.core.selection`)

    PYTHONPATH=src python benchmarks/lab/selection_sweep.py [--out results.json]

openpi's head shapes (8 query heads, 1 kv head, head_dim 256), float32, pi0 layout with padding,
B=1, T=S over a ladder; forward and forward+backward; median of several runs, both variants
interleaved in one process on the same inputs. Also the compiled temporary memory of each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import flashpatch
from flashpatch.testing import layouts


def median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="128,256,384,512,768,1024,1536")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for length in map(int, args.lengths.split(",")):
        mask = jnp.asarray(layouts.pi0(1, length - 11, actions=10, seed=length).mask)[:, None]
        keys = jax.random.split(jax.random.PRNGKey(length), 4)
        q = jax.random.normal(keys[0], (1, length, 8, 256)) / 16
        k, v = (jax.random.normal(key, (1, length, 1, 256)) for key in keys[1:3])
        cot = jax.random.normal(keys[3], q.shape)
        row = {"len": length}
        for name in ("reference", "xla"):
            settings = flashpatch.Settings(backend=name)
            fwd = jax.jit(lambda q, k, v, m, s=settings: flashpatch.attention(q, k, v, m, settings=s))
            both = jax.jit(jax.grad(lambda q, k, v, m, f=fwd: jnp.sum(f(q, k, v, m) * cot), argnums=(0, 1, 2)))
            row[f"{name}_fwd_ms"] = median_ms(fwd, (q, k, v, mask), args.repeats)
            row[f"{name}_fwdbwd_ms"] = median_ms(both, (q, k, v, mask), args.repeats)
            compiled = both.lower(q, k, v, mask).compile().memory_analysis()
            row[f"{name}_fwdbwd_temp_mib"] = compiled.temp_size_in_bytes / 2**20
        rows.append(row)
        print(
            f"T={length:5d}  fwd ms einsum {row['reference_fwd_ms']:8.2f} xla {row['xla_fwd_ms']:8.2f}   "
            f"fwd+bwd ms einsum {row['reference_fwdbwd_ms']:8.2f} xla {row['xla_fwdbwd_ms']:8.2f}   "
            f"temp MiB einsum {row['reference_fwdbwd_temp_mib']:7.1f} xla {row['xla_fwdbwd_temp_mib']:7.1f}",
            flush=True,
        )
    if args.out:
        info = {"jax": jax.__version__, "cpu": platform.processor() or platform.machine(), "cores": jax.device_count()}
        with open(args.out, "w") as f:
            json.dump({"env": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
