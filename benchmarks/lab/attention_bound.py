"""Attention's part of openpi's training steps, from in-step measurements only.

The ceiling (flashpatch/bench/ceiling.py) is the same step with the attention core replaced by work that
still reads every key and value. "Step minus ceiling" is then attention's time in the step, and its useful
FLOPs over that time an effective rate: per layer openpi's remat computes the forward twice and the backward
once (2.5x a forward), 18 layers. The masks are the benchmark's own (flashpatch.bench.scenarios.openpi
.fill_batch, seed 0: prompts padded to random lengths, the second camera missing in every third row), rebuilt
here from the same random draws for openpi's shapes (3 cameras x 256 SigLIP tokens, 224 x 224 images).

Step minus ceiling is not a kernel's time. The project's own kernels timed alone, scaled to a step, take longer
than it (--standalone), so a rate measured in a step cannot be set against a kernel's standalone rate, and a
step target cannot be judged out of reach by one: --targets compares each target with what the same process
measured in its step. Every figure below comes from a committed run under ../results/ (named beside it;
tests/test_bench_bound.py checks them against the raw files).

    python benchmarks/lab/attention_bound.py                # the table in ../results/h200-2026-12-01-attention-bound
                                                            # (at a peak rate from outside the project: superseded)
    python benchmarks/lab/attention_bound.py --rates        # attention's effective rate in each measured step
    python benchmarks/lab/attention_bound.py --targets      # what issue 24's step targets need, per process, in-step
    python benchmarks/lab/attention_bound.py --standalone   # kernels timed alone, scaled to a step, against the step
    python benchmarks/lab/attention_bound.py --ceiling-work # how far the ceiling's own work could move the rates
"""

from __future__ import annotations

import functools

import numpy as np

#: An H200's bf16 8192^3 matmul rate on random data: a figure from outside the project, not measured by
#: flashpatch (no run in benchmarks/results/ measures it); every number derived from it inherits that.
PEAK_TFLOPS = 790.0
HEADS, HEAD_DIM, LAYERS = 8, 256, 18
#: (workload, batch, prompt tokens, pi0.5, einsum ms, ceiling ms, target share) from ../results/h200-2026-12-01-openpi-*
RUNS = [
    ("pi0 training step, B=32", 32, 48, False, 984.3, 867.8, 0.85),
    ("pi0.5 training step, B=32", 32, 200, True, 1156.7, 993.2, 0.85),
    ("pi0 training step, B=4, prompt 3328", 4, 3328, False, 855.0, 461.0, 0.95),
]


