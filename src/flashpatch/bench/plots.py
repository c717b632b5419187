"""PNG plots per scenario: one row per case, speedup over einsum vs size and peak memory vs size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashpatch.bench.harness import EINSUM, size_label
from flashpatch.bench.memory import GIB
from flashpatch.bench.records import Record


def write(records: Sequence[Record], out_dir: Path, memory_limit: int | None) -> list[str]:
    """One PNG per scenario; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for scenario in dict.fromkeys(r.scenario for r in records):
        recs = [r for r in records if r.scenario == scenario]
        cases = list(dict.fromkeys(r.case for r in recs))
        colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r.variant for r in recs))}
        fig, axes = plt.subplots(len(cases), 2, figsize=(12, 4.2 * len(cases)), squeeze=False)
        for (ax_speed, ax_mem), case in zip(axes, cases, strict=True):
            rows = [r for r in recs if r.case == case]
            _speedup_panel(ax_speed, rows, colors, f"{scenario}/{case}")
            _memory_panel(ax_mem, rows, colors, f"{scenario}/{case}", memory_limit)
            for ax in (ax_speed, ax_mem):
                _size_axis(ax, sorted({r.size for r in rows}), size_label(scenario))
        fig.tight_layout()
        name = f"{scenario}.png"
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    return names


def _by_variant(rows: Sequence[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in sorted(rows, key=lambda r: r.size):
        out.setdefault(r.variant, []).append(r)
    return out


def _speedup_panel(ax: Any, rows: Sequence[Record], colors: dict[str, str], title: str) -> None:
    ax.axhline(1.0, color=colors.get(EINSUM, "gray"), linewidth=1.5, linestyle="--", label=f"{EINSUM} (= 1)")
    for variant, mine in _by_variant(rows).items():
        points = [(r.size, r.speedup) for r in mine if r.speedup is not None]
        if variant == EINSUM or not points:
            continue
        ax.plot(*zip(*points, strict=True), "-o", color=colors[variant], label=variant)
        for x, y in points:
            ax.annotate(f"{y:.2f}x", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    _mark(ax, [r.size for r in rows if r.variant == EINSUM and r.status == "oom"], f"{EINSUM}\nOOM", "gray")
    ax.set_title(f"{title}: speedup over {EINSUM} (higher is better)", fontsize=10)
    ax.set_ylabel("speedup (x)")
    ax.set_ylim(bottom=0)
    _legend(ax)


def _memory_panel(ax: Any, rows: Sequence[Record], colors: dict[str, str], title: str, limit: int | None) -> None:
    from matplotlib import ticker

    for variant, mine in _by_variant(rows).items():
        points = [(r.size, r.memory["peak"] / GIB) for r in mine if r.status == "ok" and "peak" in r.memory]
        if points:
            ax.plot(*zip(*points, strict=True), "-o", color=colors[variant], label=variant)
        _mark(ax, [r.size for r in mine if r.status == "oom"], f"{variant}\nOOM", colors[variant])
    if limit:
        ax.axhline(limit / GIB, color="red", linewidth=1, linestyle=":", label="device memory for JAX")
    ax.set_yscale("log")
    # Majors at 1, 2, 5 x 10^k with plain labels: decades alone leave most panels (say 35-45 GiB) unlabelled.
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_title(f"{title}: peak memory, compiled (lower is better)", fontsize=10)
    ax.set_ylabel("GiB (log scale)")
    _legend(ax)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")


def _mark(ax: Any, sizes: Sequence[int], text: str, color: str) -> None:
    """Write `text` near the top of the panel at each size (where a variant ran out of memory)."""
    for size in sizes:
        ax.axvline(size, color=color, linewidth=1, alpha=0.4)
        ax.annotate(
            text, (size, 0.97), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=7, color=color
        )


def _size_axis(ax: Any, sizes: Sequence[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)
