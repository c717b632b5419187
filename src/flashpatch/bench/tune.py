"""`python -m flashpatch tune`: time every backend that runs here, and openpi's einsum (`reference`), at openpi's
attention shapes, forward and forward+backward, and write the table `auto` reads first (flashpatch.core.tuning).

Why: auto's rules were measured on one GPU. On any other GPU this table, measured on the user's own, is what
keeps "never slower than openpi's own attention" true: auto takes the fastest measured backend that can run a
call, and never one measured slower than the einsum.

How it measures: every backend in this one process, on the same inputs (openpi's masks with padding, a missing
camera in every third row); each compiled first, its forward output checked against float32 attention (NaN or
a larger error than openpi's own marks it failed), warmed up, then timed to `block_until_ready` over repeats,
and the median kept with its p10-p90 spread (`flashpatch.bench.timing.measure`). A backend that fails is
recorded as failed with a one-line reason; one that declares it cannot run the call, as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from flashpatch import backends
from flashpatch.backends.base import Problem
from flashpatch.bench import spread
from flashpatch.core import tuning
from flashpatch.core.tuning import CANNOT, FAILED, FORWARD, MODE_TEXT, OK
from flashpatch.tools import args as cli_args
from flashpatch.tools import openpi_shapes as shapes
from flashpatch.tools.openpi_shapes import HEAD_DIM, HEADS, KV_HEADS, MODELS, OPENPI_BATCH, Call

PROG = "python -m flashpatch tune"
DTYPES = ("bfloat16", "float16", "float32")

# ----------------------------------------------------------------------------------------------------- measuring

#: measure(backend, call, mode) -> {"median_ms", "p10_ms", "p90_ms", "repeats", ...}; raises where it fails.
Measure = Callable[[str, Call, str], dict[str, Any]]


class WrongResult(RuntimeError):
    """A backend whose output is not finite, or further from float32 attention than openpi's own is."""


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Measurer:
    """The real measurement: compile, check, warm up, time with block_until_ready; medians with p10-p90."""

    def __init__(self, warmup: int = 3, repeats: int = 30, max_seconds: float = 2.0, seed: int = 0):
        self.warmup, self.repeats, self.max_seconds, self.seed = warmup, repeats, max_seconds, seed
        self._inputs: dict[str, tuple] = {}
        self._float32: dict[str, tuple] = {}

    @property
    def settings(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "repeats": self.repeats, "max_seconds": self.max_seconds, "seed": self.seed}

    def inputs(self, call: Call) -> tuple:
        """(q, k, v, mask, cotangent) on the default device, the same for every backend."""
        if call.label not in self._inputs:
            import jax.numpy as jnp

            p = call.problem
            rng = np.random.default_rng(self.seed)
            q = rng.standard_normal((p.batch, p.q_len, p.num_heads, p.head_dim), np.float32) * p.head_dim**-0.5
            k = rng.standard_normal((p.batch, p.kv_len, p.num_kv_heads, p.head_dim), np.float32)
            v = rng.standard_normal((p.batch, p.kv_len, p.num_kv_heads, p.head_dim), np.float32)
            g = rng.standard_normal((p.batch, p.q_len, p.num_heads, p.head_dim), np.float32)
            self._inputs[call.label] = (
                jnp.asarray(q, p.q_dtype),
                jnp.asarray(k, p.k_dtype),
                jnp.asarray(v, p.v_dtype),
                jnp.asarray(call.mask(rng)),
                jnp.asarray(g, p.out_dtype),
            )
        return self._inputs[call.label]

    def __call__(self, name: str, call: Call, mode: str) -> dict[str, Any]:
        import jax

        from flashpatch.bench import timing

        q, k, v, mask, g = self.inputs(call)
        forward = _forward(name, call.problem)
        if mode == FORWARD:
            args: tuple = (q, k, v, mask)
            fn = forward
        else:
            args = (q, k, v, mask, g)

            def fn(q, k, v, mask, g):
                out, pullback = jax.vjp(lambda q, k, v: forward(q, k, v, mask), q, k, v)
                return out, pullback(g)

        compiled = jax.jit(fn).lower(*args).compile()
        check = self._check(name, call, mode, jax.block_until_ready(compiled(*args)))
        found = timing.measure(
            lambda _: compiled(*args), warmup=self.warmup, repeats=self.repeats, max_seconds=self.max_seconds
        )
        return {**found.as_dict(), "check": check}

    def _check(self, name: str, call: Call, mode: str, result: Any) -> str:
        import jax
        import jax.numpy as jnp

        if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(result)):
            raise WrongResult(f"its {MODE_TEXT[mode]} gave NaN or inf")
        if mode != FORWARD:
            return "finite"
        yardstick = self._yardstick(call)
        if isinstance(yardstick, str):
            return f"finite (no float32 comparison: {yardstick})"
        ref32, own = yardstick
        error = _relative_error(result, ref32)
        if name == backends.REFERENCE:
            return f"relative error {error:.2g} against float32"
        bound = max(_agreement(call.problem.out_dtype), 2 * own)
        if error > bound:
            raise WrongResult(
                f"its output is {error:.2g} (relative) from float32 attention, openpi's own {own:.2g} "
                f"(allowed {bound:.2g})"
            )
        return f"relative error {error:.2g} against float32 (openpi's own {own:.2g})"

    def _yardstick(self, call: Call) -> tuple | str:
        """(float32 attention's output, openpi's own relative error from it), or why there is none."""
        if call.label not in self._float32:
            import jax
            import jax.numpy as jnp

            from flashpatch.backends.reference import reference_attention

            q, k, v, mask, _ = self.inputs(call)
            try:
                f32 = [x.astype(jnp.float32) for x in (q, k, v)]
                ref32 = jax.jit(lambda q, k, v, m: reference_attention(q, k, v, m, jnp.float32))(*f32, mask)
                own = jax.jit(_forward(backends.REFERENCE, call.problem))(q, k, v, mask)
                self._float32[call.label] = (ref32, _relative_error(own, ref32))
            except Exception as err:  # float32 logits that do not fit: the check is then finiteness alone
                self._float32[call.label] = (one_line(err, 120),)
        found = self._float32[call.label]
        return found[0] if len(found) == 1 else found


