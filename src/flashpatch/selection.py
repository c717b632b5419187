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
#: as any flash path (their fixed costs dominate), and from which cudnn_split is the fastest. Measured
#: with 8/1 heads and head_dim 256 (docs/benchmarks.md, "How auto chooses").
GPU_MIN_PAIRS_FOR_FLASH = 2**25
GPU_MIN_PAIRS_FOR_SPLIT = 2**27


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
_H200_OPENPI = "benchmarks/results/h200-2026-12-01-openpi-*"
_H200_CORE = "benchmarks/results/h200-2026-12-01-core-b32"
_H100 = "H100, docs/benchmarks.md 'H100 measurements'"
RULES: tuple[Rule, ...] = (
    Rule(
        "gpu",
        lambda p: p.q_len == 1,
        ("reference",),
        "one-token decode: openpi's pi0-FAST sample_actions on the H200 takes 295 ms on the einsum "
        f"({_H200_OPENPI.replace('*', 'pi05')}); every flash path was slower per decoded token ({_H100}: 18-layer "
        "decode at cache 1024 / 4096, einsum 5.55 / 5.78 ms per token, cudnn 6.71 / 9.55)",
    ),
    Rule(
        "gpu",
        lambda p: pairs(p) < GPU_MIN_PAIRS_FOR_FLASH,
        ("reference",),
        "fewer than 2**25 (query, key) pairs over batch and heads, where fixed costs dominate: openpi's pi0 and pi0.5 "
        f"sample_actions at batch 1 run 33.8 / 37.5 ms on the einsum on the H200 ({_H200_OPENPI.replace('*', 'pi0')}); "
        f"{_H100}: B=2 T=S=1024 einsum 0.186 / 0.628 ms fwd / fwd+bwd, cudnn 0.192 / 0.634",
    ),
    Rule(
        "gpu",
        lambda p: pairs(p) >= GPU_MIN_PAIRS_FOR_SPLIT,
        ("cudnn_split", "cudnn", "kvax", "xla"),
        "at least 2**27 (query, key) pairs over batch and heads: on the H200, B=32 T=S=870 fwd+bwd cudnn_split 1.72x "
        f"the einsum, cudnn 1.26x ({_H200_CORE}); openpi's pi0 training step at batch 4, T=4147: cudnn_split 1.60x, "
        f"cudnn 1.26x ({_H200_OPENPI.replace('*', 'long')})",
    ),
    Rule(
        "gpu",
        lambda p: True,
        ("cudnn", "cudnn_split", "kvax", "xla"),
        f"2**25 to 2**27 (query, key) pairs over batch and heads: {_H100}: 18-layer pi0 training step B=4 T=1024 "
        "cudnn 1.10x the einsum, cudnn_split 1.09x; B=8 T=S=1024 fwd+bwd cudnn 1.14x (not yet measured on the H200)",
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
