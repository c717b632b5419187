"""Which backend computes a given problem: the user's choice, or `auto`'s, with the reason why.

`auto` walks a small table of rules per platform; each rule names the measurement behind it. The
first backend of the first matching rule that can run the problem wins; where none can, the
original einsum runs. A backend the user asked for by name that cannot run falls back to the
original einsum with one warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator

from flashpatch import backends
from flashpatch.backends.base import Problem

#: On CPU the einsum beats the blockwise path while the logits are small; past this many (query,
#: key) pairs per head the blockwise path is chosen for its O(T) memory (benchmarks/results/cpu-2026-11-25).
CPU_MIN_PAIRS_FOR_XLA = 1536 * 1536
#: On the GPU, (query, key) pairs over batch and heads (B * N * T * S) below which the einsum is as fast
#: as any flash path (their fixed costs dominate), and from which cudnn_split is the fastest in training.
#: Measured on the H200 with 8/1 heads and head_dim 256 (benchmarks/results/h200-2026-12-01-core-b2, -core-b8,
#: -core-b32; docs/benchmarks.md, "How auto chooses").
GPU_MIN_PAIRS_FOR_FLASH = 2**25
GPU_MIN_PAIRS_FOR_SPLIT = 3 * 2**25


def pairs(p: Problem) -> int:
    return p.batch * p.num_heads * p.q_len * p.kv_len


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    fallback: bool = False  # the asked-for backend could not run this problem


@dataclasses.dataclass(frozen=True)
class Rule:
    platform: str
    applies: Callable[[Problem], bool]
    backends: tuple[str, ...]
    why: str


#: Where each GPU rule's numbers come from: openpi's shapes (bf16, 8 q heads, 1 kv head, head_dim 256).
_H200 = "benchmarks/results/h200-2026-12-01-"
_H100 = "H100, benchmarks/history/selection-h100.md"
RULES: tuple[Rule, ...] = (
    Rule(
        "gpu",
        lambda p: p.q_len == 1,
        ("reference",),
        "one-token decode: openpi's pi0-FAST sample_actions on the H200 takes 295 ms on the einsum "
        f"({_H200}openpi-pi05); every flash path was slower per decoded token ({_H100}: 18-layer decode at cache "
        "1024 / 4096, einsum 5.55 / 5.78 ms per token, cudnn 6.71 / 9.55)",
    ),
    Rule(
        "gpu",
        lambda p: pairs(p) < GPU_MIN_PAIRS_FOR_FLASH,
        ("reference",),
        "fewer than 2**25 (query, key) pairs over batch and heads, where fixed costs dominate: on the H200, "
        "B=2 T=S=1024 einsum 0.167 / 0.536 ms fwd / fwd+bwd, cudnn 0.301 / 0.541, cudnn_split 0.436 / 0.965 "
        f"({_H200}core-b2); openpi's pi0 and pi0.5 sample_actions at batch 1 run 33.8 / 37.5 ms on the einsum "
        f"({_H200}openpi-pi0)",
    ),
    Rule(
        "gpu",
        lambda p: pairs(p) >= GPU_MIN_PAIRS_FOR_SPLIT,
        ("cudnn_split", "cudnn", "kvax", "xla"),
        "at least 3 * 2**25 (query, key) pairs over batch and heads: on the H200, fwd+bwd cudnn_split / cudnn against "
        f"the einsum: B=8 T=S=1280 1.37x / 1.08x ({_H200}core-b8), B=2 T=S=3072 2.09x / 1.29x ({_H200}core-b2), "
        f"B=32 T=S=870 1.72x / 1.26x ({_H200}core-b32); openpi's pi0 training step at batch 4, T=4147: "
        f"1.60x / 1.26x ({_H200}openpi-long)",
    ),
    Rule(
        "gpu",
        lambda p: True,
        ("cudnn", "cudnn_split"),
        "2**25 to 3 * 2**25 (query, key) pairs over batch and heads: on the H200, fwd / fwd+bwd cudnn against the "
        f"einsum: B=2 T=S=1536 1.06x / 1.18x, B=2 T=S=2048 1.21x / 1.23x ({_H200}core-b2), B=8 T=S=1024 "
        f"1.13x / 1.16x, B=8 T=S=768 1.23x / 0.92x ({_H200}core-b8); openpi's pi0 training step at batch 8: cudnn "
        f"1.04x, cudnn_split 1.04x ({_H200}openpi-band). Where neither runs, the einsum: xla ran 0.64-0.93x of it "
        f"here, and kvax's backward at head_dim 256 is slower than the einsum ({_H100})",
    ),
    Rule(
        "cpu",
        lambda p: p.q_len * p.kv_len < CPU_MIN_PAIRS_FOR_XLA,
        ("reference",),
        f"CPU: the einsum is faster while T*S < {CPU_MIN_PAIRS_FOR_XLA} (benchmarks/results/cpu-2026-11-25)",
    ),
    Rule("cpu", lambda p: True, ("xla",), "CPU: blockwise attention keeps memory O(T) at large T*S"),
)


def _auto(problem: Problem) -> Choice:
    skipped = []
    for rule in RULES:
        if rule.platform != problem.platform or not rule.applies(problem):
            continue
        for name in rule.backends:
            reason = backends.get(name).unsupported(problem)
            if reason is None:
                note = f"; passed over: {'; '.join(skipped)}" if skipped else ""
                return Choice(name, f"auto: {rule.why}{note}")
            skipped.append(f"{name} ({reason})")
        break
    tail = f" (passed over: {'; '.join(skipped)})" if skipped else ""
    return Choice("reference", f"auto: no faster path known for {problem.platform}{tail}")


def choose(asked: str, problem: Problem) -> Choice:
    """Resolve `asked` ('auto' or a backend name) for `problem`, falling back where it cannot run."""
    if problem.kv_len == 0:
        choice = Choice("reference", "no keys at all (S = 0): openpi's einsum, which gives zeros, is the answer")
    elif asked == "auto":
        choice = _auto(problem)
    else:
        reason = backends.get(asked).unsupported(problem)
        if reason is None:
            choice = Choice(asked, "asked for")
        else:
            choice = Choice("reference", f"{asked} cannot run this call ({reason}); the original einsum runs", True)
    for seen in getattr(_recorders, "active", ()):
        seen.append(choice)
    return choice


_recorders = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[list[Choice]]:
    """Collect the choices made in this thread inside the block (at trace time: a cached jit makes none).

    The benchmark reports with it which backend really ran a case, and why.
    """
    seen: list[Choice] = []
    active = getattr(_recorders, "active", ())
    _recorders.active = (*active, seen)
    try:
        yield seen
    finally:
        _recorders.active = active
