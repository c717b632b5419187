"""What the compile guard adds to the first training step: first-step seconds with FLASHPATCH_GUARD=0 and =all.

    PYTHONPATH=src python benchmarks/lab/guard_cost.py [--repeats 5] [--backend xla] [--batch 2] [--out FILE]

Each run is a fresh process (JAX's caches empty, as at the start of a training run): it builds flashpatch's
openpi-compatible pi0 (testing.models, bf16), jits openpi's training step (loss and gradients with respect to
the parameters) under `flashpatch.enable(backend)`, and times the first call (trace, compile, run) and the
guard's own compile seconds (`guard.seconds_spent`). The two settings alternate, so drift on a shared machine
falls on both. Prints the median and range of each, and the difference of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
from flax import nnx
import flashpatch
from flashpatch.core import guard
from flashpatch.testing import models, register

register()  # patch the fixture Gemma as openpi's would be

backend, batch = sys.argv[1], int(sys.argv[2])
config = models.Pi0Config(dtype="bfloat16")
model = config.create(jax.random.PRNGKey(0))
obs, actions = config.fake_obs(batch), config.fake_act(batch)

@nnx.jit
def step(model, obs, actions):
    def loss(model):
        return jnp.mean(model.compute_loss(jax.random.PRNGKey(1), obs, actions, train=True))
    return nnx.grad(loss)(model)

with flashpatch.enable(backend):
    start = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(nnx.state(step(model, obs, actions))))
    first = time.perf_counter() - start
print(json.dumps({"first_step_s": first, "guard_s": guard.seconds_spent(), "platform": jax.default_backend()}))
"""


def run_once(guard: str, backend: str, batch: int) -> dict:
    env = dict(os.environ, FLASHPATCH_GUARD=guard)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, backend, str(batch)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"guard_cost: the child failed (FLASHPATCH_GUARD={guard}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f}, n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="xla")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", help="write the runs and the summary as JSON here")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"0": [], "all": []}
    for repeat in range(args.repeats):
        for guard in ("0", "all") if repeat % 2 == 0 else ("all", "0"):
            runs[guard].append(run_once(guard, args.backend, args.batch))
    off = [r["first_step_s"] for r in runs["0"]]
    on = [r["first_step_s"] for r in runs["all"]]
    spent = [r["guard_s"] for r in runs["all"]]
    import jax

    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cpus, jax {jax.__version__}, platform {runs['0'][0]['platform']}"
    )
    print(f"pi0 fixture (bf16), batch {args.batch}, backend {args.backend}: first training step (trace+compile+run)")
    print(f"  FLASHPATCH_GUARD=0:   {summary(off)}")
    print(f"  FLASHPATCH_GUARD=all: {summary(on)}")
    print(f"  the guard's own compiles: {summary(spent)}")
    print(f"  difference of the medians: {statistics.median(on) - statistics.median(off):+.2f} s")
    if args.out:
        record = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "args": vars(args), "runs": runs}
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
