"""`python -m flashpatch.bench` options: a bad value is one line naming the option and the fix, exit 2, before
anything is measured; results go where --out says or to a default named in --help, outside any repository path;
a backend that cannot run on this machine is reported unsupported even once the time budget has run out."""

from __future__ import annotations

import io
import json
import pathlib

import jax
import pytest

from flashpatch.bench import cli, options, timing
from flashpatch.bench.harness import Harness, Variant
from flashpatch.bench.options import Options
from flashpatch.testing import gemma


@pytest.fixture(autouse=True)
def _nothing_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value that slips through must fail the test at once, not start a full-size benchmark on the CPU."""
    from flashpatch.bench.scenarios import core, gemma, gemma_fast, openpi

    def measure(harness: Harness) -> None:
        raise AssertionError("the benchmark started measuring")

    for module in (core, gemma, gemma_fast, openpi):
        monkeypatch.setattr(module, "run", measure)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv, stream=out)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, (argv, err)
    assert out.getvalue() == "", f"{argv}: work started before the usage error: {out.getvalue()}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m flashpatch.bench: error: "), (argv, err)
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--budget-s", "-1"], "--budget-s"),
        (["--budget-s", "0"], "--budget-s"),
        (["--budget-s", "nan"], "--budget-s"),
        (["--case-seconds", "0"], "--case-seconds"),
        (["--case-seconds", "-2"], "--case-seconds"),
        (["--warmup", "-1"], "--warmup"),
        (["--denoise-steps", "0"], "--denoise-steps"),
        (["--decode-steps", "0"], "--decode-steps"),
        (["--repeats", "0"], "--repeats"),
        (["--input-sets", "0"], "--input-sets"),
        (["--depth", "0"], "--depth"),
        (["--core-batch", "0"], "--core-batch"),
        (["--train-batch", "0"], "--train-batch"),
        (["--infer-batch", "0"], "--infer-batch"),
        (["--decode-batch", "-3"], "--decode-batch"),
        (["--seed", "-1"], "--seed"),
        (["--prefix-expert", "typo"], "--prefix-expert"),
        (["--action-expert", "gemma_3b"], "--action-expert"),
        (["--quick", "--decode-steps", "64"], "--cache-sizes"),
        (["--quick", "--train-sizes", "12"], "--train-sizes"),
        (["--out", "/proc/flashpatch-bench-test"], "--out"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option(argv: list[str], named: str, capsys) -> None:
    line = _usage_error(argv, capsys)
    assert named in line, line


def test_a_compile_cache_must_be_a_directory(tmp_path: pathlib.Path, capsys) -> None:
    """`--compile-cache /etc/passwd` was accepted, and JAX would write its cache files over a file's path."""
    existing = tmp_path / "a_file"
    existing.write_text("keep me\n")
    line = _usage_error(["--compile-cache", str(existing)], capsys)
    assert "--compile-cache" in line and "is a file" in line and "directory" in line, line
    assert existing.read_text() == "keep me\n"


def test_a_core_size_too_small_names_what_the_core_scenario_builds(capsys) -> None:
    """The core scenario times attention on pi0's mask; the message says so instead of citing an action suffix
    as if the core scenario had one of its own."""
    line = _usage_error(["--core-sizes", "10"], capsys)
    assert "--core-sizes must each be at least" in line and "pi0's mask" in line, line


def test_the_help_names_the_real_default_of_openpi_cases() -> None:
    text = " ".join(cli.parser().format_help().split())
    default = text.rsplit("--openpi-cases", 1)[1].split("(default ")[1].split(")")[0]
    assert default == ", ".join(Options().openpi_cases), default


def test_an_expert_must_be_a_fixture_variant(capsys) -> None:
    line = _usage_error(["--prefix-expert", "typo"], capsys)
    assert "gemma_2b" in line and "'typo'" in line, line
    assert set(options.EXPERTS) == set(gemma._VARIANTS), "options.EXPERTS must list flashpatch.testing.gemma's variants"


