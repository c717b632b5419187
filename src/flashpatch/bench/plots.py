"""PNG plots per scenario: for each case, speedup over the einsum and peak memory against size.

Made to be read without the JSON beside them: the title names the device, the versions, dtype and
shapes; one legend sits above the panels, outside the data; value labels are spread so that none
covers another; each axis says its unit; memory is in MiB or GiB, whichever reads better, on a linear
axis unless it spans more than 20x; a variant that could not run is named under the panel with the
reason; sizes where nothing ran get no tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashpatch.bench.harness import EINSUM, size_label
from flashpatch.bench.memory import GIB
from flashpatch.bench.records import Record

MIB = 2**20
LOG_SPAN = 20.0  # a memory axis goes logarithmic only past this max / min ratio
LABEL_PT = 7  # font size of value labels
LABEL_GAP_PT = 10.5  # vertical distance between the centres of two labels at one size (their height and a gap)
#: Above the panels: the two-line title, then the legend (inches, whatever the figure's height).
TITLE_IN, LEGEND_ROW_IN = 0.5, 0.26
#: Value labels stay legible where they cross a line or the grid.
LABEL_BOX = {"boxstyle": "square,pad=0.08", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}


def write(records: Sequence[Record], out_dir: Path, meta: dict[str, Any] | None = None) -> list[str]:
    """One PNG per scenario; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = meta or {}
    device = meta.get("device", {})
    limit = device.get("memory_limit_bytes")
    names = []
    for scenario in dict.fromkeys(r.scenario for r in records):
        recs = [r for r in records if r.scenario == scenario]
        if scenario == "openpi":
            workloads = [r for r in recs if r.case != "fit"]
            if workloads:
                names.append(_openpi_bars(plt, workloads, out_dir, meta))
            continue
        cases = list(dict.fromkeys(r.case for r in recs))
        colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r.variant for r in recs))}
        fig, axes = plt.subplots(len(cases), 2, figsize=(13, 5.2 * len(cases)), squeeze=False)
        for (ax_speed, ax_mem), case in zip(axes, cases, strict=True):
            rows = [r for r in recs if r.case == case]
            sizes = sorted({r.size for r in rows if r.status == "ok"})
            _speedup_panel(ax_speed, rows, colors, case)
            _memory_panel(ax_mem, rows, colors, case, limit)
            for ax in (ax_speed, ax_mem):
                _size_axis(ax, sizes, size_label(scenario))
            _not_run(ax_speed, rows)
        _header(fig, _title(scenario, meta))
        name = f"{scenario}.png"
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        names.append(name)
    return names


