"""Turn records into what people read: a markdown report, a short console summary, the fit table.

In the markdown, "peak memory" is the compiled peak and "mean memory" the sampled mean bytes in use
(see records.CONVENTIONS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flashpatch.bench import spread
from flashpatch.bench.harness import EINSUM, format_metric, size_label
from flashpatch.bench.memory import format_bytes
from flashpatch.bench.records import Record, models_label

#: The gemma and gemma_fast scenarios run flashpatch's openpi-compatible Gemma (flashpatch.testing), never openpi's.
STAND_IN = "flashpatch's stand-in"
_STATUS_CELL = {"oom": "OOM", "skipped": "skip", "unsupported": "unsup.", "error": "ERROR"}
_METRIC_TITLES = {
    "tflops": "TFLOP/s",
    "rel_err": "rel. err",
    "steps_per_s": "steps/s",
    "tokens_per_s": "tokens/s",
    "prefill_ms": "prefill ms",
    "denoise_ms": "denoise ms",
    "decode_ms": "ms per decode run",
    "rel_diff_vs_einsum": "rel. diff vs einsum",
    "loss_rel_diff_vs_einsum": "loss rel. diff vs einsum",
    "seq_len": "T",
    "gflop_per_step": "GFLOP (XLA)",
    "gflop_vs_leanest": "FLOPs vs leanest other",
    "loss_step0": "loss (step 0)",
    "grad_rel_err_vs_f32": "grad rel. err vs float32",
    "loss_rel_err_vs_f32": "loss rel. err vs float32",
    "ceiling_share": "share of ceiling gain",
    "tokens_same_as_einsum": "tokens = einsum's",
}
_OPENPI_TITLES = {
    "pi0_train": "pi0 training step",
    "pi05_train": "pi0.5 training step",
    "pi0_long_train": "pi0 training step, long prompt",
    "pi0_sample": "pi0 sample_actions (10 denoising steps)",
    "pi05_sample": "pi0.5 sample_actions (10 denoising steps)",
    "pi0_fast_sample": "pi0-FAST sample_actions (prefill + greedy decode with the KV cache)",
    "fit": "pi0 training: largest prompt that trains",
}


def case_title(scenario: str, case: str, options: dict[str, Any], models: str = "openpi") -> str:
    """The heading of a case's table; `models` names the openpi scenario's models (records.models_label)."""
    o = options
    stack = f"{o['prefix_expert']} + {o['action_expert']}, depth {o['depth']}"
    core = f"{o['num_heads']} q heads, {o['num_kv_heads']} kv head, head_dim {o['head_dim']}, bf16"
    core += f", batch {o['core_batch']}"
    titles = {
        ("core", "fwd"): f"Attention core, forward ({core})",
        ("core", "fwd_bwd"): f"Attention core, forward + backward ({core})",
        ("gemma", "train"): f"{STAND_IN} pi0 Gemma ({stack}): training step (loss + grads + AdamW), "
        f"batch {o['train_batch']}",
        ("gemma", "infer"): f"{STAND_IN} pi0 Gemma ({stack}): inference, prefill + {o['denoise_steps']} denoising "
        f"steps of {o['action_horizon'] + 1} suffix tokens, batch {o['infer_batch']}",
        ("gemma_fast", "prefill"): f"{STAND_IN} pi0-FAST Gemma ({o['prefix_expert']}, depth {o['depth']}): prefill, "
        f"batch {o['decode_batch']}",
        ("gemma_fast", "decode"): f"{STAND_IN} pi0-FAST Gemma ({o['prefix_expert']}, depth {o['depth']}): decode "
        f"{o['decode_steps']} tokens with the KV cache, batch {o['decode_batch']} (ms = per token)",
    }
    if scenario == "openpi":
        return f"{models}: {_OPENPI_TITLES.get(case, case)}"
    return titles.get((scenario, case), f"{scenario} / {case}")


def groups(records: Sequence[Record]) -> dict[tuple[str, str], list[Record]]:
    out: dict[tuple[str, str], list[Record]] = {}
    for rec in records:
        out.setdefault(rec.group, []).append(rec)
    return out


def fits(records: Sequence[Record]) -> list[dict[str, Any]]:
    """Per training ladder and variant: the largest size that ran, and what happened at the next one tried."""
    train = [r for r in records if r.group in (("gemma", "train"), ("openpi", "fit"))]
    out = []
    for scenario, variant in dict.fromkeys((r.scenario, r.variant) for r in train):
        rows = sorted((r for r in train if (r.scenario, r.variant) == (scenario, variant)), key=lambda r: r.size)
        largest = max((r for r in rows if r.status == "ok"), key=lambda r: r.size, default=None)
        beyond = next((r for r in rows if r.status != "ok" and (largest is None or r.size > largest.size)), None)
        out.append(
            {
                "scenario": scenario,
                "variant": variant,
                "batch": rows[0].batch,
                "largest_ok": largest.size if largest else None,
                "largest_seq_len": largest.metrics.get("seq_len") if largest else None,
                "next_size": beyond.size if beyond else None,
                "next_status": beyond.status if beyond else None,
                "next_reason": beyond.reason if beyond else None,
            }
        )
    return out


def fit_text(fit: dict[str, Any]) -> str:
    largest = fit["largest_ok"]
    if largest is None and fit["next_status"] in ("skipped", "unsupported"):
        return f"not measured ({fit['next_status']}: {fit['next_reason']})"
    label = size_label(fit["scenario"])
    if largest is None:
        text = "none"
    elif label != "T" and fit.get("largest_seq_len"):
        text = f"{label} {largest} (T={int(fit['largest_seq_len'])})"
    else:
        text = f"{label} {largest}"
    if fit["next_status"] == "oom":
        text += f", out of memory at {label} {fit['next_size']}"
    elif fit["next_status"] == "skipped":
        text += f" (not run from {label} {fit['next_size']} up: {fit['next_reason'].split(':')[0]}; a lower bound)"
    elif fit["next_status"] is not None:
        text += f" ({fit['next_status']} at {label} {fit['next_size']}; a lower bound)"
    else:
        text += " (the largest size tried; a lower bound)"
    return text


def _cell(rec: Record | None) -> str:
    if rec is None:
        return "-"
    if rec.status != "ok":
        return _STATUS_CELL.get(rec.status, rec.status)
    text = f"{rec.ms:.3f}" if rec.ms is not None else "-"
    return text + (f", {spread.ratio_text(rec.speedup, rec.speedup_range)}" if rec.speedup is not None else "")


def summary(records: Sequence[Record], fit_rows: Sequence[dict[str, Any]], scenarios: Sequence[str] = ()) -> str:
    """A compact table for the end of the console output: median ms, speedup over einsum and its spread, per size;
    then what did not run and why. `scenarios`: those the command asked for (for the advice on skipped cases)."""
    lines = [
        "",
        "== summary: median ms, speedup over einsum (its p10-p90 spread; 'within noise' where it spans 1.0) ==",
    ]
    for (scenario, case), recs in groups(records).items():
        sizes = sorted({r.size for r in recs})
        by_key = {(r.variant, r.size): r for r in recs}
        width = 2 + max(len(_cell(r)) for r in recs)
        label = f"{scenario}/{case}"
        lines.append(f"{label:<20}" + "".join(f"{size_label(scenario) + '=' + str(s):>{width}}" for s in sizes))
        for variant in dict.fromkeys(r.variant for r in recs):
            lines.append(f"  {variant:<18}" + "".join(f"{_cell(by_key.get((variant, s))):>{width}}" for s in sizes))
    if fit_rows:
        lines.append("largest training size that fits: " + "; ".join(f"{f['variant']} {fit_text(f)}" for f in fit_rows))
    dropped = not_run(records)
    if dropped:
        lines.append("not run: " + "; ".join(dropped))
    late = [r for r in records if r.status == "skipped" and (r.reason or "").startswith("time budget")]
    if late:
        names = list(dict.fromkeys(r.scenario for r in late))
        asked = list(scenarios) or names
        if len(asked) > 1:
            advice = f"run fewer scenarios per command, e.g. --scenarios {names[0]} --budget-s 420"
        else:
            advice = "give the run more time (--budget-s) or ask for fewer cases or backends"
        lines.append(f"{len(late)} cases skipped for time (in {','.join(names)}); to cover them, {advice}")
    return "\n".join(lines)


def not_run(records: Sequence[Record]) -> list[str]:
    """Each variant's cases that did not run (skipped, unsupported, error; out of memory is a result), with why:
    "cudnn: every case (unsupported: cudnn cannot run here ...)", "pallas: core/fwd T=64 (skipped: time budget ...)"."""
    said: dict[tuple[str, str, str], list[str]] = {}  # (where, status, reason) -> variants: a reason said once
    for variant in dict.fromkeys(r.variant for r in records):
        mine = [r for r in records if r.variant == variant]
        missing = [r for r in mine if r.status in ("skipped", "unsupported", "error")]
        by_reason: dict[tuple[str, str], list[Record]] = {}
        for rec in missing:
            by_reason.setdefault((rec.status, rec.reason or ""), []).append(rec)
        for (status, reason), recs in by_reason.items():
            if len(recs) == len(mine):
                where = "every case"
            else:
                where = ", ".join(f"{r.scenario}/{r.case} {size_label(r.scenario)}={r.size}" for r in recs)
            said.setdefault((where, status, reason), []).append(variant)
    out = [f"{', '.join(variants)}: {where} ({status}: {reason})" for (where, status, reason), variants in said.items()]
    return out


def openpi_table(records: Sequence[Record]) -> list[str]:
    """The headline: per openpi workload, median ms of each variant, x einsum, and the ceiling share."""
    rows = [r for r in records if r.scenario == "openpi" and r.case != "fit"]
    if not rows:
        return []
    variants = list(dict.fromkeys(r.variant for r in rows))
    lines = [
        "| workload | batch | T | " + " | ".join(variants) + " |",
        "|---|---|---|" + "---|" * len(variants),
    ]
    for case in dict.fromkeys(r.case for r in rows):
        mine = {r.variant: r for r in rows if r.case == case}
        seq = next((r.metrics.get("seq_len") for r in mine.values() if "seq_len" in r.metrics), None)
        cells = []
        for variant in variants:
            rec = mine.get(variant)
            cell = _cell(rec)
            if rec is not None and rec.status == "ok" and "ceiling_share" in rec.metrics and variant != "ceiling":
                cell += f", {rec.metrics['ceiling_share']:.0%} of the ceiling's gain"
            cells.append(cell)
        batch = next(iter(mine.values())).batch
        head = f"| {_OPENPI_TITLES.get(case, case)} | {batch} | {'-' if seq is None else int(seq)} | "
        lines.append(head + " | ".join(cells) + " |")
    return lines


def markdown(
    meta: dict[str, Any], records: Sequence[Record], fit_rows: Sequence[dict[str, Any]], images: Sequence[str]
) -> str:
    device = meta["device"]
    models = models_label(meta)
    lines = [
        f"# flashpatch benchmark: {device['kind']} ({device['platform']})",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- flashpatch commit: {meta.get('git_commit') or 'not recorded (installed from a folder outside git)'}",
    ]
    if device.get("memory_limit_bytes"):
        lines.append(f"- device memory available to JAX: {format_bytes(device['memory_limit_bytes'])}")
    lines += [f"- note: {note}" for note in meta.get("notes", [])]
    lines.append(
        "- spread: each time is the median of its repeats, given with their p10-p90 (with fewer than 6 repeats, "
        "the fastest and the slowest); a speedup's range is the einsum's p10 over the variant's p90 to the einsum's "
        f"p90 over the variant's p10, marked {spread.WITHIN_NOISE} where it reaches across 1.0"
    )
    headline = openpi_table(records)
    if headline:
        lines += ["", f"## {models}: median ms, x einsum (p10-p90 of repeats, both sides)", "", *headline]
    lines += ["", "Conventions:", ""]
    lines += [f"- **{name}**: {text}" for name, text in meta["conventions"].items()]
    for (scenario, case), recs in groups(records).items():
        lines += ["", f"## {case_title(scenario, case, meta['options'], models)}", ""]
        metric_names = list(dict.fromkeys(n for r in recs for n in r.metrics if n != "compile_s"))
        head = [size_label(scenario), "variant", "median ms", "p10-p90 ms", "repeats", "speedup (p10-p90)"]
        head += [_METRIC_TITLES.get(n, n) for n in metric_names]
        head += ["peak memory", "mean memory", "compile s", "status"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for rec in sorted(recs, key=lambda r: r.size):
            row = [str(rec.size), rec.variant]
            row.append(f"{rec.ms:.3f}" if rec.ms is not None else "-")
            bounds = spread.ms_range(rec)
            row.append(f"{bounds[0]:.3f}-{bounds[1]:.3f}" if bounds is not None else "-")
            row.append(str(spread.repeats(rec) or "-") if rec.status == "ok" else "-")
            row.append(
                spread.ratio_text(rec.speedup, rec.speedup_range)
                if rec.speedup is not None
                else ("1.00x" if rec.variant == EINSUM and rec.status == "ok" else "-")
            )
            row += [format_metric(n, rec.metrics[n]) if n in rec.metrics else "-" for n in metric_names]
            row += [format_bytes(rec.memory.get("peak")), format_bytes(rec.memory.get("sampled_mean"))]
            row.append(f"{rec.metrics['compile_s']:.1f}" if "compile_s" in rec.metrics else "-")
            status = rec.status if rec.status == "ok" else f"{rec.status}: {rec.reason}"
            if rec.notes:
                status += " (" + "; ".join(rec.notes) + ")"
            row.append(status.replace("|", "/"))
            lines.append("| " + " | ".join(row) + " |")
    if fit_rows:
        lines += [
            "",
            "## Largest size that trains (fixture Gemma: T at train_batch; openpi: prompt at openpi_long_batch)",
            "",
            "| ladder | variant | batch | largest that ran |",
            "|---|---|---|---|",
        ]
        lines += [f"| {f['scenario']} | {f['variant']} | {f['batch']} | {fit_text(f)} |" for f in fit_rows]
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"