def test_out_must_not_be_a_file(tmp_path: pathlib.Path, capsys) -> None:
    existing = tmp_path / "results.txt"
    existing.write_text("keep me\n")
    line = _usage_error(["--out", str(existing)], capsys)
    assert "--out" in line and "is a file" in line and "directory" in line, line
    assert existing.read_text() == "keep me\n"


def test_the_default_output_is_named_in_help_and_outside_the_repository(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "./flashpatch-bench-" in cli.parser().format_help()
    from flashpatch.bench.scenarios import core

    monkeypatch.setattr(core, "run", lambda harness: None)  # the run's plumbing, nothing measured
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--quick", "--scenarios", "core"], stream=io.StringIO()) == 0
    [written] = list(tmp_path.iterdir())
    assert written.is_dir() and written.name.startswith("flashpatch-bench-"), written
    assert json.loads((written / "results.json").read_text())["records"] == []
    assert not (tmp_path / "benchmarks").exists()


def test_a_backend_that_cannot_run_here_is_unsupported_even_past_the_budget() -> None:
    if jax.default_backend() != "cpu":
        pytest.skip("needs a machine where cudnn cannot run")
    now = [0.0]
    harness = Harness(
        Options(backends=("cudnn", "xla")), timing.Budget(1, {"x": 1}, clock=lambda: now[0]), io.StringIO()
    )
    harness.budget.begin("x")
    now[0] = 5.0  # the budget has run out
    ran: list[str] = []
    cudnn = harness.run_case("core", "fwd", Variant("cudnn"), 64, 2, lambda rec: ran.append("cudnn"))
    xla = harness.run_case("core", "fwd", Variant("xla"), 64, 2, lambda rec: ran.append("xla"))
    assert (cudnn.status, xla.status) == ("unsupported", "skipped") and not ran
    assert "cudnn runs on gpu, not cpu" in cudnn.reason and "time budget" in xla.reason


def test_quick_drops_no_path_for_time() -> None:
    """--quick promises every path: on a slow, busy machine it takes longer rather than skipping one."""
    quick = cli.parse(["--quick"])
    now = [0.0]
    budget = timing.Budget(quick.budget_s, {"core": 1.0}, clock=lambda: now[0])
    budget.begin("core")
    now[0] = 10_000.0
    assert budget.exceeded() is None, "--quick skipped a case for time"
    given = cli.parse(["--quick", "--budget-s", "5"])  # a budget asked for is kept
    assert given.budget_s == 5


def _skipped(scenario: str, variant: str, reason: str, status: str = "skipped"):
    from flashpatch.bench.records import Record

    return Record(
        scenario, "train" if scenario != "openpi" else "pi0_train", variant, 32, 2, status=status, reason=reason
    )


def test_the_summary_names_each_path_not_run_and_why() -> None:
    from flashpatch.bench import report
    from flashpatch.bench.records import Record

    records = [
        Record("core", "fwd", "einsum", 64, 2, ms=1.0),
        Record("core", "fwd", "xla", 64, 2, ms=1.0, speedup=1.0),
        Record("core", "fwd", "pallas", 64, 2, status="skipped", reason="time budget: core had until 20s"),
        Record("core", "fwd", "cudnn", 64, 2, status="unsupported", reason="cudnn runs on gpu, not cpu"),
    ]
    text = report.summary(records, [], scenarios=("core",))
    line = next(line for line in text.splitlines() if line.startswith("not run"))
    assert "pallas" in line and "time budget" in line and "cudnn" in line and "runs on gpu" in line, line
    assert "xla" not in line, line


def test_the_advice_for_cases_skipped_for_time_fits_what_was_asked() -> None:
    from flashpatch.bench import report

    late = [_skipped("openpi", "auto", "time budget: openpi had until 100s of the run's 100s")]
    one = report.summary(late, [], scenarios=("openpi",))
    assert "fewer scenarios" not in one and "--budget-s" in one, one
    several = report.summary(late, [], scenarios=("core", "openpi"))
    assert "fewer scenarios" in several or "--scenarios openpi" in several, several
