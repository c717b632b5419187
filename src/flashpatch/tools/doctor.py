"""`python -m flashpatch doctor`: what is installed, what would be patched, and what `auto` would pick."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import TYPE_CHECKING

from flashpatch import backends, versions
from flashpatch.tools import args as cli_args

if TYPE_CHECKING:
    from flashpatch.switch.settings import Settings

#: What flashpatch runs on or can use (kvax and its Triton stack: the kvax backend).
PACKAGES = ("flashpatch", "flax", "wrapt", "numpy", *versions.KERNEL_STACK)
DTYPES = ("bfloat16", "float16", "float32")


def _target_status(target) -> str:
    try:
        module = importlib.import_module(target.module)
    except ImportError as err:
        return f"not importable ({err.__class__.__name__}: {err})"
    cls = getattr(module, target.cls_name, None)
    if not isinstance(cls, type):
        return f"{target.cls_name} not found in the module"
    reason = target.adapter.drift(cls)
    return "ready to patch" if reason is None else f"will NOT be patched: {reason}"


def problem_from(args: argparse.Namespace):
    import jax

    from flashpatch.backends.base import Problem

    dtype = args.dtype
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
        causal_runs=not getattr(args, "no_causal_runs", False),
    )


def _environment() -> tuple[str, Settings | None, str | None]:
    """What the FLASHPATCH* variables ask for: (a line for the report, the settings or None, the error or None)."""
    from flashpatch.switch import settings

    try:
        env = settings.from_env()
    except ValueError as err:
        return f"INVALID, so flashpatch stays off at start-up: {err}", None, str(err)
    if env is not None:
        return str(env), env, None
    named = os.environ.get("FLASHPATCH_BACKEND", "").strip()
    if named:
        return f"FLASHPATCH is off (FLASHPATCH_BACKEND={named} is ignored until FLASHPATCH=1)", None, None
    return "FLASHPATCH is off", None, None


def report(args: argparse.Namespace) -> str:
    """The report for `args`; `args.backend` None: the backend the environment names, else auto."""
    import jax

    from flashpatch import targets, versions
    from flashpatch.core import guard, selection, tuning
    from flashpatch.switch import jit_key as jit_cache
    from flashpatch.tools import support

    lines = ["flashpatch doctor", "", "versions:"]
    lines += [f"  python {platform.python_version()} ({sys.executable})"]
    lines += [f"  {name} {versions.installed(name) or 'not installed'}" for name in PACKAGES]
    lines += ["", f"devices: {jax.default_backend()}: {', '.join(d.device_kind for d in jax.devices())}"]
    untested = versions.outside_tested()
    if untested:
        lines += ["untested releases: " + ", ".join(f"{n} {v} (tested: {spec})" for n, (v, spec) in untested.items())]
    lines += [f"jit cache keyed through: {jit_cache.carrier_name()}"]
    environment, env, _ = _environment()
    lines += [f"environment: {environment}"]
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
        try:
            reason = backends.get(name).unsupported(problem)
        except Exception as err:  # a plugin backend that cannot even be built
            reason = f"could not be loaded ({type(err).__name__}: {err})"
        lines.append(f"  {name}: {'can run it' if reason is None else 'cannot run it here: ' + reason}")
    if args.backend is not None:
        asked, label = args.backend, args.backend
    elif env is not None:  # what FLASHPATCH=1 will run: the variable's backend, not auto's choice
        asked, label = env.backend, f"FLASHPATCH_BACKEND={env.backend}"
    else:
        asked, label = "auto", "auto"
    choice = selection.choose(asked, problem, guard.failure)
    lines += ["", f"{label} picks: {choice.backend}", f"  because {choice.reason}"]
    lines += [f"  compile guard: {_guard_line(problem)}"]
    lines += ["", "openpi's training calls on this machine (docs/user-guide.md, 'Support matrix'):"]
    lines += [f"  {line}" for line in support.own_row()]
    lines += ["", f"pallas and JAX's Pallas Triton: {_pallas_triton_line()}"]
    lines += ["", *tuning.report()]
    return "\n".join(lines)


def _guard_line(problem) -> str:
    from flashpatch.core import guard

    setting = os.environ.get(guard.ENV, "").strip() or "unset"
    if not guard.applies(problem):
        return f"not applied to this call ({guard.ENV}={setting}; it guards GPU calls unless set to 0)"
    return f"on ({guard.ENV}={setting}): a backend that fails to compile here gives way, with one warning"


def _pallas_triton_line() -> str:
    """What the Pallas Triton deprecation means on the installed JAX (docs/user-guide.md, the deprecation)."""
    from flashpatch import versions
    from flashpatch.backends.pallas import gates

    missing = gates.backend_missing()
    if missing is not None:
        return missing
    jax_version = versions.installed("jax")
    if jax_version is None:
        return "JAX is not installed"
    if versions.satisfies(jax_version, gates.NAMED_GPUS_JAX):
        return (
            f"jax {jax_version} lowers Pallas Triton only for GPUs it knows by name (the RTX A6000, RTX 3090, "
            "L40S and RTX 5090 are not among them): pallas declines those; jax 0.11.2 or newer takes any GPU"
        )
    if versions.satisfies(jax_version, ">=0.11.2"):
        return (
            f"{gates.DEPRECATION}. On jax {jax_version} each lowering of the pallas kernels warns so (kept out of "
            "pytest --flashpatch sessions); pallas runs as before"
        )
    return f"jax {jax_version} lowers Pallas Triton without a deprecation warning"


def main(argv: list[str] | None = None) -> int:
    prog = "python -m flashpatch doctor"
    parser = cli_args.Parser(prog=prog, description=__doc__)
    parser.add_argument(
        "--backend",
        type=cli_args.one_of(backends.choices, "--backend"),
        help=f"what to resolve for the shape: {', '.join(backends.choices())} "
        "(default: FLASHPATCH_BACKEND where FLASHPATCH=1, else auto)",
    )
    positive = cli_args.positive_int
    parser.add_argument("--batch", type=positive, default=1, help="batch size B of the attention call (default 1)")
    parser.add_argument("--q-len", type=positive, default=867, help="query length T (default 867, openpi pi0's)")
    parser.add_argument("--kv-len", type=positive, default=867, help="key length S (default 867; T + cache in decode)")
    parser.add_argument("--heads", type=positive, default=8, help="query heads N (default 8, Gemma 2B's)")
    parser.add_argument("--kv-heads", type=positive, default=1, help="key/value heads K, dividing N (default 1)")
    parser.add_argument("--head-dim", type=positive, default=256, help="head dim H (default 256, Gemma's)")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        type=cli_args.one_of(DTYPES, "--dtype"),
        help=f"dtype of q, k and v: {', '.join(DTYPES)} (default bfloat16, openpi's training dtype)",
    )
    parser.add_argument(
        "--no-causal-runs",
        action="store_true",
        help="the masks hold no causal run of several rows, as pi0's and pi0.5's (default: they may, as pi0-FAST's)",
    )
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        cli_args.fail(prog, f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    print(report(args), flush=True)
    error = _environment()[2]
    if error is not None:
        cli_args.fail(prog, f"{error}; fix the variable (flashpatch stays off until it is)")
    return 0


if __name__ == "__main__":  # `python -m flashpatch.tools.doctor` is `python -m flashpatch doctor`
    raise SystemExit(main())
