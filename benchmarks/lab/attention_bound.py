"""How much of the einsum-to-ceiling gap any attention kernel could take, at an assumed H200 peak matmul rate.

The ceiling (flashpatch/bench/ceiling.py) removes every attention FLOP. So a patched step can approach it
only as fast as attention's useful FLOPs run: per layer openpi's remat computes the forward twice and the
backward once (2.5x a forward), 18 layers. The masks are the benchmark's own (flashpatch.bench.scenarios.openpi
.fill_batch, seed 0: prompts padded to random lengths, the second camera missing in every third row), rebuilt
here from the same random draws for openpi's shapes (3 cameras x 256 SigLIP tokens, 224 x 224 images).

    python benchmarks/lab/attention_bound.py          # prints the table in ../results/h200-2026-12-01-attention-bound
    python benchmarks/lab/attention_bound.py --rates  # attention's effective rate in the measured flash steps
    python benchmarks/lab/attention_bound.py --targets  # the rate issue 24's step targets need, beside FA3's
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
    print("| workload | attention TFLOP per step | variant | step ms | step - ceiling | effective TFLOP/s | results |")
    print("|---|---|---|---|---|---|---|")
    for name, pairs, steps, ceiling, where in MEASURED:
        flops = step_flops(pairs())
        for variant, ms in steps.items():
            rate = flops / ((ms - ceiling) * 1e-3) / 1e12
            print(
                f"| {name} | {flops / 1e12:.1f} | {variant} | {ms:.1f} | {ms - ceiling:.1f} ms | {rate:.0f} | {where} |"
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


#: FlashAttention-3's fastest measurements at our sizes (8 / 1 heads, head_dim 256, bf16, H200), as
#: (where, useful pairs per head, fwd ms, fwd+bwd ms): the kernel on plain masks, no flashpatch around it.
FA3_MEASURED = [
    ("32 x 896, no mask (issue 24's table)", 32 * 896 * 896, 0.458, 2.300),
    ("32 x 867, no mask (h200-2026-12-03-flash-probe, fa3_dense)", 32 * 867 * 867, 0.483, 2.192),
    ("2 x 4096, causal (issue 24's table)", 2 * 4096 * 4097 // 2, 0.312, 1.353),
    ("2 x 4096, no mask (issue 24's table)", 2 * 4096 * 4096, 0.467, 2.450),
]
#: Issue 24's step targets: (workload, pairs, einsum ms, ceiling ms, target, results the two times come from).
TARGETS = [
    ("pi0, B=32: >= 1.09x", PI0_B32, 996.7, 875.8, "x1.09", "openpi-pallas-steps"),
    (
        "pi0, B=4, T=4147: >= 1.70x",
        PI0_LONG,
        854.1,
        459.9,
        "x1.70",
        "openpi-pallas-steps",
    ),
    (
        "pi0, B=4, T=16435: <= 2100 ms",
        PI0_HUGE,
        None,
        1540.5,
        "2100",
        "openpi-huge-flash",
    ),
    ("pi0-FAST, B=32: >= 1.12x", FAST_B32, 1270.4, 1078.9, "x1.12", "pm-openpi-auto"),
]


def step_rate(pairs: int, fwd_ms: float, fwd_bwd_ms: float) -> float:
    """TFLOP/s of a training step's attention mix at these kernel times: one more forward (openpi's remat)."""
    forward = 4 * HEAD_DIM * HEADS * pairs
    return 4.5 * forward / ((fwd_ms + fwd_bwd_ms) * 1e-3) / 1e12


def targets() -> None:
    """The attention rate each step target needs, beside FA3's fastest measured rate for the same mix."""
    print("| FA3 measured at | step-mix TFLOP/s (2 fwd + bwd) |")
    print("|---|---|")
    for where, pairs, fwd, fwd_bwd in FA3_MEASURED:
        print(f"| {where} | {step_rate(pairs, fwd, fwd_bwd):.0f} |")
    print()
    print("| target | attention TFLOP per step | step allowed | minus ceiling | rate needed | results |")
    print("|---|---|---|---|---|---|")
    for name, pairs, einsum, ceiling, target, where in TARGETS:
        flops = step_flops(pairs())
        allowed = einsum / float(target[1:]) if target.startswith("x") else float(target)
        rate = flops / ((allowed - ceiling) * 1e-3) / 1e12
        print(
            f"| {name} | {flops / 1e12:.1f} | {allowed:.1f} ms | {allowed - ceiling:.1f} ms | {rate:.0f} TFLOP/s | "
            f"h200-2026-12-03-{where} |"
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
    else:
        main()
