"""PNG plots per scenario: for each case, speedup over the einsum and peak memory against size.

Made to be read without the JSON beside them: the title names the device, the versions, dtype and
shapes; one legend sits above the panels, outside the data; value labels are spread so that none
covers another; each axis says its unit; memory is in MiB or GiB, whichever reads better, on a linear
axis unless it spans more than 20x; a variant that could not run is named under the panel with the
reason; sizes where nothing ran or was tried get no tick. Every speedup is drawn with its spread (an error bar
from both sides' p10-p90, flashpatch.bench.spread); one whose spread reaches across 1.0 is hollow (a hatched bar)
and named under the panel as within noise. A case that did not run is drawn as such where it would have been
("xla: skip", an "OOM" bar), and named under the panel with the reason. Titles name the models that ran: openpi's
own, or flashpatch's stand-ins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashpatch.bench import spread
from flashpatch.bench.harness import EINSUM, size_label
from flashpatch.bench.memory import GIB
from flashpatch.bench.records import Record, models_label

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
            sizes = sorted({r.size for r in rows if r.status == "ok"} | {r.size for r in _gaps(rows)})
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
        noisy = [c in mine and spread.within_noise(mine[c].speedup_range) for c in cases]
        bars = ax_speed.bar(xs, speed, width, color=colors[variant], label=variant)
        for bar, within in zip(bars, noisy, strict=True):
            if within:  # within noise: hatched, its colour only at the edge
                bar.set_facecolor("white")
                bar.set_edgecolor(colors[variant])
                bar.set_hatch("///")
        ranged = [(x, mine[c]) for x, c in zip(xs, cases, strict=True) if c in mine and mine[c].speedup_range]
        if ranged:
            ax_speed.errorbar(
                [x for x, _ in ranged],
                [r.speedup for _, r in ranged],
                yerr=[
                    [r.speedup - r.speedup_range[0] for _, r in ranged],
                    [r.speedup_range[1] - r.speedup for _, r in ranged],
                ],
                fmt="none",
                ecolor="black",
                elinewidth=0.8,
                capsize=2,
            )
            tops += [r.speedup_range[1] for _, r in ranged]
        tops += speed
        for x, c in zip(xs, cases, strict=True):
            rec = mine.get(c)
            if rec is not None and rec.status != "ok":  # drawn where its bar would stand
                ax_speed.annotate(
                    _STATUS_MARK.get(rec.status, rec.status),
                    (x, 0),
                    textcoords="offset points",
                    xytext=(0, 3),
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=LABEL_PT,
                    color=colors[variant],
                )
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
    ax_speed.set_ylabel("speedup over the einsum (x), p10-p90 bars")
    ax_speed.set_title("time (higher is better; 'ceiling' = attention for free; hatched = within noise)", fontsize=10)
    _within_noise_note(ax_speed, recs)
    ax_mem.set_ylabel("GiB (linear)")
    ax_mem.set_title("peak memory XLA planned (lower is better)", fontsize=10)
    _not_run(ax_speed, recs)
    _header(fig, _title("openpi", meta))
    fig.savefig(out_dir / "openpi.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "openpi.png"


#: How a case that did not run is written where its bar or point would be.
_STATUS_MARK = {"oom": "OOM", "skipped": "skip", "unsupported": "unsup.", "error": "ERROR"}


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
        "gemma": f"flashpatch's stand-in pi0 Gemma ({o.get('prefix_expert')} + {o.get('action_expert')}, depth "
        f"{o.get('depth')}; not openpi's code), bf16",
        "gemma_fast": f"flashpatch's stand-in pi0-FAST Gemma ({o.get('prefix_expert')}, depth {o.get('depth')}; "
        "not openpi's code), bf16",
        "openpi": f"{models_label(meta)}, bf16 compute",
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
    drawn = [(v, [r for r in mine if r.speedup is not None]) for v, mine in _by_variant(rows).items()]
    drawn = [(v, points) for v, points in drawn if v != EINSUM and points]
    tops = [1.0]
    for variant, points in drawn:
        color = colors[variant]
        clear = [i for i, r in enumerate(points) if not spread.within_noise(r.speedup_range)]
        xs, ys = [r.size for r in points], [r.speedup for r in points]
        ax.plot(xs, ys, "-o", markevery=clear, color=color, label=variant)
        noisy = [r for r in points if spread.within_noise(r.speedup_range)]
        ax.plot([r.size for r in noisy], [r.speedup for r in noisy], "o", color=color, markerfacecolor="white")
        ranged = [r for r in points if r.speedup_range]
        if ranged:
            ax.errorbar(
                [r.size for r in ranged],
                [r.speedup for r in ranged],
                yerr=[
                    [r.speedup - r.speedup_range[0] for r in ranged],
                    [r.speedup_range[1] - r.speedup for r in ranged],
                ],
                fmt="none",
                ecolor=color,
                elinewidth=1,
                capsize=3,
            )
        tops += [r.speedup for r in points]
    highest = max(tops)
    # Error bars count towards the panel's height, up to twice the largest speedup (a wild one is cut off there).
    tops += [min(r.speedup_range[1], 2 * highest) for _, points in drawn for r in points if r.speedup_range]
    ax.set_ylim(0, max(tops) * 1.25)
    labels = [(r.size, r.speedup, f"{r.speedup:.2f}x", colors[v]) for v, points in drawn for r in points]
    _value_labels(ax, labels)
    _mark(ax, [r.size for r in rows if r.variant == EINSUM and r.status == "oom"], f"{EINSUM}\nOOM", "gray")
    _gap_marks(ax, rows, colors)
    ax.set_title(f"{case}: speedup over {EINSUM} (higher is better; hollow: within noise)", fontsize=10, pad=8)
    ax.set_ylabel("speedup (x), bars: p10-p90")
    _within_noise_note(ax, rows)


def _where(rec: Record) -> str:
    """Where a record sits in its plot: its size on a line panel, its case among openpi's bars."""
    if rec.scenario == "openpi":
        return rec.case.replace("_", " ")
    return f"{size_label(rec.scenario)}={rec.size}"


