"""PNG plots per scenario: speedup over einsum vs size, and peak memory vs size (out of memory marked)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flashpatch.bench.harness import EINSUM, size_label
from flashpatch.bench.memory import GIB
from flashpatch.bench.records import Record

_LINESTYLES = ("-", "--", ":", "-.")


def write(records: Sequence[Record], out_dir: Path, memory_limit: int | None) -> list[str]:
    """One PNG per scenario; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for scenario in dict.fromkeys(r.scenario for r in records):
        recs = [r for r in records if r.scenario == scenario]
        fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
        cases = list(dict.fromkeys(r.case for r in recs))
        variants = list(dict.fromkeys(r.variant for r in recs))
        colors = {v: f"C{i}" for i, v in enumerate(variants)}
        for ci, case in enumerate(cases):
            style = _LINESTYLES[ci % len(_LINESTYLES)]
            for variant in variants:
                rows = sorted((r for r in recs if r.case == case and r.variant == variant), key=lambda r: r.size)
                label = f"{variant} {case}"
                speed = [(r.size, r.speedup) for r in rows if r.speedup is not None]
                if variant != EINSUM and speed:
                    ax_speed.plot(*zip(*speed, strict=True), style, marker="o", color=colors[variant], label=label)
                mem = [(r.size, r.memory["peak"] / GIB) for r in rows if r.status == "ok" and "peak" in r.memory]
                if mem:
                    ax_mem.plot(*zip(*mem, strict=True), style, marker="o", color=colors[variant], label=label)
                for r in rows:
                    if r.status == "oom":
                        ax_mem.plot(
                            r.size,
                            1.0,
                            "x",
                            color=colors[variant],
                            markersize=12,
                            mew=3,
                            transform=ax_mem.get_xaxis_transform(),
                            clip_on=False,
                        )
        ax_speed.axhline(1.0, color="gray", linewidth=1, linestyle="--", label="einsum")
        ax_speed.set_title(f"{scenario}: speedup over einsum (higher is better)")
        ax_speed.set_ylabel("speedup (x)")
        ax_mem.set_title(f"{scenario}: peak memory (x at top: out of memory)")
        ax_mem.set_ylabel("GiB (compiled peak)")
        if memory_limit:
            ax_mem.axhline(memory_limit / GIB, color="red", linewidth=1, linestyle=":", label="device limit")
        for ax in (ax_speed, ax_mem):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(size_label(scenario))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{scenario}.png"
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names
