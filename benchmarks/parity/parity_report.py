"""Turn the results_T<T>.json files of train_parity.py into PNGs of overlaid curves and a markdown summary.

train_parity.py calls `render` at its end; to redo it elsewhere (say, where matplotlib is installed):
    python benchmarks/parity/parity_report.py OUT_DIR
Several directories (say, the same command run in separate processes) are read together, and the summary
then also says how far the same run lands from itself between processes:
    python benchmarks/parity/parity_report.py DIR_A DIR_B ... --out REPORT_DIR
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

#: The agreement the parity check asks for: final losses within 2% of the unpatched run.
FINAL_TOLERANCE = 0.02
_MIB = 2**20


def load(*dirs: pathlib.Path) -> list[dict]:
    """Every results file in `dirs`, shortest T first, then by run seed, then in the order of `dirs`.

    Each record gets a "source" (its directory, as `parent/name`) to tell apart the same run from several
    processes.
    """
    records = []
    for directory in dirs:
        for path in sorted(directory.glob("results_T*.json")):
            record = json.loads(path.read_text())
            record["source"] = f"{directory.parent.name}/{directory.name}"
            records.append(record)
    if not records:
        raise FileNotFoundError(f"no results_T*.json in {', '.join(map(str, dirs))}")
    return sorted(records, key=lambda r: (r["seq_len"], run_seed(r)))


def run_seed(record: dict) -> int:
    """The seed of a record's runs (files written before --seeds existed hold it in args)."""
    return record.get("run_seed", record["args"]["seed"])


def _by_length(records: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["seq_len"], []).append(record)
    return grouped


def final_loss(record: dict, run: dict) -> float:
    """Mean loss of a run's last `final_steps` steps."""
    return float(np.mean(run["losses"][-record["final_steps"] :]))


def _reruns(records: list[dict]) -> dict[tuple[int, int], list[dict]]:
    """Records of the same T and run seed from more than one process, by (T, seed)."""
    grouped: dict[tuple[int, int], list[dict]] = {}
    for record in records:
        grouped.setdefault((record["seq_len"], run_seed(record)), []).append(record)
    return {key: group for key, group in grouped.items() if len(group) > 1}


