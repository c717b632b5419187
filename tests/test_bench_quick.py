"""The benchmark must not rot: `--quick` runs every scenario on CPU and writes sane JSON, markdown, PNGs."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from flashpatch.bench import cli, memory, records, report, timing
from flashpatch.bench.harness import Harness, Variant
from flashpatch.bench.options import QUICK, Options
from flashpatch.bench.records import Record

_ROOT = Path(__file__).resolve().parents[1]

SRC = Path(__file__).resolve().parents[1] / "src"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CASES = {
    ("core", "fwd"),
    ("core", "fwd_bwd"),
    ("gemma", "train"),
    ("gemma", "infer"),
    ("gemma_fast", "prefill"),
    ("gemma_fast", "decode"),
}
#: bf16 attention against the float32 reference (openpi's own bf16 path is ~3e-3 off).
CORE_TOL = 2e-2
#: Models: a few bf16 layers, compared with the einsum path's output on the same inputs.
MODEL_TOL = 5e-2


def assert_sane(document: dict, cases: set[tuple[str, str]]) -> None:
    """Every case ran (GPU-only backends may decline, with a reason: so does their decode, without a prefill)
    and its numbers make sense."""
    meta = document["meta"]
    for key in ("date", "command", "device", "versions", "options", "conventions"):
        assert meta[key], f"meta.{key} is empty"
    assert meta["versions"]["jax"]
    records = document["records"]
    assert {(r["scenario"], r["case"]) for r in records} == cases
    assert {"einsum", "xla"} <= {r["variant"] for r in records}
    for r in records:
        where = f"{r['scenario']}/{r['case']} {r['variant']} size {r['size']}"
        if r["status"] in ("unsupported", "skipped") and r["variant"] not in ("einsum", "xla"):
            assert r["reason"] and r["ms"] is None, where
            continue
        assert r["status"] == "ok", f"{where}: {r['status']} ({r['reason']})"
        assert r["ms"] > 0 and math.isfinite(r["ms"]), where
        assert r["memory"]["peak"] > 0, where
        if r["variant"] == "einsum":
            assert r["speedup"] is None, where
            continue
        assert r["speedup"] > 0, where
        assert r["variant"] in r["backends_ran"], where
        if r["scenario"] == "core":
            assert r["metrics"]["tflops"] > 0, where
            assert r["metrics"]["rel_err"] < CORE_TOL, f"{where}: rel_err {r['metrics']['rel_err']}"
        for name in ("rel_diff_vs_einsum", "loss_rel_diff_vs_einsum"):
            if name in r["metrics"]:
                assert r["metrics"][name] < MODEL_TOL, f"{where}: {name} {r['metrics'][name]}"
    for r in records:
        if r["scenario"] == "core" and r["variant"] == "einsum":
            assert r["metrics"]["rel_err"] < CORE_TOL  # the baseline is judged by the same reference


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_plots(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC), JAX_PLATFORMS="cpu")
    # Smaller compile effort on CPU: --quick checks that the code runs, its timings mean nothing.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    done = subprocess.run(
        [sys.executable, "-m", "flashpatch.bench", "--quick", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads((tmp_path / "results.json").read_text())
    assert_sane(document, CASES)
    late = [r for r in document["records"] if (r["reason"] or "").startswith("time budget")]
    assert not late, f"--quick dropped paths for time: {late}"
    assert "not run: " in done.stdout, "the paths that cannot run here are not named"
    fits = {f["variant"]: f for f in document["fits"]}
    assert fits["einsum"]["largest_ok"] == fits["xla"]["largest_ok"] == max(QUICK["train_sizes"])

    progress = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == len(document["records"]), "one progress line per case"
    assert "== summary" in done.stdout

    text = (tmp_path / "results.md").read_text()
    for heading in ("## Attention core, forward", "training step", "inference", "decode", "Largest size that trains"):
        assert heading in text
    if importlib.util.find_spec("matplotlib") is None:
        assert "no plots" in done.stdout
        return
    for name in ("core.png", "gemma.png", "gemma_fast.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert f"]({name})" in text


def _core_only(tmp_path, *extra: str) -> dict:
    out = io.StringIO()
    argv = ["--quick", "--scenarios", "core", "--budget-s", "300", "--out", str(tmp_path), *extra]
    cli.main(argv, stream=out)
    return json.loads((tmp_path / "results.json").read_text())


def test_a_wrong_backend_is_caught(tmp_path, monkeypatch):
    from flashpatch.backends import xla

    good = xla.XlaBackend.attend
    monkeypatch.setattr(xla.XlaBackend, "attend", lambda self, *a: good(self, *a) * 1.1)
    document = _core_only(tmp_path)
    with pytest.raises(AssertionError, match="rel_err"):
        assert_sane(document, {("core", "fwd"), ("core", "fwd_bwd")})


def test_a_declining_backend_is_reported_not_timed(tmp_path, monkeypatch):
    from flashpatch.backends import xla

    monkeypatch.setattr(xla.XlaBackend, "unsupported", lambda self, problem: "no such kernel here")
    document = _core_only(tmp_path)
    declined = [r for r in document["records"] if r["variant"] == "xla"]
    assert declined and all(r["status"] == "unsupported" for r in declined)
    assert all("no such kernel here" in r["reason"] and r["ms"] is None for r in declined)

    (tmp_path / "results.md").unlink()  # --render rebuilds the report from the JSON alone
    assert cli.main(["--render", str(tmp_path)], stream=io.StringIO()) == 0
    assert "unsupported: xla cannot run this call (no such kernel here)" in (tmp_path / "results.md").read_text()


def _harness() -> Harness:
    harness = Harness(Options(), timing.Budget(100, {"x": 1}), stream=io.StringIO())
    harness.budget.begin("x")
    return harness


def test_out_of_memory_ends_a_ladder_and_errors_fail_the_run():
    harness = _harness()
    variant = Variant("einsum")

    def oom(rec):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes.")

    first = harness.run_case("gemma", "train", variant, 1024, 4, oom)
    later = harness.run_case("gemma", "train", variant, 2048, 4, lambda rec: None)
    other = harness.run_case("gemma", "infer", variant, 2048, 4, lambda rec: None)
    broken = harness.run_case("gemma", "infer", variant, 4096, 4, lambda rec: 1 / 0)
    assert (first.status, later.status, other.status, broken.status) == ("oom", "skipped", "ok", "error")
    assert "out of memory at 1024" in later.reason
    assert "ZeroDivisionError" in broken.reason
    assert memory.is_out_of_memory(RuntimeError("CUDA_ERROR_OUT_OF_MEMORY: out of memory"))
    assert not memory.is_out_of_memory(ValueError("shapes do not match"))


def test_an_out_of_memory_while_autotuning_is_reported_as_the_allocation_that_failed():
    # As XLA raised it on the H200 for the einsum at T=16435 (benchmarks/results/h200-2026-12-01-openpi-fit).
    error = RuntimeError(
        "NOT_FOUND: Failed to get configs for: 2 out of 444 instructions. See logs for all failures.\n"
        "  %constant.1375.26 = f32[] constant(0)\n"
        "}. Status: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 32.21GiB with allocator GPU_0_bfc.\n"
        "external/xla+/xla/service/gpu/autotuning/redzone_buffers.cc:107"
    )
    harness = _harness()

    def oom(rec):
        raise error

    rec = harness.run_case("openpi", "fit", Variant("einsum"), 15616, 4, oom)
    assert rec.status == "oom"
    assert rec.reason.startswith("Out of memory while trying to allocate 32.21GiB"), rec.reason
    assert rec.reason.endswith("(while XLA autotuned the compile)") and "NOT_FOUND" not in rec.reason


def test_the_fit_line_names_prompt_and_sequence_length_per_ladder():
    def rec(scenario, case, variant, size, status="ok", seq=None):
        return Record(scenario, case, variant, size, 4, status=status, metrics={"seq_len": seq} if seq else {})

    records = [
        rec("openpi", "fit", "einsum", 7424, seq=8243),
        rec("openpi", "fit", "auto", 7424, seq=8243),
        rec("openpi", "fit", "einsum", 15616, status="oom"),
        rec("openpi", "fit", "auto", 15616, seq=16435),
        rec("gemma", "train", "einsum", 1024),
        rec("gemma", "train", "einsum", 2048, status="oom"),
    ]
    texts = {(f["scenario"], f["variant"]): report.fit_text(f) for f in report.fits(records)}
    assert texts[("openpi", "einsum")] == "prompt 7424 (T=8243), out of memory at prompt 15616"
    assert texts[("openpi", "auto")] == "prompt 15616 (T=16435) (the largest size tried; a lower bound)"
    assert texts[("gemma", "einsum")] == "T 1024, out of memory at T 2048"  # its own ladder, not openpi's


def test_budget_shares_time_by_weight_and_passes_leftovers_on():
    now = [0.0]
    budget = timing.Budget(100, {"a": 1, "b": 3}, clock=lambda: now[0])
    budget.begin("a")
    assert budget.deadline == pytest.approx(25)
    now[0] = 10  # 'a' finished early: 'b' gets everything left
    budget.begin("b")
    assert budget.deadline == pytest.approx(100)
    assert budget.exceeded() is None
    now[0] = 101
    assert "time budget" in budget.exceeded()


def test_measure_waits_for_results_and_groups_tiny_calls():
    import jax.numpy as jnp

    calls = []

    def call(i):
        calls.append(i)
        return jnp.float32(i) + 1

    result = timing.measure(call, warmup=2, repeats=5, max_seconds=0.05)
    assert result.median_ms > 0
    assert result.repeats >= timing.MIN_REPEATS
    assert result.calls_per_repeat > 1  # a scalar add is far below MIN_SAMPLE_S
    assert calls == list(range(len(calls)))  # every call gets a fresh index (rotating inputs)


def test_cli_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse(["--quick", "--cache-sizes", "8"])
    assert exit_.value.code == 2 and "--cache-sizes must each be at least" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.parse(["--core-sizes", "a,b"])
    assert exit_.value.code == 2 and "--core-sizes" in capsys.readouterr().err


OPENPI_CASES = ("pi0_train", "pi0_sample", "pi0_fast_sample", "pi0_fit")
FIT_PROMPT = 16


@pytest.mark.slow
def test_openpi_mode_runs_the_fixture_models(tmp_path):
    """The openpi mode on the openpi-compatible fixtures at a dummy size (CI has no openpi): every case and
    variant runs, the ceiling is a real ceiling, the agreement numbers are there, and the report has its table.

    Two things that made it the suite's slowest test are left to cheaper ones: `auto` in every case (on a CPU at
    these sizes it runs the einsum itself, so each case compiled the einsum's model once more; `pi0_fit` still
    runs `auto`'s training step beside the einsum's), and the fit ladder's second rung (the ladder's stopping
    and reporting have their own tests above)."""
    document = _openpi_run(tmp_path, "--openpi-fit-prompts", str(FIT_PROMPT))
    assert any("fixtures" in note for note in document["meta"]["notes"]), document["meta"]["notes"]
    records = document["records"]
    cases = {(r["case"], r["variant"]) for r in records}
    for case in OPENPI_CASES[:-1]:
        for variant in ("einsum", "xla", "ceiling"):
            assert (case, variant) in cases, (case, variant)
    assert {(r["variant"], r["size"]) for r in records if r["case"] == "fit"} == {
        ("einsum", FIT_PROMPT),
        ("auto", FIT_PROMPT),
    }
    by_case = {(r["case"], r["variant"]): r for r in records}
    for r in records:
        where = f"{r['case']} {r['variant']}"
        assert r["status"] == "ok", f"{where}: {r['status']} {r['reason']}"
        assert r["ms"] > 0 and r["metrics"]["seq_len"] > 0, where
        if r["variant"] not in ("einsum", "ceiling") and r["case"] != "fit":
            # a share exists where the ceiling ran faster than the einsum (CPU timings of tiny models may not)
            faster = by_case[(r["case"], "ceiling")]["ms"] < by_case[(r["case"], "einsum")]["ms"]
            assert ("ceiling_share" in r["metrics"]) == faster, where
    train = {r["variant"]: r for r in records if r["case"] == "pi0_train"}
    assert train["ceiling"]["metrics"]["gflop_vs_leanest"] > 0.5, "the ceiling dropped work the model needs"
    for variant in ("einsum", "xla"):
        assert train[variant]["metrics"]["grad_rel_err_vs_f32"] < 0.1, train[variant]["metrics"]
    assert "grad_rel_err_vs_f32" not in train["ceiling"]["metrics"]
    sample = {r["variant"]: r for r in records if r["case"] == "pi0_sample"}
    assert sample["xla"]["metrics"]["rel_diff_vs_einsum"] < MODEL_TOL
    assert sample["ceiling"]["metrics"]["rel_diff_vs_einsum"] > 0.2, "actions must depend on attention"
    fast = {r["variant"]: r for r in records if r["case"] == "pi0_fast_sample"}
    assert fast["xla"]["metrics"]["tokens_same_as_einsum"] == 1.0
    text = (tmp_path / "results.md").read_text()
    assert "## flashpatch's stand-in models for openpi's" in text and "of the ceiling's gain" in text
    assert "## openpi's own models" not in text, "the fixtures' report claims openpi's models"


def _openpi_run(tmp_path, *extra: str) -> dict:
    argv = ["--quick", "--scenarios", "openpi", "--backends", "xla", "--budget-s", "900"]
    argv += ["--openpi-cases", ",".join(OPENPI_CASES), "--out", str(tmp_path), *extra]
    assert cli.main(argv, stream=io.StringIO()) == 0
    return json.loads((tmp_path / "results.json").read_text())


@pytest.mark.slow
def test_openpi_mode_shows_a_broken_backend(tmp_path, use_backend):
    """A backend that attends a wrong key set must show in the numbers the openpi mode reports."""
    from flashpatch.backends import xla

    class DropsHalfTheKeys(xla.XlaBackend):
        def attend(self, q, k, v, mask, problem):
            half = jnp.arange(mask.shape[-1]) < mask.shape[-1] // 2
            return super().attend(q, k, v, mask & half, problem)

    use_backend("xla", DropsHalfTheKeys())
    argv = ["--quick", "--scenarios", "openpi", "--backends", "xla", "--no-openpi-grad-check"]
    argv += ["--openpi-cases", "pi0_sample", "--out", str(tmp_path)]
    assert cli.main(argv, stream=io.StringIO()) == 0
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    broken = next(r for r in records if r["variant"] == "xla")
    assert broken["metrics"]["rel_diff_vs_einsum"] > MODEL_TOL, broken["metrics"]


def test_plots_read_like_a_paper(tmp_path):
    """Memory in sensible units on a linear axis when the spread is small, no tick without a point, and a
    backend that could not run named under its panel with the reason (not silently absent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flashpatch.bench import plots

    def rec(variant, size, ms, peak, status="ok", reason=None, speedup=None):
        return Record(
            "core",
            "fwd",
            variant,
            size,
            2,
            status=status,
            reason=reason,
            ms=ms,
            speedup=speedup,
            memory={"peak": peak} if peak else {},
        )

    rows = [
        rec("einsum", 1024, 2.0, 300 * 2**20),
        rec("xla", 1024, 1.0, 301 * 2**20, speedup=2.0),
        rec("einsum", 4096, 8.0, 302 * 2**20),
        rec("xla", 4096, 4.0, 303 * 2**20, speedup=2.0),
        rec("kvax", 1024, None, None, "unsupported", "kvax runs on gpu, not cpu"),
        rec("einsum", 16384, None, None, "skipped", "time budget"),
    ]
    colors = {v: f"C{i}" for i, v in enumerate(("einsum", "xla", "kvax"))}
    fig, (speed, mem) = plt.subplots(1, 2)
    plots._speedup_panel(speed, rows, colors, "fwd")
    plots._memory_panel(mem, rows, colors, "fwd", None)
    plots._size_axis(mem, sorted({r.size for r in rows if r.status == "ok"}), "T")
    plots._not_run(speed, rows)
    assert mem.get_yscale() == "linear", "a 1% spread must not be drawn on a log axis"
    assert "MiB" in mem.get_ylabel()
    assert [t.get_text() for t in mem.get_xticklabels()] == ["1024", "4096"], "a tick for a size with no point"
    notes = [t.get_text() for t in speed.texts if t.get_text().startswith("not drawn")]
    assert notes and "kvax (kvax runs on gpu, not cpu)" in notes[0]
    plt.close(fig)
    assert plots.write(rows, tmp_path, {"device": {"kind": "cpu", "platform": "cpu"}, "options": {}}) == ["core.png"]


def test_ceiling_share_is_the_part_of_the_possible_gain_taken():
    from flashpatch.bench.scenarios.openpi import add_ceiling_shares

    def rec(variant, ms, gflop):
        return Record("openpi", "pi0_train", variant, 48, 32, ms=ms, metrics={"gflop_per_step": gflop})

    records = [rec("einsum", 1000.0, 1000.0), rec("auto", 950.0, 470.0), rec("ceiling", 900.0, 430.0)]
    add_ceiling_shares(records)
    einsum, auto, top = records
    assert auto.metrics["ceiling_share"] == pytest.approx(0.5)
    assert "ceiling_share" not in einsum.metrics and "ceiling_share" not in top.metrics
    assert top.metrics["gflop_vs_leanest"] == pytest.approx(430 / 470) and not top.notes
    dead = [rec("einsum", 1000.0, 1000.0), rec("auto", 950.0, 470.0), rec("ceiling", 500.0, 100.0)]
    add_ceiling_shares(dead)
    assert dead[2].notes and dead[2].notes[0].startswith("ceiling check"), "a ceiling that lost the model's work"
    slower = [rec("einsum", 1000.0, 1000.0), rec("auto", 950.0, 470.0), rec("ceiling", 1100.0, 430.0)]
    add_ceiling_shares(slower)
    assert "ceiling_share" not in slower[1].metrics  # no gain possible: no share to state


def test_a_run_records_the_commit_of_a_non_editable_install(tmp_path: Path) -> None:
    """pip copies the package out of its checkout; its direct_url.json still names the folder it came from."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the tests do not run inside a git checkout")
    commit = records.git_commit(package_dir=tmp_path, direct_url={"url": f"file://{_ROOT}", "dir_info": {}})
    assert commit is not None and commit.startswith(head.stdout.strip())
    vcs = {"url": "https://example.org/flashpatch.git", "vcs_info": {"vcs": "git", "commit_id": "abc123"}}
    assert records.git_commit(package_dir=tmp_path, direct_url=vcs) == "abc123"
    assert records.git_commit(package_dir=tmp_path, direct_url={}) is None