def _draws(batch: int, tokens: int):
    """The second camera's presence and the prompt lengths, drawn as fill_batch draws them (seed 0)."""
    rng = np.random.default_rng(0)
    for _ in range(3):  # fill_batch draws the three images first
        rng.uniform(-1, 1, (batch, 224, 224, 3))
    camera = np.arange(batch) % 3 != 2
    return camera, rng.integers(max(1, tokens // 4), tokens + 1, batch)


def fast_attended_pairs(batch: int, tokens: int = 250) -> int:
    """pi0-FAST training (fill_batch with train=True): three cameras, then a prompt whose second half is causal."""
    camera, lengths = _draws(batch, tokens)
    total = 0
    for b in range(batch):
        pos = np.arange(tokens)
        prompt = pos < lengths[b]
        valid = np.concatenate([np.ones(256, bool), np.full(256, camera[b]), np.ones(256, bool), prompt])
        ar = np.concatenate([np.zeros(768, bool), prompt & (pos >= lengths[b] // 2)])
        block = np.cumsum(ar)
        total += int(((block[None, :] <= block[:, None]) & valid[None, :] & valid[:, None]).sum())
    return total


def step_flops(pairs: int) -> float:
    """Useful attention FLOPs of one training step: 18 layers, two forwards and a backward (2.5x) each."""
    return LAYERS * 4.5 * 4 * HEAD_DIM * HEADS * pairs


#: Useful pairs per layer and head of each benchmark workload, each counted once however many runs name it.
PI0_B32 = functools.cache(lambda: attended_pairs(32, 48, False))
PI05_B32 = functools.cache(lambda: attended_pairs(32, 200, True))
PI0_LONG = functools.cache(lambda: attended_pairs(4, 3328, False))
PI0_HUGE = functools.cache(lambda: attended_pairs(4, 15616, False))
FAST_B32 = functools.cache(lambda: fast_attended_pairs(32))

#: Which flashpatch code ran in each results directory (its README and results.json; "today's" attention path is that
#: of 6bf77e7, unchanged at 68f9363 but for docstrings and messages).
CODE = {
    "h200-2026-12-03-openpi-pi0-flash": "133d536 tree (flash before 4e2d237)",
    "h200-2026-12-03-openpi-long-flash": "133d536 tree (flash before 4e2d237)",
    "h200-2026-12-03-openpi-fast": "f2b0bf8 tree (flash before 4e2d237)",
    "h200-2026-12-03-openpi-pallas": "6746f38",
    "h200-2026-12-03-openpi-huge-flash": "6746f38 (flash before 4e2d237)",
    "h200-2026-12-03-openpi-pallas-steps": "4e2d237",
    "h200-2026-12-03-openpi-pallas-fast-grad": "4e2d237",
    "h200-2026-12-03-openpi-pallas-huge": "4e2d237",
    "h200-2026-12-03-pm-openpi-auto": "6bf77e7 (today's)",
    "h200-2026-12-03-eve-stack-decision/per-layer": "8f60a10 + stack code standing aside (today's path)",
    "h200-2026-12-03-eve-stack-decision/forced": "628e6d6, one decision per stack (taken out)",
}


def code_of(where: str) -> str:
    """The code a results directory's run measured (the longest CODE key it starts with)."""
    known = [prefix for prefix in CODE if where == prefix or where.startswith(prefix + "/")]
    return CODE[max(known, key=len)] if known else "not recorded here"


#: Measured steps for the rates table: (workload, useful pairs per layer and head, {variant: ms}, ceiling ms, results).
MEASURED = [
    (
        "pi0, B=32",
        PI0_B32,
        {"einsum": 1006.9, "flash": 946.1},
        884.9,
        "h200-2026-12-03-openpi-pi0-flash",
    ),
    (
        "pi0, B=4, T=4147",
        PI0_LONG,
        {"einsum": 857.7, "flash": 523.4},
        464.0,
        "h200-2026-12-03-openpi-long-flash",
    ),
    (
        "pi0-FAST, B=32, T=1018",
        FAST_B32,
        {"einsum": 1289.6, "flash": 1150.7},
        1085.9,
        "h200-2026-12-03-openpi-fast",
    ),
    (
        "pi0-FAST, B=32, T=1018",
        FAST_B32,
        {"einsum": 1255.2, "pallas": 1126.0},
        1062.7,
        "h200-2026-12-03-openpi-pallas",
    ),
    (
        "pi0, B=4, T=16435 (einsum out of memory)",
        PI0_HUGE,
        {"flash": 2173.2},
        1540.5,
        "h200-2026-12-03-openpi-huge-flash",
    ),
    (
        "pi0, B=32",
        PI0_B32,
        {"einsum": 996.7, "pallas": 936.6},
        875.8,
        "h200-2026-12-03-openpi-pallas-steps",
    ),
    (
        "pi0, B=4, T=4147",
        PI0_LONG,
        {"einsum": 854.1, "pallas": 560.2},
        459.9,
        "h200-2026-12-03-openpi-pallas-steps",
    ),
    (
        "pi0-FAST, B=32, T=1018 (gradient check on)",
        FAST_B32,
        {"einsum": 1273.1, "pallas": 1140.9},
        1078.9,
        "h200-2026-12-03-openpi-pallas-fast-grad",
    ),
    (
        "pi0, B=4, T=16435 (einsum out of memory)",
        PI0_HUGE,
        {"pallas": 2877.6},
        1547.5,
        "h200-2026-12-03-openpi-pallas-huge",
    ),
    (
        "pi0, B=32 (repeat)",
        PI0_B32,
        {"einsum": 990.2, "flash": 927.5},
        879.5,
        "h200-2026-12-03-pm-openpi-auto/train_pi0_flash",
    ),
    (
        "pi0.5, B=32, T=1018",
        PI05_B32,
        {"einsum": 1141.1, "flash": 1044.8},
        982.8,
        "h200-2026-12-03-pm-openpi-auto/train_pi05_flash",
    ),
    (
        "pi0, B=4, T=4147 (repeat)",
        PI0_LONG,
        {"einsum": 850.2, "flash": 522.0},
        459.0,
        "h200-2026-12-03-pm-openpi-auto/train_long_flash",
    ),
    (
        "pi0-FAST, B=32, T=1018 (repeat)",
        FAST_B32,
        {"einsum": 1270.4, "flash": 1144.9},
        1078.9,
        "h200-2026-12-03-pm-openpi-auto/train_fast",
    ),
    (
        "pi0, B=32 (evening)",
        PI0_B32,
        {"einsum": 1007.8, "flash": 943.6},
        887.2,
        "h200-2026-12-03-eve-stack-decision/per-layer",
    ),
    (
        "pi0, B=32 (evening, one decision per stack)",
        PI0_B32,
        {"einsum": 1009.6, "flash": 944.7},
        888.4,
        "h200-2026-12-03-eve-stack-decision/forced",
    ),
    (
        "pi0-FAST, B=32, T=1018 (evening)",
        FAST_B32,
        {"einsum": 1289.5, "flash": 1159.6},
        1092.3,
        "h200-2026-12-03-eve-stack-decision/per-layer",
    ),
    (
        "pi0-FAST, B=32, T=1018 (evening, one decision per stack)",
        FAST_B32,
        {"einsum": 1289.2, "flash": 1149.7},
        1086.7,
        "h200-2026-12-03-eve-stack-decision/forced",
    ),
]


def rates() -> None:
    """Attention's effective rate in each measured step: its useful FLOPs over (step - ceiling)."""
    print(
        "| workload | attention TFLOP per step | variant | step ms | step - ceiling | effective TFLOP/s | results | code |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, pairs, steps, ceiling, where in MEASURED:
        flops = step_flops(pairs())
        for variant, ms in steps.items():
            rate = flops / ((ms - ceiling) * 1e-3) / 1e12
            print(
                f"| {name} | {flops / 1e12:.1f} | {variant} | {ms:.1f} | {ms - ceiling:.1f} ms | {rate:.0f} | {where} | "
                f"{code_of(where)} |"
            )


def attended_pairs(batch: int, tokens: int, pi05: bool) -> int:
    """(query, key) pairs one attention layer computes, over the batch, for one head."""
    camera, lengths = _draws(batch, tokens)
    suffix = 50 if pi05 else 51
    total = 0
    for b in range(batch):
        prompt = np.arange(tokens) < lengths[b]
        prefix = np.concatenate([np.ones(256, bool), np.full(256, camera[b]), np.ones(256, bool), prompt])
        valid = np.concatenate([prefix, np.ones(suffix, bool)])
        starts = np.zeros(len(valid), bool)
        starts[len(prefix)] = True  # pi0: the state token's block, then the actions'; pi0.5: the actions' block
        if not pi05:
            starts[len(prefix) + 1] = True
        block = np.cumsum(starts)
        total += int(((block[None, :] <= block[:, None]) & valid[None, :] & valid[:, None]).sum())
    return total


#: Issue 24's step targets: (target, the MEASURED workload it is about, the pairs, "x" factor over the einsum or "ms").
TARGETS = [
    ("pi0, B=32: >= 1.09x the einsum", "pi0, B=32", PI0_B32, "x", 1.09),
    ("pi0, B=4, T=4147: >= 1.70x", "pi0, B=4, T=4147", PI0_LONG, "x", 1.70),
    ("pi0, B=4, T=16435: <= 2100 ms", "pi0, B=4, T=16435", PI0_HUGE, "ms", 2100.0),
    ("pi0-FAST, B=32: >= 1.12x", "pi0-FAST, B=32, T=1018", FAST_B32, "x", 1.12),
]


def flash_processes(workload: str) -> list[tuple[dict[str, float], float, str]]:
    """The measured steps of `workload` (its repeats and variants of it) that ran `flash` (under `auto`), with a
    ceiling, one stack decision per layer: (times, ceiling ms, results), in the order they ran."""
    return [
        (steps, ceiling, where)
        for name, _, steps, ceiling, where in MEASURED
        if name.startswith(workload) and "flash" in steps and "per stack" not in name
    ]


def targets() -> None:
    """Per target and per process that ran `flash`: the attention time the target leaves in that process's step
    (target step minus the same process's ceiling) against the attention time it measured (step minus ceiling)."""
    print(
        "| target | results (code) | einsum | flash step | ceiling | target step | attention now | attention allowed "
        "| cut needed | TFLOP/s now -> needed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, workload, pairs, kind, value in TARGETS:
        flops = step_flops(pairs())
        for steps, ceiling, where in flash_processes(workload):
            einsum = steps.get("einsum")
            if kind == "x" and einsum is None:
                continue
            target = einsum / value if kind == "x" else value
            now, allowed = steps["flash"] - ceiling, target - ceiling
            rate_now, rate_needed = flops / (now * 1e-3) / 1e12, flops / (allowed * 1e-3) / 1e12
            print(
                f"| {name} | {where} ({code_of(where)}) | {'-' if einsum is None else f'{einsum:.1f}'} | "
                f"{steps['flash']:.1f} | {ceiling:.1f} | {target:.1f} | {now:.1f} ms | {allowed:.1f} ms | "
                f"{1 - allowed / now:.0%} | {rate_now:.0f} -> {rate_needed:.0f} |"
            )


#: Attention timed alone (ms forward, ms forward+backward, useful pairs over the batch per head where the run
#: recorded them), pi0's layout at B=32, T=867-870: (variant, run, fwd, fwd+bwd, pairs or None).
STANDALONE = [
    ("einsum", "h200-2026-12-03-flash-probe, one call", 2.657, 4.715, 13_265_166),
    ("einsum", "h200-2026-12-03-pallas-sweep, one call", 1.981, 5.997, None),
    ("einsum", "h200-2026-12-03-pm-core-pallas, bench core", 1.697, 5.676, None),
    ("einsum", "h200-2026-12-03-pm-pallas-mha, one call", 1.860, 5.841, None),
    ("einsum", "h200-2026-12-03-pm-chain-profile, 18-layer scan", 1.958, 7.922, None),
    ("einsum", "h200-2026-12-03-eve-chain-profile, 18-layer scan", 1.954, 7.896, None),
    ("flash", "h200-2026-12-03-flash-probe, one call", 0.859, 3.596, 13_265_166),
    ("flash", "h200-2026-12-03-flash-probe, analysis done once", 0.561, 2.981, 13_265_166),
    ("flash", "h200-2026-12-03-pm-core-pallas, bench core", 0.907, 3.951, None),
    ("flash", "h200-2026-12-03-pm-chain-profile, 18-layer scan", 0.853, 4.444, None),
    ("flash", "h200-2026-12-03-eve-chain-profile, 18-layer scan", 0.857, 4.432, None),
]
#: pi0's training step at B=32 (T=867), per process with a ceiling: (results, {variant: ms}, ceiling ms).
PI0_STEPS = [
    ("h200-2026-12-01-openpi-pi0", {"einsum": 984.3}, 867.8),
    ("h200-2026-12-01-openpi-backends-b32", {"einsum": 993.1}, 875.1),
    *(
        (where, steps, ceiling)
        for name, _, steps, ceiling, where in MEASURED
        if name.startswith("pi0, B=32") and "per stack" not in name
    ),
]


def standalone() -> None:
    """Kernels timed alone at pi0's B=32 layout, scaled to a training step (18 layers, two forwards and a backward
    each), against attention's time in pi0's step at B=32 (step minus ceiling), per variant."""
    print("| variant | timed alone (run) | ms fwd / fwd+bwd | scaled to a step | step-mix TFLOP/s alone |")
    print("|---|---|---|---|---|")
    for variant, where, fwd, fwd_bwd, pairs in STANDALONE:
        scaled = LAYERS * (fwd + fwd_bwd)
        rate = "-" if pairs is None else f"{4.5 * 4 * HEAD_DIM * HEADS * pairs / ((fwd + fwd_bwd) * 1e-3) / 1e12:.0f}"
        print(f"| {variant} | {where} | {fwd:.3f} / {fwd_bwd:.3f} | {scaled:.1f} ms | {rate} |")
    print()
    probe = next(pairs for _, where, _, _, pairs in STANDALONE if pairs is not None)
    print(f"Attended pairs per layer and head: pi0's step at B=32 {PI0_B32():,}; the flash probe's mask {probe:,}.")
    print()
    print("| variant | in pi0's step at B=32 (results) | step - ceiling | effective TFLOP/s in the step |")
    print("|---|---|---|---|")
    flops = step_flops(PI0_B32())
    for variant in ("einsum", "flash"):
        for where, steps, ceiling in PI0_STEPS:
            if variant in steps:
                now = steps[variant] - ceiling
                print(f"| {variant} | {where} | {now:.1f} ms | {flops / (now * 1e-3) / 1e12:.0f} |")


#: The core's empty-row fill alone in the 18-layer scan (h200-2026-12-03-eve-chain-profile, ms per layer, fwd and
#: fwd+bwd): own work with the fill minus own work without it, per chain backend. The nearest measured piece of
#: the ceiling's own work (the ceiling runs the same fill, a like-sized mean over keys, and an any() over the mask).
FILL = {
    "pallas": ((0.6042, 3.0015), (0.5721, 2.8965)),
    "flash": ((0.7616, 3.6212), (0.7009, 3.4459)),
}


def ceiling_work() -> None:
    """How far a cheaper ceiling would move attention's effective rate: if the ceiling's own work cost what the
    fill alone costs in the scan, per step (18 layers, two forwards and a backward), the attention-free step would
    be that much faster and attention's time in the step that much longer."""
    costs = {
        name: LAYERS * ((with_fill[0] - without[0]) + (with_fill[1] - without[1]))
        for name, (with_fill, without) in FILL.items()
    }
    low, high = min(costs.values()), max(costs.values())
    print(f"fill alone, per step: {', '.join(f'{k} {v:.1f} ms' for k, v in costs.items())}")
    print()
    print("| workload | results (code) | step - ceiling | TFLOP/s | ceiling lower by the fill | TFLOP/s then |")
    print("|---|---|---|---|---|---|")
    for name, pairs, steps, ceiling, where in MEASURED:
        if "flash" not in steps or "per stack" in name:
            continue
        flops = step_flops(pairs())
        now = steps["flash"] - ceiling
        then = [flops / ((now + cost) * 1e-3) / 1e12 for cost in (low, high)]
        print(
            f"| {name} | {where} ({code_of(where)}) | {now:.1f} ms | {flops / (now * 1e-3) / 1e12:.0f} | "
            f"{low:.1f}-{high:.1f} ms | {then[1]:.0f}-{then[0]:.0f} |"
        )


def main() -> None:
    print(
        f"| workload | attention TFLOP per step | at {PEAK_TFLOPS:.0f} TFLOP/s | einsum - ceiling | best share | "
        "target | rate the target needs |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, batch, tokens, pi05, einsum, ceiling, target in RUNS:
        flops = LAYERS * 4.5 * 4 * HEAD_DIM * HEADS * attended_pairs(batch, tokens, pi05)
        at_peak = flops / (PEAK_TFLOPS * 1e12) * 1e3
        gap = einsum - ceiling
        needed = flops / ((1 - target) * gap * 1e-3) / 1e12
        print(
            f"| {name} | {flops / 1e12:.1f} | {at_peak:.1f} ms | {gap:.1f} ms | {(gap - at_peak) / gap:.1%} | "
            f"{target:.0%} | {needed:.0f} TFLOP/s ({needed / PEAK_TFLOPS:.0%} of peak) |"
        )


if __name__ == "__main__":
    import sys

    if "--rates" in sys.argv:
        rates()
    elif "--targets" in sys.argv:
        targets()
    elif "--standalone" in sys.argv:
        standalone()
    elif "--ceiling-work" in sys.argv:
        ceiling_work()
    else:
        main()