def render(out: pathlib.Path, sources: list[pathlib.Path] | None = None) -> list[pathlib.Path]:
    """Write summary.md and, where matplotlib is installed, the PNGs into `out`; return what was written.

    `sources` are the directories read (default: `out` alone); training-parity-reruns.png is drawn only when
    some T and run seed were run in more than one of them.
    """
    records = load(*(sources or [out]))
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.md"]
    written[0].write_text(summary(records))
    try:
        plot(records, out / "training-parity.png")
        written.append(out / "training-parity.png")
        if _reruns(records):
            plot_reruns(records, out / "training-parity-reruns.png")
            written.append(out / "training-parity-reruns.png")
    except ImportError as err:
        print(
            f"no PNG ({err}); the JSON is kept: run `python benchmarks/parity/parity_report.py {out}` where matplotlib is"
        )
    return written


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot(records: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [group[0] for group in _by_length(records).values()]  # one column per T: its first run seed
    fig, axes = plt.subplots(2, len(records), figsize=(6.5 * len(records), 7), squeeze=False, sharex="col")
    for col, record in enumerate(records):
        runs = record["runs"]
        window = record["window"]
        baseline = np.asarray(runs[0]["losses"])
        base_smooth = _smooth(baseline, window)
        steps = np.arange(len(baseline))
        gap_drawn = False
        top, bottom = axes[0, col], axes[1, col]
        top.plot(steps, baseline, color="0.85", lw=0.5, label="unpatched, per step")
        for i, run in enumerate(runs):
            losses = np.asarray(run["losses"])
            smooth = _smooth(losses, window)
            style = dict(lw=2.5, color="black") if i == 0 else dict(lw=1.2, ls="--", color=f"C{i}")
            top.plot(steps[window - 1 :], smooth, label=f"{run['name']} ({window}-step mean)", **style)
            if run["eval_steps"]:
                top.plot(run["eval_steps"], run["eval_losses"], "o", ms=3, color=style["color"], alpha=0.7)
            if i:
                gap = np.abs(smooth - base_smooth) / np.abs(base_smooth)
                label = run["name"] + (" (identical: no gap to draw)" if not gap.any() else "")
                shown = np.where(gap > 0, gap, np.nan)  # a log axis has no zero; exact steps leave holes
                bottom.plot(steps[window - 1 :], shown, color=f"C{i}", lw=1, label=label)
                gap_drawn |= bool(np.any(gap > 0))
        env = record["environment"]
        top.set_title(f"T = {record['seq_len']}, seed {run_seed(record)}  ({env['device']}, {record['args']['dtype']})")
        top.set_yscale("log")
        top.set_ylabel("flow-matching loss (dots: held-out)")
        top.legend(fontsize=8)
        if gap_drawn:  # a log axis needs a gap above zero somewhere
            bottom.set_yscale("log")
        bottom.set_xlabel("step")
        bottom.set_ylabel(f"|gap| / unpatched ({window}-step means)")
        if len(runs) > 1:
            bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reruns(records: list[dict], path: pathlib.Path) -> None:
    """One panel per T and run seed run in several processes: every run's smoothed curve from each process
    (colour: the run, line style: the process), to show how far the same run lands from itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _reruns(records)
    names = list(dict.fromkeys(run["name"] for group in groups.values() for r in group for run in r["runs"]))
    colours = {name: ("black" if i == 0 else f"C{i}") for i, name in enumerate(names)}
    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False, sharey=True)
    for ax, ((seq_len, seed), group) in zip(axes[0], groups.items(), strict=True):
        window = group[0]["window"]
        for p, record in enumerate(group):
            for run in record["runs"]:
                smooth = _smooth(np.asarray(run["losses"]), window)
                steps = np.arange(window - 1, window - 1 + len(smooth))
                label = f"{run['name']}, {record['source']}"
                ax.plot(steps, smooth, ls=styles[p % len(styles)], color=colours[run["name"]], lw=1.2, label=label)
        ax.set_title(f"T = {seq_len}, seed {seed}: the same runs in {len(group)} processes ({window}-step means)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("flow-matching loss (moving mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(records: list[dict]) -> str:
    lines = ["# Training parity results", ""]
    groups = _by_length(records)
    reruns = _reruns(records)
    for record in records:
        args, env = record["args"], record["environment"]
        final_k = record["final_steps"]
        several = len(groups[record["seq_len"]]) > 1
        lines += [
            f"## T = {record['seq_len']}"
            + (f", run seed {run_seed(record)}" if several else "")
            + (f" ({record['source']})" if (record["seq_len"], run_seed(record)) in reruns else ""),
            "",
            f"{env['device']} ({env['platform']}), jax {env['jax']}; {args['steps']} steps, batch {args['batch']}, "
            f"width {args['width']}/{args['expert_width'] or args['width'] // 2}, depth {args['depth']}, "
            f"{args['dtype']}; cameras {tuple(record['layout']['cameras'])}, prompt {record['layout']['prompt']}, "
            f"{record['layout']['horizon']} actions. Final loss: mean of the last {final_k} steps.",
            "",
            "| run | final loss | final vs unpatched | max gap per step | max gap, smoothed | median step | "
            "trace+compile | XLA step memory | device peak so far |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for run in record["runs"]:
            gap = record["gaps"].get(run["name"])
            final = final_loss(record, run)
            memory = run["memory"]
            warned = any(note.startswith("warning:") for note in run["notes"])
            cells = [
                run["name"] + (" (flashpatch warned: see below)" if warned else ""),
                f"{final:.5f}",
                "baseline"
                if gap is None
                else f"{gap['final_rel_diff']:.2e}" + (" (identical)" if gap["identical"] else ""),
                "" if gap is None else f"{gap['max_rel_gap']:.2e}",
                "" if gap is None else f"{gap['max_rel_gap_smoothed']:.2e} ({gap['window']} steps)",
                f"{run['median_step_s'] * 1e3:.2f} ms",
                f"{run['compile_s']:.1f} s",
                f"{memory['step_total_bytes'] / _MIB:.0f} MiB" if "step_total_bytes" in memory else "n/a",
                f"{memory['device_peak_bytes_in_use'] / _MIB:.0f} MiB"
                if "device_peak_bytes_in_use" in memory
                else "n/a",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if record["gaps"]:
            worst = max(g["final_rel_diff"] for g in record["gaps"].values())
            verdict = "PASS" if worst <= FINAL_TOLERANCE else "FAIL"
            lines.append(f"Largest final-loss difference: {worst:.2e} ({verdict}: tolerance {FINAL_TOLERANCE:.0%}).")
        else:
            lines.append("No patched run here to compare (the unpatched run alone).")
        notes = [f"- {run['name']}: {note}" for run in record["runs"] for note in run["notes"]]
        if notes:
            lines += ["", "flashpatch said:", *notes]
        lines.append("")
        if several and record is groups[record["seq_len"]][-1]:
            lines += between_processes(groups[record["seq_len"]])
            lines += over_seeds(groups[record["seq_len"]])
    lines += [
        "XLA step memory: XLA's plan for one compiled train step (temporaries + arguments + outputs - donated).",
        "Device peak so far: the allocator's peak since the process started, read after each run (runs share",
        "one process, so it never goes down from one run to the next).",
        "",
    ]
    return "\n".join(lines)


def _finals(group: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per run name, (its final loss, the same record's unpatched final loss) for every record that has it."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    for record in group:
        base = final_loss(record, record["runs"][0])
        for run in record["runs"]:
            pairs.setdefault(run["name"], []).append((final_loss(record, run), base))
    return pairs


def _rerun_finals(rerun: list[dict], name: str) -> list[float]:
    """`name`'s final loss in each record of `rerun` (one T and run seed, several processes) that has it."""
    return [final_loss(record, run) for record in rerun for run in record["runs"] if run["name"] == name]


def rerun_spread(group: list[dict], name: str) -> float | None:
    """The largest (max - min) / min of `name`'s final loss over processes that ran the same T and run seed
    (None where no seed ran twice): how far the same run lands from itself."""
    spreads = [(max(v) - min(v)) / min(v) for r in _reruns(group).values() if len(v := _rerun_finals(r, name)) > 1]
    return max(spreads) if spreads else None


def between_processes(group: list[dict]) -> list[str]:
    """Where a run seed was run in several processes: each run's final losses there, side by side."""
    reruns = _reruns(group)
    if not reruns:
        return []
    lines = [
        f"## T = {group[0]['seq_len']}: the same runs in separate processes",
        "",
        "Same command, code, seed, parameters and batches; only the process (and the machine) differ.",
        "",
        "| run seed | run | final loss, process by process | (max - min) / min |",
        "|---|---|---|---|",
    ]
    for (_, seed), rerun in reruns.items():
        for name in dict.fromkeys(run["name"] for record in rerun for run in record["runs"]):
            values = _rerun_finals(rerun, name)
            if len(values) > 1:
                spread = (max(values) - min(values)) / min(values)
                lines.append(f"| {seed} | {name} | {', '.join(f'{v:.5f}' for v in values)} | {spread:.2%} |")
    return [*lines, ""]


def over_seeds(group: list[dict]) -> list[str]:
    """The runs of one T compared through their final losses' means over every record that has them, each
    against the unpatched run of its own record (the same process, seed and batches)."""
    baseline = group[0]["runs"][0]["name"]
    pairs = _finals(group)
    seeds = ", ".join(str(run_seed(record)) for record in group)
    lines = [
        f"## T = {group[0]['seq_len']}, over run seeds {seeds}",
        "",
        "Each seed trains every run from the same parameters on the same batches; between seeds the parameters, "
        "batches and noise change, the task does not. A run's mean is compared with the mean of the unpatched "
        "runs it was paired with.",
        "",
        "| run | runs | mean final loss | median | spread (max - min) | mean vs unpatched mean "
        "| each vs its unpatched |",
        "|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for name, pair in pairs.items():
        values, bases = np.array([v for v, _ in pair]), np.array([b for _, b in pair])
        spread = f"{values.max() - values.min():.5f} ({(values.max() - values.min()) / values.mean():.2%})"
        stats = f"| {name} | {len(values)} | {values.mean():.5f} | {np.median(values):.5f} | {spread} |"
        if name == baseline:
            lines.append(f"{stats} baseline | |")
            continue
        diff = abs(values.mean() - bases.mean()) / bases.mean()
        worst = max(worst, diff)
        each = ", ".join(f"{(v - b) / b:+.2e}" for v, b in pair)
        lines.append(f"{stats} {diff:.2e} | {each} |")
    verdict = "PASS" if worst <= FINAL_TOLERANCE else "FAIL"
    lines += ["", f"Largest difference of mean final losses: {worst:.2e} ({verdict}: tolerance {FINAL_TOLERANCE:.0%})."]
    floor = rerun_spread(group, baseline)
    if floor is not None:
        lines.append(
            f"The unpatched run alone, same seed in separate processes, ends up to {floor:.2%} apart from itself "
            f"({'above' if floor > FINAL_TOLERANCE else 'within'} the tolerance)."
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=pathlib.Path, help="directories of results_T*.json (train_parity --out)")
    p.add_argument("--out", type=pathlib.Path, help="where summary.md and the PNGs go (default: the first dir)")
    args = p.parse_args(argv)
    for path in render(args.out or args.dirs[0], args.dirs):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
