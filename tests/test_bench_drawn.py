"""What the plots and reports say they show: the models that ran (openpi's own, or flashpatch's stand-in fixtures)
named in titles and headings, and cases that did not run drawn as such, not left blank."""

from __future__ import annotations

import pathlib

import pytest

from flashpatch.bench import plots, report
from flashpatch.bench.options import Options
from flashpatch.bench.records import Record

FIXTURES_NOTE = (
    "openpi mode: openpi is not importable here (No module named 'openpi'); these are flashpatch's "
    "openpi-compatible fixtures"
)
OPENPI_NOTE = "openpi mode: openpi from /x/openpi/src (commit 15a9616), full size"


def _meta(note: str) -> dict:
    return {
        "date": "2026-12-05T00:00:00+00:00",
        "command": "python -m flashpatch.bench",
        "device": {"kind": "cpu", "platform": "cpu"},
        "versions": {"jax": "0.12.0", "flax": "0.12.0"},
        "git_commit": None,
        "options": {**Options().__dict__},
        "conventions": {},
        "notes": [note],
    }


def _openpi_records(skipped_case: str | None = None) -> list[Record]:
    out = []
    for case in ("pi0_train", "pi0_long_train"):
        for variant, ms in (("einsum", 100.0), ("auto", 80.0), ("ceiling", 70.0)):
            rec = Record("openpi", case, variant, 48, 2, ms=ms, memory={"peak": 2**30})
            if variant != "einsum":
                rec.speedup = 100.0 / ms
            if case == skipped_case and variant == "auto":
                rec.status, rec.reason, rec.ms, rec.speedup = "skipped", "time budget: openpi had until 30s", None, None
            out.append(rec)
    return out


def test_titles_name_the_fixtures_when_the_fixtures_ran() -> None:
    title = plots._title("openpi", _meta(FIXTURES_NOTE))
    assert "openpi's models" not in title and "stand-in" in title, title
    heading = report.markdown(_meta(FIXTURES_NOTE), _openpi_records(), [], [])
    assert "## openpi's models" not in heading and "stand-in" in heading
    assert "openpi: pi0 training step" not in heading, "a case title claims openpi's model"


def test_titles_name_openpi_when_openpi_ran() -> None:
    title = plots._title("openpi", _meta(OPENPI_NOTE))
    assert "openpi's own models" in title and "stand-in" not in title, title


def test_the_gemma_scenarios_say_they_are_flashpatchs_stand_ins() -> None:
    meta = _meta(OPENPI_NOTE)
    for scenario in ("gemma", "gemma_fast"):
        assert "stand-in" in plots._title(scenario, meta)
    assert "stand-in" in report.case_title("gemma", "train", meta["options"])


def test_a_skipped_openpi_case_is_drawn_as_skipped(tmp_path: pathlib.Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figures: list = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), real(fig, *a, **k))[1])
    plots.write(_openpi_records(skipped_case="pi0_long_train"), tmp_path, _meta(OPENPI_NOTE))
    [fig] = figures
    speed = fig.axes[0]
    texts = [t.get_text() for t in speed.texts]
    assert any(text.startswith("skip") for text in texts), texts


def test_a_skipped_size_on_a_line_panel_is_drawn_as_skipped() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        Record("core", "fwd", "einsum", 64, 2, ms=2.0),
        Record("core", "fwd", "xla", 64, 2, ms=1.0, speedup=2.0),
        Record("core", "fwd", "einsum", 128, 2, ms=8.0),
        Record("core", "fwd", "xla", 128, 2, status="skipped", reason="time budget: core had until 12s"),
    ]
    fig, ax = plt.subplots()
    plots._speedup_panel(ax, rows, {"einsum": "C0", "xla": "C1"}, "fwd")
    plots._not_run(ax, rows)
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "xla: skip" in texts, texts
    assert "xla at T=128" in texts, texts
    plt.close(fig)
