"""Wall-clock timing done right for JAX (warm up, block until ready, median) and the run's time budget."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

#: Calls shorter than this are timed in groups (dispatched back to back, then one wait), so that
#: Python's dispatch cost and the clock's resolution do not dominate.
MIN_SAMPLE_S = 0.005
MAX_CALLS_PER_SAMPLE = 100
MIN_REPEATS = 3
#: Calls so slow that MIN_REPEATS of them would take more than this many times `max_seconds` get
#: fewer repeats (at least two samples): the sizes that only ask "does it fit, and about how fast".
SLOW_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    calls_per_repeat: int

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def measure(
    call: Callable[[int], Any],
    *,
    warmup: int,
    repeats: int,
    max_seconds: float,
    group_small_calls: bool = True,
) -> Timing:
    """Median time of `call(i)` (i counts calls, so callers can rotate inputs or thread state).

    Each call's result is waited on with `jax.block_until_ready`. Repeats shrink so that the timed
    loop stays near `max_seconds`: to MIN_REPEATS, or for very slow calls to two samples. With
    `group_small_calls`, calls under MIN_SAMPLE_S are dispatched in groups and timed per group; pass
    False when a call's inputs depend on the previous call's outputs anyway (a training step).
    """
    index = 0
    for _ in range(warmup):
        start = time.perf_counter()
        jax.block_until_ready(call(index))
        index += 1
        if time.perf_counter() - start > max_seconds:
            break  # one slow call has warmed it up; more would only spend the budget
    start = time.perf_counter()
    jax.block_until_ready(call(index))
    index += 1
    single = max(time.perf_counter() - start, 1e-7)

    per_sample = 1
    if group_small_calls and single < MIN_SAMPLE_S:
        per_sample = min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / single))
    count = min(repeats, int(max_seconds / (single * per_sample)))
    if single * per_sample * MIN_REPEATS <= SLOW_FACTOR * max_seconds:
        count = max(count, MIN_REPEATS)
    samples = [single] if per_sample == 1 else []  # a call after warm-up is a sample like any other
    for _ in range(max(1, count - len(samples))):
        start = time.perf_counter()
        outputs = [call(index + j) for j in range(per_sample)]
        jax.block_until_ready(outputs)
        samples.append((time.perf_counter() - start) / per_sample)
        index += per_sample
        del outputs
    samples_ms = sorted(s * 1e3 for s in samples)
    return Timing(
        median_ms=statistics.median(samples_ms),
        p10_ms=_quantile(samples_ms, 0.1),
        p90_ms=_quantile(samples_ms, 0.9),
        repeats=len(samples),
        calls_per_repeat=per_sample,
    )


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Budget:
    """Splits the run's time among groups of cases by weight; unused time flows to later groups.

    A group's deadline is set when it begins: now + (time left) * weight / (weights not yet begun).
    Cases check `exceeded()` before they start; a started case always runs to its end.
    """

    def __init__(self, total_s: float, weights: Mapping[str, float], clock: Callable[[], float] = time.monotonic):
        if total_s <= 0:
            raise ValueError(f"budget_s must be positive; got {total_s}")
        self._clock = clock
        self.start = clock()
        self.total_s = total_s
        self._pending = dict(weights)
        self.group: str | None = None
        self.deadline = self.start + total_s

    def elapsed(self) -> float:
        return self._clock() - self.start

    def begin(self, group: str) -> None:
        if group not in self._pending:
            raise ValueError(f"group must be one of {', '.join(self._pending)}; got {group!r}")
        weight = self._pending.pop(group)
        left = max(0.0, self.total_s - self.elapsed())
        share = weight / (weight + sum(self._pending.values()))
        self.group = group
        self.deadline = self._clock() + left * share

    def exceeded(self) -> str | None:
        """Why no new case may start now, or None."""
        if self._clock() <= self.deadline:
            return None
        return f"time budget: {self.group} had until {self.deadline - self.start:.0f}s of the run's {self.total_s:.0f}s"