def _openpi_bars(plt: Any, recs: Sequence[Record], out_dir: Path, meta: dict[str, Any]) -> str:
    """openpi's workloads side by side: speedup over the einsum (the ceiling shows what is possible) and memory."""
    cases = list(dict.fromkeys(r.case for r in recs))
    variants = list(dict.fromkeys(r.variant for r in recs))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(14, 5.2))
    width = 0.8 / max(1, len(variants))
    bar_pt = width * _axes_width_pt(ax_speed) / max(1, len(cases))
    rotation = 0 if bar_pt >= 4.5 * 0.6 * LABEL_PT else 90  # a label wider than its bar stands upright
    tops = [1.0]
    for i, variant in enumerate(variants):
        mine = {r.case: r for r in recs if r.variant == variant}
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(cases))]
        speed = [_bar_speedup(mine.get(c)) for c in cases]
        peak = [mine[c].memory.get("peak", 0) / GIB if c in mine and mine[c].status == "ok" else 0 for c in cases]
        bars = ax_speed.bar(xs, speed, width, color=colors[variant], label=variant)
        tops += speed
        for bar, value in zip(bars, speed, strict=True):
            if value:
                at = (bar.get_x() + bar.get_width() / 2, value)
                ax_speed.annotate(
                    f"{value:.2f}",
                    at,
                    textcoords="offset points",
                    xytext=(0, 2),
                    ha="center",
                    va="bottom",
                    rotation=rotation,
                    fontsize=LABEL_PT,
                    bbox=LABEL_BOX,
                )
        ax_mem.bar(xs, peak, width, color=colors[variant])
    for ax in (ax_speed, ax_mem):
        ax.set_xticks(range(len(cases)), [c.replace("_", " ") for c in cases], fontsize=8, rotation=15)
        ax.grid(True, axis="y", alpha=0.3)
    ax_speed.set_ylim(0, max(tops) * (1.12 if rotation == 0 else 1.25))
    ax_speed.axhline(1.0, color="gray", linewidth=1, linestyle="--", zorder=0.5)
    ax_speed.set_ylabel("speedup over the einsum (x); 0 = did not run")
    ax_speed.set_title("time (higher is better; 'ceiling' = attention for free)", fontsize=10)
    ax_mem.set_ylabel("GiB (linear)")
    ax_mem.set_title("peak memory XLA planned (lower is better)", fontsize=10)
    _not_run(ax_speed, recs)
    _header(fig, _title("openpi", meta))
    fig.savefig(out_dir / "openpi.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "openpi.png"


def _bar_speedup(rec: Record | None) -> float:
    if rec is None or rec.status != "ok":
        return 0.0
    return rec.speedup if rec.speedup is not None else (1.0 if rec.variant == EINSUM else 0.0)


def _title(scenario: str, meta: dict[str, Any]) -> str:
    """Two lines: what was compared, then where (device, platform) and with what (versions)."""
    device = meta.get("device", {})
    o = meta.get("options", {})
    shapes = {
        "core": f"attention core, {o.get('num_heads')} q / {o.get('num_kv_heads')} kv heads, head_dim "
        f"{o.get('head_dim')}, batch {o.get('core_batch')}, bf16",
        "gemma": f"pi0 Gemma ({o.get('prefix_expert')} + {o.get('action_expert')}, depth {o.get('depth')}), bf16",
        "gemma_fast": f"pi0-FAST Gemma ({o.get('prefix_expert')}, depth {o.get('depth')}), bf16",
        "openpi": "openpi's models, bf16 compute",
    }.get(scenario, scenario)
    where = f"{device.get('kind', '?')} ({device.get('platform', '?')})"
    return f"flashpatch vs openpi's einsum: {shapes}\n{' · '.join([where, *_versions(meta.get('versions', {}))])}"


def _versions(found: dict[str, str]) -> list[str]:
    """What the numbers depend on, as "name version": JAX, flax, cuDNN where it was there, flashpatch."""
    shown = [f"{name} {found[name]}" for name in ("jax", "flax") if found.get(name)]
    cudnn = [found[name] for name in sorted(found) if name.startswith("nvidia-cudnn")]
    shown += [f"cuDNN {cudnn[0]}"] if cudnn else []
    return shown + ([f"flashpatch {found['flashpatch']}"] if found.get("flashpatch") else [])


def _header(fig: Any, title: str) -> None:
    """The title, then one legend for every panel (the colours are the variants'), both above the panels."""
    height = fig.get_figheight()
    found: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(label, handle)
    # The baseline first, then the variants in the order they ran.
    handles = {label: found[label] for label in sorted(found, key=lambda label: not label.startswith(EINSUM))}
    columns = max(1, min(len(handles), 7))
    rows = -(-len(handles) // columns)
    # Lay the panels out first, below the header's inches, then put title and legend above them.
    fig.tight_layout(rect=(0, 0, 1, 1 - (TITLE_IN + rows * LEGEND_ROW_IN) / height))
    fig.suptitle(title, fontsize=11, y=1 - 0.05 / height, va="top")
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="upper center",
            bbox_to_anchor=(0.5, 1 - TITLE_IN / height),
            ncol=columns,
            fontsize=8,
            frameon=False,
        )


def _axes_width_pt(ax: Any) -> float:
    return ax.get_position().width * ax.figure.get_figwidth() * 72


def _axes_height_pt(ax: Any) -> float:
    return ax.get_position().height * ax.figure.get_figheight() * 72


def _by_variant(rows: Sequence[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in sorted(rows, key=lambda r: r.size):
        out.setdefault(r.variant, []).append(r)
    return out


def _speedup_panel(ax: Any, rows: Sequence[Record], colors: dict[str, str], case: str) -> None:
    ax.axhline(1.0, color=colors.get(EINSUM, "gray"), linewidth=1.2, linestyle="--", label=f"{EINSUM} (= 1)")
    drawn = [(v, [(r.size, r.speedup) for r in mine if r.speedup is not None]) for v, mine in _by_variant(rows).items()]
    drawn = [(v, points) for v, points in drawn if v != EINSUM and points]
    for variant, points in drawn:
        ax.plot(*zip(*points, strict=True), "-o", color=colors[variant], label=variant)
    tops = [y for _, points in drawn for _, y in points]
    ax.set_ylim(0, max([1.0, *tops]) * 1.25)
    _value_labels(ax, [(x, y, f"{y:.2f}x", colors[variant]) for variant, points in drawn for x, y in points])
    _mark(ax, [r.size for r in rows if r.variant == EINSUM and r.status == "oom"], f"{EINSUM}\nOOM", "gray")
    ax.set_title(f"{case}: speedup over {EINSUM} (higher is better)", fontsize=10, pad=8)
    ax.set_ylabel("speedup (x)")


def _memory_panel(ax: Any, rows: Sequence[Record], colors: dict[str, str], case: str, limit: int | None) -> None:
    from matplotlib import ticker

    series = {
        variant: [(r.size, r.memory["peak"]) for r in mine if r.status == "ok" and "peak" in r.memory]
        for variant, mine in _by_variant(rows).items()
    }
    values = [b for points in series.values() for _, b in points]
    unit, scale = ("GiB", GIB) if values and max(values) >= GIB else ("MiB", MIB)
    for variant, points in series.items():
        if points:
            ax.plot([x for x, _ in points], [b / scale for _, b in points], "-o", color=colors[variant], label=variant)
    for variant, mine in _by_variant(rows).items():
        _mark(ax, [r.size for r in mine if r.status == "oom"], f"{variant}\nOOM", colors[variant])
    if limit and values and max(values) > 0.25 * limit:
        ax.axhline(limit / scale, color="red", linewidth=1, linestyle=":", label="device memory for JAX")
    positive = [b for b in values if b > 0]
    if positive and max(positive) / min(positive) > LOG_SPAN:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        scale_note = "log scale"
    else:
        ax.set_ylim(bottom=0, top=(max(values) / scale * 1.15) if values else 1)
        ax.yaxis.set_major_locator(ticker.MaxNLocator(6))
        scale_note = "linear"
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.3g}"))
    ax.set_title(f"{case}: peak memory XLA planned (lower is better)", fontsize=10, pad=8)
    ax.set_ylabel(f"{unit} ({scale_note})")


def _not_run(ax: Any, rows: Sequence[Record]) -> None:
    """Name, under the panel, each variant with no point and why (a missing line must not look like a loss)."""
    missing = {}
    for variant, mine in _by_variant(rows).items():
        if variant != EINSUM and not any(r.speedup is not None for r in mine):
            reasons = {(r.reason or r.status).split(";")[0][:90] for r in mine if r.status != "ok"}
            reasons = reasons or {"no einsum baseline"}
            missing[variant] = sorted(reasons)[0]
    if missing:
        import textwrap

        text = "not drawn: " + "; ".join(f"{v} ({why})" for v, why in missing.items())
        text = textwrap.fill(text, 80, max_lines=4, placeholder=" ...")
        ax.annotate(text, (0, -0.17), xycoords="axes fraction", fontsize=7, va="top", color="dimgray")


def _value_labels(ax: Any, labels: Sequence[tuple[float, float, str, str]]) -> None:
    """Write each (x, y, text, colour) just above its point; labels at one x that would touch are pushed apart
    (upwards, then the stack is moved down as a whole if it would leave the panel). Call after the y limits."""
    low, high = ax.get_ylim()
    gap = LABEL_GAP_PT / max(_axes_height_pt(ax), 1.0)
    above = 8 / max(_axes_height_pt(ax), 1.0)
    by_x: dict[float, list[tuple[float, str, str]]] = {}
    for x, y, text, color in labels:
        by_x.setdefault(x, []).append(((y - low) / (high - low), text, color))
    for x, group in by_x.items():
        group.sort()
        places: list[float] = []
        for fraction, _, _ in group:
            places.append(max(fraction + above, places[-1] + gap) if places else fraction + above)
        overflow = places[-1] - (1 - gap / 2)
        if overflow > 0:
            places = [place - overflow for place in places]
        for (fraction, text, color), place in zip(group, places, strict=True):
            ax.annotate(
                text,
                (x, low + fraction * (high - low)),
                xytext=(x, place),
                textcoords=("data", "axes fraction"),
                ha="center",
                va="center",
                fontsize=LABEL_PT,
                color=color,
                bbox=LABEL_BOX,
            )


def _mark(ax: Any, sizes: Sequence[int], text: str, color: str) -> None:
    """Write `text` near the top of the panel at each size (where a variant ran out of memory)."""
    for size in sizes:
        ax.axvline(size, color=color, linewidth=1, alpha=0.4)
        ax.annotate(
            text, (size, 0.97), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=7, color=color
        )


def _size_axis(ax: Any, sizes: Sequence[int], label: str) -> None:
    if len(sizes) > 1:
        ax.set_xscale("log", base=2)
    if sizes:
        ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)
