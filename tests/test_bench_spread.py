"""Every ratio the benchmark prints carries its spread: the speedup over the einsum from both sides' p10-p90 of
repeats (the fastest and the slowest with fewer than six), in the progress line, the summary, results.md and the
plots; a ratio whose spread reaches across 1.0 is marked "within noise" everywhere it appears. A results.json
written before the spread was stored still renders with it (from the timings it holds)."""

from __future__ import annotations

import io
import json
import pathlib
import shutil

import pytest

from flashpatch.bench import report, spread, timing
from flashpatch.bench.harness import Harness, Variant
from flashpatch.bench.options import Options
from flashpatch.bench.records import Record

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _timed(median: float, p10: float, p90: float, repeats: int = 5):
    """A case body that stores one timing as the harness does, without measuring anything."""

    def body(rec: Record) -> None:
        rec.timings["call"] = {
            "median_ms": median,
            "p10_ms": p10,
            "p90_ms": p90,
            "repeats": repeats,
            "calls_per_repeat": 1,
        }
        rec.primary = "call"
        rec.ms = median

    return body


def _harness() -> tuple[Harness, io.StringIO]:
    stream = io.StringIO()
    harness = Harness(Options(backends=("xla",)), timing.Budget(100, {"x": 1}), stream=stream)
    harness.budget.begin("x")
    return harness, stream


def _run(harness: Harness, variant: str, size: int, median: float, p10: float, p90: float) -> Record:
    return harness.run_case("core", "fwd", Variant(variant), size, 2, _timed(median, p10, p90))


def test_a_speedup_carries_the_spread_of_both_sides() -> None:
    harness, _ = _harness()
    _run(harness, "einsum", 64, 10.0, 9.0, 12.0)
    rec = _run(harness, "xla", 64, 5.0, 4.0, 6.0)
    assert rec.speedup == pytest.approx(2.0)
    # slowest einsum against fastest variant and the reverse: 9 / 6 and 12 / 4
    assert rec.speedup_range == pytest.approx([1.5, 3.0])
    assert not spread.within_noise(rec.speedup_range)


def test_a_ratio_whose_spread_crosses_one_is_within_noise_in_every_output(tmp_path: pathlib.Path) -> None:
    harness, stream = _harness()
    _run(harness, "einsum", 64, 18.4, 4.4, 24.0)  # issue 34: the einsum's repeats spread 4.4-24 ms
    rec = _run(harness, "xla", 64, 16.0, 15.0, 17.0)
    assert spread.within_noise(rec.speedup_range)
    progress = stream.getvalue().splitlines()[-1]
    assert "within noise" in progress and "0.26-1.60" in progress, progress

    text = report.summary(harness.records, [])
    assert "within noise" in text, text

    meta = {
        "date": "d",
        "command": "c",
        "device": {"kind": "cpu", "platform": "cpu"},
        "versions": {"jax": "0"},
        "git_commit": None,
        "options": {**Options().__dict__},
        "conventions": {},
    }
    md = report.markdown(meta, harness.records, [], [])
    row = next(line for line in md.splitlines() if "| xla |" in line)
    assert "within noise" in row and "0.26-1.60" in row, row


def test_the_plot_marks_ratios_within_noise_and_draws_their_spread(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flashpatch.bench import plots

    harness, _ = _harness()
    _run(harness, "einsum", 64, 10.0, 9.0, 12.0)
    _run(harness, "xla", 64, 9.5, 9.0, 11.0)  # 0.82-1.33: within noise
    _run(harness, "einsum", 128, 40.0, 39.0, 41.0)
    _run(harness, "xla", 128, 10.0, 9.5, 10.5)  # 3.71-4.32: clear
    fig, ax = plt.subplots()
    colors = {"einsum": "C0", "xla": "C1"}
    plots._speedup_panel(ax, harness.records, colors, "fwd")
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "within noise" in texts and "xla at T=64" in texts, texts
    assert "T=128" not in texts.split("within noise")[1], "a clear ratio was marked within noise"
    bars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert bars, "no error bars: the spread is not drawn"
    plt.close(fig)


def test_an_older_results_json_renders_with_its_spreads(tmp_path: pathlib.Path) -> None:
    """h200-2026-12-01-openpi-pi0 predates the stored spread; its timings still give it (pi0 sample_actions:
    auto runs the einsum itself, so its ratio is within noise; training is not)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(RESULTS / "h200-2026-12-01-openpi-pi0" / "results.json", run / "results.json")
    document = json.loads((run / "results.json").read_text())
    records = [Record(**r) for r in document["records"]]
    spread.add_ranges(records)
    by = {(r.case, r.variant): r for r in records}
    sample, train = by[("pi0_sample", "auto")], by[("pi0_train", "auto")]
    assert spread.within_noise(sample.speedup_range), sample.speedup_range
    low, high = train.speedup_range
    assert 1.0 < low < train.speedup < high, train.speedup_range
    assert train.speedup_range == pytest.approx(
        [983.9969869999834 / 930.7431110000266, 986.116672999998 / 921.2524019999933]
    )