def _forward(name: str, problem: Problem) -> Callable:
    """What the core puts in the graph for `name` (core/attention.py): openpi's math, or `run.run`."""
    from flashpatch.backends.reference import reference_attention

    if name == backends.REFERENCE:
        return lambda q, k, v, mask: reference_attention(q, k, v, mask, problem.probs_dtype)
    from flashpatch.core import run

    backend = backends.get(name)
    return lambda q, k, v, mask: run.run(q, k, v, mask, backend, problem)


def _relative_error(out, ref) -> float:
    import jax.numpy as jnp

    diff = out.astype(jnp.float32) - ref
    return float(jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(ref), jnp.finfo(jnp.float32).tiny))


def _agreement(dtype: str) -> float:
    from flashpatch.core.verify import AGREEMENT

    return AGREEMENT.get(dtype, AGREEMENT["bfloat16"])


# ------------------------------------------------------------------------------------------------------ progress


class Progress:
    """A bar on a terminal (redrawn in place), one line per step elsewhere; messages printed above it."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._text = ""

    def _bar(self) -> str:
        filled = self.width * self.done // self.total
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {self._text}"

    def step(self, text: str) -> None:
        """Say what runs now (it counts once `advance` is called)."""
        self._text = text
        if self.tty:
            self.stream.write("\r\033[K" + self._bar())
        else:
            self.stream.write(f"[{self.done + 1}/{self.total}] {text}\n")
        self.stream.flush()

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        if self.tty:
            self.stream.write("\r\033[K" + self._bar())
            self.stream.flush()

    def say(self, line: str, stream: TextIO | None = None) -> None:
        """Print `line` (to `stream`, default the bar's) above the bar."""
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
        target = stream if stream is not None else self.stream
        target.write(line + "\n")
        target.flush()
        if self.tty:
            self.stream.write(self._bar())
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


# --------------------------------------------------------------------------------------------------------- tuning


def _declines(name: str, problem: Problem) -> str | None:
    if name == backends.REFERENCE:
        return None
    try:
        return backends.get(name).unsupported(problem)
    except Exception as err:  # a plugin backend that cannot even be built
        return f"it could not be loaded ({one_line(err)})"


def measure_calls(calls: Sequence[Call], names: Sequence[str], measure: Measure, progress: Progress) -> list:
    """Every backend of `names` on every call, in this process; an Entry per call completed."""
    entries = []
    for call in calls:
        results: dict[str, dict[str, Any]] = {}
        for name in names:
            reason = _declines(name, call.problem)
            if reason is not None:
                results[name] = {"status": CANNOT, "reason": reason}
                progress.advance(len(call.modes))
                continue
            result: dict[str, Any] = {"status": OK}
            for index, mode in enumerate(call.modes):
                progress.step(f"{call.label}: {name} {MODE_TEXT[mode]}")
                try:
                    result[mode] = measure(name, call, mode)
                except Exception as err:  # recorded, one line; never a traceback
                    result = {"status": FAILED, "reason": f"{MODE_TEXT[mode]}: {one_line(err)}"}
                    progress.say(f"{call.label}: {name} failed ({result['reason']})")
                    progress.advance(len(call.modes) - index)
                    break
                progress.advance()
            results[name] = result
        entries.append(tuning.Entry(call.key, call.label, call.modes, results))
    return entries


def summary(entry: tuning.Entry) -> list[str]:
    """The entry as lines: every backend's medians with their spread and its speed-up over the einsum."""
    lines = [f"{entry.label} ({tuning.call_text(entry.call)}):"]
    for name, result in entry.results.items():
        if result.get("status") != OK:
            lines.append(f"  {name:<12} {result.get('status')}: {result.get('reason')}")
            continue
        parts = []
        for mode in entry.modes:
            t, base = result[mode], entry.results.get(backends.REFERENCE, {}).get(mode)
            ratio = ""
            if base is not None and name != backends.REFERENCE:  # the speed-up, with the spread of both times
                bounds = (base["p10_ms"] / t["p90_ms"], base["p90_ms"] / t["p10_ms"])
                ratio = f", speed-up {spread.ratio_text(base['median_ms'] / t['median_ms'], bounds)}"
            times = f"{t['p10_ms']:.3g}-{t['p90_ms']:.3g}"
            parts.append(f"{MODE_TEXT[mode]} {t['median_ms']:.3g} ms ({times}, {t['repeats']} runs{ratio})")
        lines.append(f"  {name:<12} {'; '.join(parts)}")
    ranking = entry.ranking()
    if ranking:
        lines.append(f"  auto takes, in order, the first that runs: {' > '.join(ranking)}")
    else:
        lines.append("  openpi's einsum has no time here, so auto's rules decide this call")
    return lines


def save(entries: list, identity: tuning.Identity, path: Path, settings: dict[str, Any]) -> str:
    """Write (or extend) the table at `path`; what was done, in words."""
    table = tuning.Table(identity, tuple(entries), tuning.now_text(), settings)
    note = ""
    try:
        earlier = tuning.read(path)
    except FileNotFoundError:
        earlier = None
    except (OSError, tuning.TableError) as err:
        earlier, note = None, f" (replacing a table that could not be used: {err})"
    if earlier is not None:
        if earlier.identity == identity:
            table = earlier.merged(table)
        else:
            note = f" (replacing a table measured elsewhere: {'; '.join(earlier.identity.differences(identity))})"
    tuning.write(table, path)
    return f"wrote {path}: {len(table.entries)} entr{'y' if len(table.entries) == 1 else 'ies'}{note}"


# -------------------------------------------------------------------------------------------------- command line


class UsageError(ValueError):
    pass


def _parser() -> cli_args.Parser:
    parser = cli_args.Parser(
        prog=PROG,
        description="Time every backend that runs here and openpi's einsum at openpi's attention shapes, forward "
        "and forward+backward, and write the table auto reads first (doctor shows it).",
    )
    positive = cli_args.positive_int
    parser.add_argument(
        "model",
        nargs="?",
        help=f"{', '.join(MODELS)}, or one of openpi's train config names where openpi is installed; leave out and "
        "give --q-len for a shape of your own",
    )
    parser.add_argument(
        "--batch",
        type=positive,
        help=f"the batch one GPU trains at (default {OPENPI_BATCH}, openpi's, or an openpi config's batch_size over "
        "the GPUs here; 1 for --q-len)",
    )
    parser.add_argument(
        "--sample-batch", type=positive, default=1, help="the batch of sample_actions calls (default 1, a policy's)"
    )
    parser.add_argument(
        "--calls",
        type=_kinds,
        default=shapes.CALL_KINDS,
        help="which of a model's calls to time: train (forward and backward), sample (forward), or train,sample "
        "(default)",
    )
    parser.add_argument("--max-token-len", type=positive, help="the model's max_token_len (default: the model's)")
    parser.add_argument("--action-horizon", type=positive, help="the model's action_horizon (default: the model's)")
    parser.add_argument("--q-len", type=positive, help="a shape of your own: query length T")
    parser.add_argument("--kv-len", type=positive, help="key length S (default T)")
    parser.add_argument("--heads", type=positive, help=f"query heads N (default {HEADS}, Gemma's)")
    parser.add_argument("--kv-heads", type=positive, help=f"key/value heads K, dividing N (default {KV_HEADS})")
    parser.add_argument("--head-dim", type=positive, help=f"head dim H (default {HEAD_DIM}, Gemma's)")
    parser.add_argument(
        "--dtype",
        type=cli_args.one_of(DTYPES, "--dtype"),
        help=f"dtype of q, k, v and the probabilities: {', '.join(DTYPES)} (default bfloat16, openpi's)",
    )
    parser.add_argument(
        "--no-causal-runs",
        action="store_true",
        help="with --q-len: the masks hold no causal run of several rows, as pi0's and pi0.5's (default: they end "
        "in one, as pi0-FAST's; doctor takes the same option)",
    )
    parser.add_argument(
        "--forward-only", action="store_true", help="with --q-len: time the forward pass alone (an inference call)"
    )
    parser.add_argument(
        "--backends",
        type=cli_args.names_from(backends.names, "--backends"),
        help="comma list of backends to time (default: every registered one); reference is always timed",
    )
    parser.add_argument("--warmup", type=positive, default=3, help="untimed runs after compiling (default 3)")
    parser.add_argument("--repeats", type=positive, default=30, help="timed repeats, at most (default 30)")
    parser.add_argument(
        "--max-seconds",
        type=cli_args.positive_seconds,
        default=2.0,
        help="about how long one backend's timed loop may take (default 2; fewer repeats where calls are slow)",
    )
    parser.add_argument(
        "--out", type=Path, help=f"the table file (default: {tuning.ENV}, else the cache; doctor prints it)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="say what would be timed and where the table would go; time nothing"
    )
    return parser


def _kinds(text: str) -> tuple[str, ...]:
    given = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not given or any(part not in shapes.CALL_KINDS for part in given):
        raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(shapes.CALL_KINDS)}; got {text!r}")
    return given


