"""Command line: `python -m flashpatch.bench [--quick] [--out DIR] ...`; see --help and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from flashpatch.bench.options import EXPERTS, OPENPI_CASES, QUICK, SCENARIOS, Options, variant_names
from flashpatch.tools import args as cli

PROG = "python -m flashpatch.bench"
#: Where results go without --out, as --help says it: a new directory in the current one (never a path of
#: flashpatch's own repository, which holds only the results committed on purpose).
DEFAULT_OUT = "./flashpatch-bench-<UTC date>-<time>"
#: Share of the time budget per group of cases (see timing.Budget).
BUDGET_WEIGHTS = {"core": 1.0, "gemma/train": 1.5, "gemma/infer": 0.75, "gemma_fast": 1.0, "openpi": 3.0}
_GROUPS = {
    "core": ("core",),
    "gemma": ("gemma/train", "gemma/infer"),
    "gemma_fast": ("gemma_fast",),
    "openpi": ("openpi",),
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, e.g. 512,1024; got {text!r}")
    return values


def _cache_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a directory for JAX's compilation cache")
    return path


def parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog=PROG,
        description="Benchmark flashpatch's attention backends against openpi's einsum path, side by side.",
    )
    d = Options()
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes on the CPU, to keep every path alive in CI: every path runs (no time budget unless "
        "--budget-s is given)",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"output directory, created if missing; one that holds files is refused unless --overwrite "
        f"(default {DEFAULT_OUT}: a new directory in the current one)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out name a directory that holds an earlier run: its results and plots are removed first",
    )
    p.add_argument(
        "--scenarios",
        type=cli.names_from(lambda: SCENARIOS, "--scenarios"),
        help=f"comma list of {','.join(SCENARIOS)} (default {','.join(d.scenarios)})",
    )
    p.add_argument(
        "--backends",
        type=cli.names_from(variant_names, "--backends"),
        help="comma list of flashpatch backends, and auto (default every registered backend)",
    )
    p.add_argument(
        "--core-sizes", type=_ints, help=f"core T = S values, run in this order (default {_csv(d.core_sizes)})"
    )
    p.add_argument("--core-batch", type=cli.positive_int, help=f"core batch (default {d.core_batch})")
    p.add_argument("--train-sizes", type=_ints, help=f"training T ladder (default {_csv(d.train_sizes)})")
    p.add_argument("--train-batch", type=cli.positive_int, help=f"training batch (default {d.train_batch})")
    p.add_argument(
        "--infer-sizes", type=_ints, help=f"pi0 inference T = prefix + suffix (default {_csv(d.infer_sizes)})"
    )
    p.add_argument("--infer-batch", type=cli.positive_int, help=f"pi0 inference batch (default {d.infer_batch})")
    p.add_argument("--denoise-steps", type=cli.positive_int, help=f"pi0 denoising steps (default {d.denoise_steps})")
    p.add_argument("--cache-sizes", type=_ints, help=f"pi0-FAST KV cache sizes (default {_csv(d.cache_sizes)})")
    p.add_argument(
        "--decode-steps", type=cli.positive_int, help=f"pi0-FAST tokens decoded per run (default {d.decode_steps})"
    )
    p.add_argument("--decode-batch", type=cli.positive_int, help=f"pi0-FAST batch (default {d.decode_batch})")
    p.add_argument("--depth", type=cli.positive_int, help=f"Gemma layers (default {d.depth}, the real models')")
    p.add_argument(
        "--prefix-expert",
        type=cli.one_of(EXPERTS, "--prefix-expert"),
        help=f"{', '.join(EXPERTS)} (default {d.prefix_expert})",
    )
    p.add_argument(
        "--action-expert",
        type=cli.one_of(EXPERTS, "--action-expert"),
        help=f"{', '.join(EXPERTS)} (default {d.action_expert})",
    )
    p.add_argument(
        "--openpi-src",
        type=Path,
        metavar="DIR",
        help="openpi's src/ folder (scenario openpi; default: an installed openpi)",
    )
    p.add_argument(
        "--openpi-size",
        type=cli.one_of(("full", "dummy"), "--openpi-size"),
        help="full: openpi's Gemma 2B + 300M (default); dummy: its dummy Gemma, for a quick check",
    )
    p.add_argument(
        "--openpi-cases",
        type=cli.names_from(lambda: OPENPI_CASES, "--openpi-cases"),
        help=f"comma list of {', '.join(OPENPI_CASES)} (default {', '.join(d.openpi_cases)})",
    )
    p.add_argument("--openpi-batch", type=cli.positive_int, help=f"pi0/pi0.5 training batch (default {d.openpi_batch})")
    p.add_argument(
        "--openpi-long-batch", type=cli.positive_int, help=f"long-prompt batch (default {d.openpi_long_batch})"
    )
    p.add_argument(
        "--openpi-long-prompt", type=cli.positive_int, help=f"long prompt, tokens (default {d.openpi_long_prompt})"
    )
    p.add_argument(
        "--openpi-huge-prompt",
        type=cli.positive_int,
        help=f"pi0_huge_train's prompt, tokens (default {d.openpi_huge_prompt})",
    )
    p.add_argument(
        "--openpi-grad-check",
        action=argparse.BooleanOptionalAction,
        help="loss and gradients at step 0 against the float32 model (default on)",
    )
    p.add_argument(
        "--openpi-fit-prompts",
        type=_ints,
        help=f"pi0_fit: prompt lengths tried (default {_csv(d.openpi_fit_prompts)})",
    )
    p.add_argument(
        "--warmup", type=cli.non_negative_int, help=f"untimed calls before timing, 0 or more (default {d.warmup})"
    )
    p.add_argument("--repeats", type=cli.positive_int, help=f"most timed repeats per measurement (default {d.repeats})")
    p.add_argument(
        "--case-seconds", type=cli.positive_seconds, help=f"cap on one timed loop (default {d.case_seconds})"
    )
    p.add_argument(
        "--input-sets", type=cli.positive_int, help=f"random input sets rotated through (default {d.input_sets})"
    )
    p.add_argument(
        "--budget-s",
        type=cli.positive_seconds,
        help=f"time budget; later cases are skipped and listed (default {d.budget_s:.0f}; none with --quick)",
    )
    p.add_argument("--seed", type=cli.non_negative_int, help=f"random seed, 0 or more (default {d.seed})")
    p.add_argument(
        "--compile-cache",
        type=_cache_dir,
        metavar="DIR",
        help="JAX persistent compilation cache directory, created if missing (reruns compile faster)",
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="DIR",
        help="measure nothing: rewrite DIR/results.md and the plots from DIR/results.json (e.g. where matplotlib is)",
    )
    return p


def _csv(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def parse(argv: Sequence[str]) -> Options:
    return _options(vars(parser().parse_args(list(argv))))


def _options(args: dict[str, Any]) -> Options:
    args = dict(args)
    args.pop("render", None)
    args.pop("overwrite", None)
    quick = args.pop("quick")
    given = {name: value for name, value in args.items() if value is not None}
    options = dataclasses.replace(Options(), **{**(QUICK if quick else {}), **given})
    try:
        options.validate()
    except ValueError as err:
        cli.fail(PROG, str(err))
    if options.openpi_src is not None and not options.openpi_src.is_dir():
        cli.fail(PROG, f"--openpi-src must be openpi's src/ folder; {options.openpi_src} is not a directory")
    return options


def default_out() -> Path:
    """A new directory in the current one, named by the UTC date and time (see DEFAULT_OUT); -2, -3, ... added
    where that name is taken (two runs in one second)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out, number = Path(f"flashpatch-bench-{date}"), 1
    while out.exists():
        number += 1
        out = Path(f"flashpatch-bench-{date}-{number}")
    return out