def _within_noise_note(ax: Any, rows: Sequence[Record]) -> None:
    """Name, under the panel, each speedup whose spread reaches across 1.0."""
    noisy = [r for r in rows if r.speedup is not None and spread.within_noise(r.speedup_range)]
    if not noisy:
        return
    import textwrap

    text = "within noise (p10-p90 spread across 1.0): " + "; ".join(f"{r.variant} at {_where(r)}" for r in noisy)
    text = textwrap.fill(text, 80, max_lines=3, placeholder=" ...")
    ax.annotate(text, (0, -0.17), xycoords="axes fraction", fontsize=7, va="top", color="dimgray", gid=_NOISE_GID)


_NOISE_GID = "within-noise"


def _gaps(rows: Sequence[Record]) -> list[Record]:
    """Cases drawn as not run at their size: every one that did not run, but those of a variant that runs nowhere
    on this platform (named under the panel instead) and the einsum's out-of-memory (marked by `_mark`)."""
    ran = {r.variant for r in rows if r.status == "ok"}
    return [
        r
        for r in rows
        if r.status != "ok"
        and not (r.variant == EINSUM and r.status == "oom")
        and (r.variant in ran or r.status in ("skipped", "oom", "error"))
    ]


def _gap_marks(ax: Any, rows: Sequence[Record], colors: dict[str, str]) -> None:
    """Write "variant: skip" (or OOM, unsup., ERROR) at the foot of the panel at each size where a case did not run."""
    by_size: dict[int, list[Record]] = {}
    for rec in _gaps(rows):
        by_size.setdefault(rec.size, []).append(rec)
    for size, recs in by_size.items():
        for i, rec in enumerate(recs):
            ax.annotate(
                f"{rec.variant}: {_STATUS_MARK.get(rec.status, rec.status)}",
                (size, 0.03 + 0.05 * i),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=LABEL_PT,
                color=colors.get(rec.variant, "gray"),
                bbox=LABEL_BOX,
            )


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
    """Name, under the panel, each case with no point and why (a missing point must not look like a loss): a
    variant with no point at all by itself, "kvax (kvax runs on gpu, not cpu)"; else where, "xla at T=128 (...)"."""
    said: dict[tuple[str, str], list[str]] = {}  # (where, why) -> variants, so that a shared reason is said once
    for variant, mine in _by_variant(rows).items():
        gaps = []
        for r in mine:
            if variant == EINSUM:
                if r.status != "ok" and r.status != "oom":  # the einsum's OOM is marked on the panel
                    gaps.append((r, (r.reason or r.status).split(";")[0][:90]))
            elif r.speedup is None:
                gaps.append((r, (r.reason or r.status).split(";")[0][:90] if r.status != "ok" else "no einsum time"))
        if not gaps:
            continue
        reasons = list(dict.fromkeys(why for _, why in gaps))
        if variant != EINSUM and len(gaps) == len(mine) and len(reasons) == 1:
            said.setdefault(("", reasons[0]), []).append(variant)
            continue
        for why in reasons:
            places = ", ".join(_where(r) for r, reason in gaps if reason == why)
            said.setdefault((f" at {places}", why), []).append(variant)
    items = [f"{', '.join(variants)}{where} ({why})" for (where, why), variants in said.items()]
    if items:
        import textwrap

        below = [t for t in ax.texts if t.get_gid() == _NOISE_GID]
        top = -0.17 - 0.045 * (below[0].get_text().count("\n") + 1) if below else -0.17
        text = textwrap.fill("not drawn: " + "; ".join(items), 80, max_lines=4, placeholder=" ...")
        ax.annotate(text, (0, top), xycoords="axes fraction", fontsize=7, va="top", color="dimgray")


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
