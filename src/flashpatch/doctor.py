"""`python -m flashpatch doctor`: what is installed, what would be patched, and what `auto` would pick."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys

import jax
import jax.numpy as jnp

from flashpatch import backends, jit_cache, selection, settings, targets
from flashpatch.backends.base import Problem

PACKAGES = ("flashpatch", "jax", "jaxlib", "flax", "wrapt", "kvax", "jax-triton", "triton", "numpy")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _target_status(target: targets.Target) -> str:
    try:
        module = importlib.import_module(target.module)
    except ImportError as err:
        return f"not importable ({err.__class__.__name__}: {err})"
    cls = getattr(module, target.cls_name, None)
    if not isinstance(cls, type):
        return f"{target.cls_name} not found in the module"
    reason = target.adapter.drift(cls)
    return "ready to patch" if reason is None else f"will NOT be patched: {reason}"


def problem_from(args: argparse.Namespace) -> Problem:
    dtype = jnp.dtype(args.dtype).name
    return Problem(
        batch=args.batch,
        q_len=args.q_len,
        kv_len=args.kv_len,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        q_dtype=dtype,
        k_dtype=dtype,
        v_dtype=dtype,
        probs_dtype=dtype,
        platform=jax.default_backend(),
    )


def report(args: argparse.Namespace) -> str:
    lines = ["flashpatch doctor", "", "versions:"]
    lines += [f"  python {platform.python_version()} ({sys.executable})"]
    lines += [f"  {name} {_version(name)}" for name in PACKAGES]
    lines += ["", f"devices: {jax.default_backend()}: {', '.join(d.device_kind for d in jax.devices())}"]
    lines += [f"jit cache keyed through: {jit_cache.carrier_name()}"]
    env = settings.from_env()
    lines += [f"environment: {'FLASHPATCH is off' if env is None else env}"]
    lines += ["", "targets:"]
    lines += [f"  {t.site} ({t.adapter.kind}): {_target_status(t)}" for t in targets.all_targets()]
    problem = problem_from(args)
    lines += [
        "",
        f"problem: B={problem.batch} T={problem.q_len} S={problem.kv_len} heads={problem.num_heads}/"
        f"{problem.num_kv_heads} head_dim={problem.head_dim} {problem.q_dtype} on {problem.platform}",
        "backends:",
    ]
    for name in backends.names():
        reason = backends.get(name).unsupported(problem)
        lines.append(f"  {name}: {'can run it' if reason is None else 'cannot: ' + reason}")
    choice = selection.choose(args.backend, problem)
    lines += ["", f"{args.backend} picks: {choice.backend}", f"  because {choice.reason}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashpatch doctor", description=__doc__)
    parser.add_argument("--backend", default="auto", choices=settings.BACKEND_NAMES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-len", type=int, default=867, help="query length (openpi pi0: about 867)")
    parser.add_argument("--kv-len", type=int, default=867)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    print(report(args))
    return 0
