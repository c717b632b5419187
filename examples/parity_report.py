"""Turn the results_T<T>.json files of train_parity.py into one PNG of overlaid curves and a markdown summary.

train_parity.py calls `render` at its end; to redo it elsewhere (say, where matplotlib is installed):
    python examples/parity_report.py OUT_DIR
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

#: The agreement the parity check asks for: final losses within 2% of the unpatched run.
FINAL_TOLERANCE = 0.02
_MIB = 2**20


def load(out: pathlib.Path) -> list[dict]:
    """Every results file in `out`, shortest T first, then by run seed."""
    records = [json.loads(p.read_text()) for p in out.glob("results_T*.json")]
    if not records:
        raise FileNotFoundError(f"no results_T*.json in {out}")
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


def render(out: pathlib.Path) -> list[pathlib.Path]:
    """Write summary.md and, where matplotlib is installed, training-parity.png; return what was written."""
    records = load(out)
    written = [out / "summary.md"]
    written[0].write_text(summary(records))
    try:
        plot(records, out / "training-parity.png")
    except ImportError as err:
        print(f"no PNG ({err}); the JSON is kept: run `python examples/parity_report.py {out}` where matplotlib is")
    else:
        written.append(out / "training-parity.png")
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
        steps = np.arange(len(baseline))
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
                gap = np.abs(smooth - _smooth(baseline, window)) / np.abs(_smooth(baseline, window))
                label = run["name"] + (" (identical: no gap to draw)" if not gap.any() else "")
                shown = np.where(gap > 0, gap, np.nan)  # a log axis has no zero; exact steps leave holes
                bottom.plot(steps[window - 1 :], shown, color=f"C{i}", lw=1, label=label)
        env = record["environment"]
        top.set_title(f"T = {record['seq_len']}, seed {run_seed(record)}  ({env['device']}, {record['args']['dtype']})")
        top.set_yscale("log")
        top.set_ylabel("flow-matching loss (dots: held-out)")
        top.legend(fontsize=8)
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
        bottom.set_ylabel(f"|gap| / unpatched ({window}-step means)")
        if len(runs) > 1:
            bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(records: list[dict]) -> str:
    lines = ["# Training parity results", ""]
    groups = _by_length(records)
    for record in records:
        args, env = record["args"], record["environment"]
        final_k = record["final_steps"]
        several = len(groups[record["seq_len"]]) > 1
        lines += [
            f"## T = {record['seq_len']}" + (f", run seed {run_seed(record)}" if several else ""),
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
        worst = max((g["final_rel_diff"] for g in record["gaps"].values()), default=0.0)
        verdict = "PASS" if worst <= FINAL_TOLERANCE else "FAIL"
        lines.append(f"Largest final-loss difference: {worst:.2e} ({verdict}: tolerance {FINAL_TOLERANCE:.0%}).")
        notes = [f"- {run['name']}: {note}" for run in record["runs"] for note in run["notes"]]
        if notes:
            lines += ["", "flashpatch said:", *notes]
        lines.append("")
        if several and record is groups[record["seq_len"]][-1]:
            lines += over_seeds(groups[record["seq_len"]])
    lines += [
        "XLA step memory: XLA's plan for one compiled train step (temporaries + arguments + outputs - donated).",
        "Device peak so far: the allocator's peak since the process started, read after each run (runs share",
        "one process, so it never goes down from one run to the next).",
        "",
    ]
    return "\n".join(lines)


def over_seeds(group: list[dict]) -> list[str]:
    """The runs of one T compared through their final losses' means over run seeds (each seed a paired set)."""
    baseline = group[0]["runs"][0]["name"]
    by_name = [{run["name"]: run for run in record["runs"]} for record in group]
    names = [run["name"] for run in group[0]["runs"] if all(run["name"] in runs for runs in by_name)]
    finals = {
        name: np.array([final_loss(record, runs[name]) for record, runs in zip(group, by_name, strict=True)])
        for name in names
    }
    base_mean = finals[baseline].mean()
    seeds = ", ".join(str(run_seed(record)) for record in group)
    lines = [
        f"## T = {group[0]['seq_len']}, over run seeds {seeds}",
        "",
        "Each seed trains every run from the same parameters on the same batches; between seeds the parameters, "
        "batches and noise change, the task does not.",
        "",
        "| run | mean final loss | spread over seeds (max - min) | mean vs unpatched mean "
        "| per seed, vs that seed's unpatched |",
        "|---|---|---|---|---|",
    ]
    worst = 0.0
    for name in names:
        values = finals[name]
        spread = f"{values.max() - values.min():.5f} ({(values.max() - values.min()) / values.mean():.2%})"
        if name == baseline:
            lines.append(f"| {name} | {values.mean():.5f} | {spread} | baseline | |")
            continue
        diff = abs(values.mean() - base_mean) / base_mean
        worst = max(worst, diff)
        per_seed = ", ".join(f"{(v - b) / b:+.2e}" for v, b in zip(values, finals[baseline], strict=True))
        lines.append(f"| {name} | {values.mean():.5f} | {spread} | {diff:.2e} | {per_seed} |")
    verdict = "PASS" if worst <= FINAL_TOLERANCE else "FAIL"
    lines += [
        "",
        f"Largest difference of mean final losses: {worst:.2e} ({verdict}: tolerance {FINAL_TOLERANCE:.0%}).",
        "",
    ]
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR (the --out of train_parity.py)")
    for path in render(pathlib.Path(sys.argv[1])):
        print(f"wrote {path}")