def plan(args: argparse.Namespace, platform: str) -> list[Call]:
    """The calls `args` asks for (UsageError in one sentence where they do not fit together)."""
    shape_options = ("kv_len", "heads", "kv_heads", "head_dim", "no_causal_runs", "forward_only")
    if args.model is None and args.q_len is None:
        raise UsageError(f"give a model ({', '.join(MODELS)} or an openpi train config name) or --q-len")
    if args.model is not None:
        given = [f"--{o.replace('_', '-')}" for o in ("q_len", *shape_options) if getattr(args, o)]
        if given:
            raise UsageError(f"{', '.join(given)}: for a shape of your own, not with a model ({args.model})")
        name = args.model.strip()
        try:
            model, batch, dtype = (MODELS[name], None, None) if name in MODELS else shapes.from_openpi(name)
        except shapes.UnknownModel as unknown:
            raise UsageError(str(unknown)) from None
        changes = {"max_token_len": args.max_token_len, "action_horizon": args.action_horizon}
        model = dataclasses.replace(model, **{k: v for k, v in changes.items() if v is not None})
        dtype = args.dtype or (dtype if dtype in DTYPES else "bfloat16")
        return shapes.model_calls(
            model, args.batch or batch or OPENPI_BATCH, args.sample_batch, dtype, platform, args.calls
        )
    for option in ("max_token_len", "action_horizon"):
        if getattr(args, option) is not None:
            raise UsageError(f"--{option.replace('_', '-')} shapes a model's calls; give a model with it")
    heads, kv_heads = args.heads or HEADS, args.kv_heads or KV_HEADS
    kv_len = args.kv_len or args.q_len
    if heads % kv_heads:
        raise UsageError(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads})")
    if args.q_len > kv_len:
        raise UsageError(f"--q-len ({args.q_len}) must not exceed --kv-len ({kv_len}): queries attend keys they see")
    dtype = args.dtype or "bfloat16"
    problem = Problem(
        args.batch or 1,
        args.q_len,
        kv_len,
        heads,
        kv_heads,
        args.head_dim or HEAD_DIM,
        dtype,
        dtype,
        dtype,
        dtype,
        platform,
        not args.no_causal_runs,
    )
    return [shapes.custom_call(problem, (FORWARD,) if args.forward_only else tuning.MODES)]