def run_outputs(directory: Path) -> list[Path]:
    """The files a run writes into its directory (results.json, results.md, one PNG per scenario)."""
    names = {"results.json", "results.md", *(f"{scenario}.png" for scenario in SCENARIOS)}
    return sorted(path for path in directory.iterdir() if path.name in names and path.is_file())


def _listed(names: Sequence[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def prepare_out(out: Path | None, overwrite: bool = False, stream: TextIO = sys.stdout) -> Path:
    """The output directory, created now: a path that cannot take the results is a usage error before
    anything is measured, not a traceback after it. Two runs never share one: a directory that holds files is
    refused, unless `overwrite`, which removes the earlier run's results and plots first (and names what it
    leaves: files the benchmark does not write)."""
    named = f"--out {out}" if out is not None else "the default output directory"
    out = default_out() if out is None else out
    if out.exists() and not out.is_dir():
        cli.fail(PROG, f"{named} is a file, not a directory: give --out a directory (it is created if missing)")
    held = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        cli.fail(
            PROG,
            f"{named} already holds files ({_listed(held)}): give a new or empty directory, or add --overwrite "
            "to remove the earlier run's results and plots first",
        )
    if held:
        removed = run_outputs(out)
        for path in removed:
            path.unlink()
        kept = [name for name in held if name not in {path.name for path in removed}]
        said = f"--overwrite: removed {_listed([path.name for path in removed]) or 'nothing'} from {out}"
        print(said + (f"; left in place (not written by the benchmark): {_listed(kept)}" if kept else ""), file=stream)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        cli.fail(PROG, f"{named} cannot be created ({err.strerror or err}): give --out a directory you can write to")
    if not os.access(out, os.W_OK | os.X_OK):
        cli.fail(PROG, f"{named} is not writable: give --out a directory you can write to")
    return out


def _jsonable(options: Options) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()}


def main(argv: Sequence[str] | None = None, stream: TextIO = sys.stdout) -> int:
    """Run the benchmark; exit status 1 if any case failed with an error (not OOM, skip or unsupported)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(parser().parse_args(argv))
    if args["render"] is not None:
        if not (args["render"] / "results.json").is_file():
            cli.fail(
                PROG, f"--render needs a directory with a results.json; {args['render'] / 'results.json'} is missing"
            )
        return render(args["render"], stream)
    options = _options(args)
    out = prepare_out(options.out, args["overwrite"], stream)

    import jax  # after parsing, so --help answers without starting JAX

    if options.compile_cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(options.compile_cache))

    from flashpatch.bench.harness import Harness
    from flashpatch.bench.records import run_metadata

    try:
        import optax  # noqa: F401 - the training steps' optimizer (flashpatch[bench])
    except ModuleNotFoundError:
        cli.fail(PROG, "the benchmark needs optax: pip install 'flashpatch[bench]'")
    from flashpatch.bench.scenarios import core, gemma, gemma_fast, openpi
    from flashpatch.bench.timing import Budget

    runners = {"core": core.run, "gemma": gemma.run, "gemma_fast": gemma_fast.run, "openpi": openpi.run}
    weights = {g: BUDGET_WEIGHTS[g] for s in options.scenarios for g in _GROUPS[s]}
    harness = Harness(options, Budget(options.budget_s, weights), stream)
    meta = run_metadata("python -m flashpatch.bench " + shlex.join(argv), _jsonable(options))
    budget = "no time budget" if options.budget_s == float("inf") else f"budget {options.budget_s:.0f}s"
    print(
        f"flashpatch bench on {meta['device']['kind']} ({meta['device']['platform']}); variants: "
        f"{', '.join(v.name for v in harness.variants)}; {budget}",
        file=stream,
        flush=True,
    )

    def save_partial() -> None:  # a run cut short (a time limit, a crash) still leaves what it measured
        meta["notes"], meta["models"] = harness.notes, harness.models
        document = {"meta": meta, "records": [r.as_dict() for r in harness.records], "partial": True}
        (out / "results.json").write_text(json.dumps(document, indent=1) + "\n")

    harness.on_record = save_partial
    for scenario in options.scenarios:
        runners[scenario](harness)
    meta["notes"], meta["models"] = harness.notes, harness.models
    write_outputs(out, meta, harness.records, stream)
    return 1 if any(r.status == "error" for r in harness.records) else 0


def render(directory: Path, stream: TextIO) -> int:
    """Rewrite the markdown and plots of an earlier run from its results.json (a file it cannot read: one line)."""
    from flashpatch.bench import spread

    path = directory / "results.json"
    meta, records = read_results(path)
    from flashpatch.bench.scenarios.openpi import add_ceiling_shares

    try:
        add_ceiling_shares(records)  # derived numbers, computed afresh (a cut-short run never reached them)
        spread.add_ranges(records)  # (results written before the spread was stored have it in their timings)
        write_outputs(directory, meta, records, stream)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        cli.fail(PROG, f"--render: {path} holds a value the report cannot use ({_first_line(err)})")
    return 0


#: What the report reads from a results.json's meta.
_META_KEYS = ("date", "command", "device", "versions", "options", "conventions")


def read_results(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """meta and records of a results.json, or a one-line usage error that names the file and what is wrong."""
    from flashpatch.bench.records import Record

    what = "a results.json the benchmark writes (a JSON object with meta and records)"
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        cli.fail(PROG, f"--render: {path} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno})")
    except (OSError, UnicodeDecodeError) as err:
        cli.fail(PROG, f"--render: {path} cannot be read ({_first_line(err)})")
    if not isinstance(document, dict):
        cli.fail(PROG, f"--render: {path} is not {what}")
    if not isinstance(document.get("records"), list):
        cli.fail(PROG, f"--render: {path} has no records list: it is not {what}")
    records = []
    for i, row in enumerate(document["records"]):
        try:
            records.append(Record(**row))
        except TypeError as err:
            cli.fail(PROG, f"--render: {path}: record {i} is not a benchmark record ({_first_line(err)})")
    meta = document.get("meta")
    missing = [key for key in _META_KEYS if not isinstance(meta, dict) or key not in meta]
    if not missing and not (isinstance(meta["device"], dict) and {"kind", "platform"} <= set(meta["device"])):
        missing = ["device.kind", "device.platform"]
    if missing:
        cli.fail(PROG, f"--render: {path} has no usable meta (missing {', '.join(missing)}): it is not {what}")
    return meta, records


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:200]


def write_outputs(out: Path, meta: dict[str, Any], records: Sequence[Any], stream: TextIO) -> None:
    """results.json first (it holds everything), then the plots and results.md, then the console summary."""
    from flashpatch.bench import plots, report

    out.mkdir(parents=True, exist_ok=True)
    fit_rows = report.fits(records)
    document = {"meta": meta, "records": [r.as_dict() for r in records], "fits": fit_rows}
    (out / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    try:
        images = plots.write(records, out, meta)
    except ImportError as err:
        images = []
        print(f"no plots: {err} (install matplotlib, or rerun with --render {out} where it is)", file=stream)
    (out / "results.md").write_text(report.markdown(meta, records, fit_rows, images))
    print(report.summary(records, fit_rows, (meta.get("options") or {}).get("scenarios", ())), file=stream)
    written = ", ".join(["results.json", "results.md", *images])
    print(f"wrote {written} to {out}", file=stream, flush=True)
