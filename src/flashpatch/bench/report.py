"""Turn records into what people read: a markdown report, a short console summary, the fit table.

In the markdown, "peak memory" is the compiled peak and "mean memory" the sampled mean bytes in use
(see records.CONVENTIONS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flashpatch.bench.harness import EINSUM, format_metric, size_label
from flashpatch.bench.memory import format_bytes
from flashpatch.bench.records import Record

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


def case_title(scenario: str, case: str, options: dict[str, Any]) -> str:
    o = options
    stack = f"{o['prefix_expert']} + {o['action_expert']}, depth {o['depth']}"
    core = f"{o['num_heads']} q heads, {o['num_kv_heads']} kv head, head_dim {o['head_dim']}, bf16"
    core += f", batch {o['core_batch']}"
    titles = {
        ("core", "fwd"): f"Attention core, forward ({core})",
        ("core", "fwd_bwd"): f"Attention core, forward + backward ({core})",
        ("gemma", "train"): f"pi0 Gemma ({stack}): training step (loss + grads + AdamW), batch {o['train_batch']}",
        ("gemma", "infer"): f"pi0 Gemma ({stack}): inference, prefill + {o['denoise_steps']} denoising steps "
        f"of {o['action_horizon'] + 1} suffix tokens, batch {o['infer_batch']}",
        ("gemma_fast", "prefill"): f"pi0-FAST Gemma ({o['prefix_expert']}, depth {o['depth']}): prefill, "
        f"batch {o['decode_batch']}",
        ("gemma_fast", "decode"): f"pi0-FAST Gemma ({o['prefix_expert']}, depth {o['depth']}): decode "
        f"{o['decode_steps']} tokens with the KV cache, batch {o['decode_batch']} (ms = per token)",
    }
    if scenario == "openpi":
        return f"openpi: {_OPENPI_TITLES.get(case, case)}"
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
    return text + (f" ({rec.speedup:.2f}x)" if rec.speedup is not None else "")


def summary(records: Sequence[Record], fit_rows: Sequence[dict[str, Any]]) -> str:
    """A compact table for the end of the console output: median ms (speedup over einsum) per size."""
    lines = ["", "== summary: median ms (speedup over einsum) =="]
    for (scenario, case), recs in groups(records).items():
        sizes = sorted({r.size for r in recs})
        by_key = {(r.variant, r.size): r for r in recs}
        label = f"{scenario}/{case}"
        lines.append(f"{label:<20}" + "".join(f"{size_label(scenario) + '=' + str(s):>18}" for s in sizes))
        for variant in dict.fromkeys(r.variant for r in recs):
            lines.append(f"  {variant:<18}" + "".join(f"{_cell(by_key.get((variant, s))):>18}" for s in sizes))
    if fit_rows:
        lines.append("largest training size that fits: " + "; ".join(f"{f['variant']} {fit_text(f)}" for f in fit_rows))
    late = [r for r in records if r.status == "skipped" and (r.reason or "").startswith("time budget")]
    if late:
        names = ",".join(dict.fromkeys(r.scenario for r in late))
        lines.append(
            f"{len(late)} cases skipped for time (in {names}); to cover them, run fewer scenarios per command, "
            f"e.g. --scenarios {names.split(',')[0]} --budget-s 420"
        )
    return "\n".join(lines)


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
    lines = [
        f"# flashpatch benchmark: {device['kind']} ({device['platform']})",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- flashpatch commit: {meta['git_commit'] or 'not recorded (installed from a folder outside git)'}",
    ]
    if device.get("memory_limit_bytes"):
        lines.append(f"- device memory available to JAX: {format_bytes(device['memory_limit_bytes'])}")
    lines += [f"- note: {note}" for note in meta.get("notes", [])]
    headline = openpi_table(records)
    if headline:
        lines += ["", "## openpi's models: median ms (x einsum)", "", *headline]
    lines += ["", "Conventions:", ""]
    lines += [f"- **{name}**: {text}" for name, text in meta["conventions"].items()]
    for (scenario, case), recs in groups(records).items():
        lines += ["", f"## {case_title(scenario, case, meta['options'])}", ""]
        metric_names = list(dict.fromkeys(n for r in recs for n in r.metrics if n != "compile_s"))
        head = [size_label(scenario), "variant", "median ms", "speedup"]
        head += [_METRIC_TITLES.get(n, n) for n in metric_names]
        head += ["peak memory", "mean memory", "compile s", "status"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for rec in sorted(recs, key=lambda r: r.size):
            row = [str(rec.size), rec.variant]
            row.append(f"{rec.ms:.3f}" if rec.ms is not None else "-")
            row.append(
                f"{rec.speedup:.2f}x"
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