def main(
    argv: list[str] | None = None,
    *,
    measure: Measure | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The command; `measure` replaces the real measurement (tests inject simulated timings)."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    args = _parser().parse_args(argv)
    identity = tuning.current()
    try:
        calls = plan(args, identity.platform)
    except UsageError as usage:
        cli_args.fail(PROG, str(usage))
    names = [backends.REFERENCE, *(n for n in (args.backends or backends.names()) if n != backends.REFERENCE)]
    path = args.out.expanduser() if args.out is not None else tuning.path_for(identity)
    real = Measurer(args.warmup, args.repeats, args.max_seconds) if measure is None else None
    settings = real.settings if real is not None else {"measure": getattr(measure, "__name__", "injected")}
    print(f"tuning on {identity.device_text}; {identity.versions_text}", file=out)
    if identity.platform != "gpu":
        print(
            f"no GPU here: these are {identity.platform} times, and the table applies to {identity.kind} alone",
            file=out,
        )
    if tuning.setting() == "off" and args.out is None:
        print(f"note: {tuning.ENV}=off, so auto will not read this table until it is unset", file=out)
    for call in calls:
        print(
            f"  {call.label}: {tuning.call_text(call.key)}, {' and '.join(MODE_TEXT[m] for m in call.modes)}", file=out
        )
    print(f"  backends: {', '.join(names)}", file=out)
    if args.dry_run:
        print(f"would write {path}", file=out)
        return 0
    progress = Progress(sum(len(names) * len(c.modes) for c in calls), err)
    entries: list = []
    interrupted = False
    try:
        for call in calls:
            entries += measure_calls([call], names, measure or real, progress)  # type: ignore[arg-type]
            progress.say("\n".join(summary(entries[-1])), out)
    except KeyboardInterrupt:
        interrupted = True
    progress.close()
    if not entries:
        print(f"{PROG}: interrupted before any call was measured; nothing written", file=err)
        return 130
    try:
        done = save(entries, identity, path, settings)
    except OSError as error:
        print(f"{PROG}: error: could not write the table to {path}: {one_line(error)}", file=err)
        return 1
    print(done, file=out)
    if path != tuning.path_for(identity) or tuning.setting() == "off":
        print(f"auto reads it where {tuning.ENV}={path}", file=out)
    else:
        print("auto reads it from now on, for this device and these versions; doctor shows it", file=out)
    if interrupted:
        print(f"{PROG}: interrupted: the calls measured before it were written", file=err)
        return 130
    return 0


if __name__ == "__main__":  # `python -m flashpatch.bench.tune` is `python -m flashpatch tune`
    raise SystemExit(main())
