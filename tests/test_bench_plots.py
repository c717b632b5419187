"""The benchmark's plots, drawn from committed H200 results: value labels never overlap, legends sit outside the
data, and the title names the device and the versions."""

from __future__ import annotations

import itertools
import json
import pathlib

import pytest

from flashpatch.bench import plots
from flashpatch.bench.records import Record

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
#: Runs whose old plots had overlapping labels (core: 1.18x / 1.22x at T=3072) or a legend over a bar (openpi).
RUNS = (
    "h200-2026-12-01-core-b2",
    "h200-2026-12-01-core-b8",
    "h200-2026-12-01-openpi-pi0",
    "h200-2026-12-01-openpi-band",
)


@pytest.fixture
def drawn(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
    """draw(run) -> the figures plots.write made for the run's committed results.json, drawn, with its meta."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figures: list = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)

    def draw(run: str):
        document = json.loads((RESULTS / run / "results.json").read_text())
        records = [Record(**r) for r in document["records"]]
        figures.clear()
        names = plots.write(records, tmp_path, document["meta"])
        assert names and len(figures) == len(names)
        for fig in figures:
            FigureCanvasAgg(fig).draw()  # pyplot.close took the figure's own canvas away
        return list(figures), document["meta"]

    return draw


def _value_labels(ax) -> list:
    """The numbers written at points and on bars (not the notes under a panel, not OOM marks)."""
    return [t for t in ax.texts if t.get_text().rstrip("x").replace(".", "", 1).isdigit()]


@pytest.mark.parametrize("run", RUNS)
def test_value_labels_do_not_overlap(drawn, run: str) -> None:
    figures, _ = drawn(run)
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _value_labels(ax)]
            for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
                assert not box_a.overlaps(box_b), f"{run}, {ax.get_title()}: labels {a} and {b} overlap"


@pytest.mark.parametrize("run", RUNS)
def test_legends_sit_outside_the_data(drawn, run: str) -> None:
    figures, _ = drawn(run)
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        assert legends, f"{run}: no legend"
        for legend, ax in itertools.product(legends, fig.axes):
            box = legend.get_window_extent(renderer)
            assert not box.overlaps(ax.get_window_extent(renderer)), f"{run}: a legend over {ax.get_title()!r}"


@pytest.mark.parametrize("run", RUNS)
def test_the_title_names_device_and_versions(drawn, run: str) -> None:
    figures, meta = drawn(run)
    for fig in figures:
        title = fig._suptitle.get_text()
        assert meta["device"]["kind"] in title, title
        for name in ("jax", "flax"):
            assert f"{name} {meta['versions'][name]}" in title, title
        assert "cuDNN 9.19.0.56" in title, title
