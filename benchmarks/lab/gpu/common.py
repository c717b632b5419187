"""Shared by the GPU scripts: timing, inputs in openpi's layout, environment record."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flashpatch.testing import layouts


def environment(command: str) -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "python": platform.python_version(),
        "versions": {
            n: version(n) for n in ("jax", "jaxlib", "flax", "kvax", "jax-triton", "triton", "nvidia-cudnn-cu13")
        },
    }


def median_ms(fn: Callable, inputs: list[tuple], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn(*inputs[i]) in ms, rotating over input sets, synchronised each call."""
    for i in range(warmup):
        jax.block_until_ready(fn(*inputs[i % len(inputs)]))
    times = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def medians_in_rounds(fns: dict, inputs: list[tuple], repeats: int = 20, rounds: int = 4, warmup: int = 3) -> dict:
    """key -> median ms of fn(*inputs[i]) over `repeats` calls, each synchronised, in `rounds` blocks.

    Each round times every variant in turn, a block of consecutive calls each (as a training loop
    calls one step again and again), so a drift in clocks or memory state over the run falls on every
    variant alike. Taking the variants in turn call by call instead (H100 run 11) slowed the short
    kernels most (0.15 ms in run 10 -> 0.29 for the mask analysis alone), a cost a training loop does not pay.
    A variant that fails while warming up maps to its error text instead.
    """
    times: dict = {}
    result: dict = {}
    for key, fn in fns.items():
        try:
            for i in range(warmup):
                jax.block_until_ready(fn(*inputs[i % len(inputs)]))
            times[key] = []
        except Exception as err:
            result[key] = f"{type(err).__name__}: {str(err)[-400:]}"
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for key in times:
            jax.block_until_ready(fns[key](*inputs[0]))  # back to this variant's executable
            for i in range(per_round):
                args = inputs[i % len(inputs)]
                start = time.perf_counter()
                jax.block_until_ready(fns[key](*args))
                times[key].append((time.perf_counter() - start) * 1e3)
    result.update({key: statistics.median(t) for key, t in times.items()})
    return result


def openpi_mask(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """pi0 training layout of total length `length`: padded prompt mid-sequence, a missing image in odd rows."""
    layout = layouts.pi0(batch, length - 51, actions=50, masked_image=1, seed=seed)
    return layout.mask


def qkv(batch: int, t: int, s: int, heads: int = 8, kv_heads: int = 1, head_dim: int = 256, seed: int = 0):
    key = jax.random.PRNGKey(seed)
    kq, kk, kv = jax.random.split(key, 3)
    q = (jax.random.normal(kq, (batch, t, heads, head_dim), jnp.float32) * head_dim**-0.5).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (batch, s, kv_heads, head_dim), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (batch, s, kv_heads, head_dim), jnp.float32).astype(jnp.bfloat16)
    return q, k, v


def rel_err(out, ref) -> float:
    out = jnp.asarray(out, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def write(out_dir: str, name: str, payload: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, name).write_text(json.dumps(payload, indent=1, default=str))


def log(*args) -> None:
    print(*args, flush=True, file=sys.stdout)
