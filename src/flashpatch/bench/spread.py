"""The spread behind every ratio: a speedup means little without the noise of the two times it divides.

A record's time is the median of its repeats; its spread is their p10-p90 (with fewer than six repeats, the
fastest and the slowest: see timing.measure). A speedup einsum / variant then ranges from the einsum's fast
end over the variant's slow end to the einsum's slow end over the variant's fast end. Where that range reaches
across 1.0 the two paths are not told apart by this run: the ratio is "within noise", and every output says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WITHIN_NOISE = "within noise"
#: A timing whose median equals the record's time to this relative tolerance is the one it was taken from.
_SAME = 1e-9


def _primary(rec: Any) -> dict[str, Any] | None:
    """The timing the record's `ms` comes from: the one named `primary`, or, in a results.json written before
    that name was stored, the one whose median is the record's time, or the only one there is."""
    timings = rec.timings or {}
    name = getattr(rec, "primary", None)
    if name in timings:
        return timings[name]
    if rec.ms is None:
        return None
    same = [t for t in timings.values() if abs(t.get("median_ms", 0.0) - rec.ms) <= _SAME * rec.ms]
    if same:
        return same[0]
    return next(iter(timings.values())) if len(timings) == 1 else None


def ms_range(rec: Any) -> tuple[float, float] | None:
    """(p10, p90) of the record's time, on the scale of `rec.ms` (a per-token time divides its timing's)."""
    timing = _primary(rec)
    if rec.ms is None or timing is None or not timing.get("median_ms"):
        return None
    scale = rec.ms / timing["median_ms"]
    return timing["p10_ms"] * scale, timing["p90_ms"] * scale


def repeats(rec: Any) -> int | None:
    """How many timed repeats the record's time is the median of."""
    timing = _primary(rec)
    return timing.get("repeats") if timing is not None else None


def ratio_range(base: Any, rec: Any) -> tuple[float, float] | None:
    """(low, high) of base.ms / rec.ms from both records' spreads, or None where one has none."""
    a, b = ms_range(base), ms_range(rec)
    if a is None or b is None or b[0] <= 0 or b[1] <= 0:
        return None
    return a[0] / b[1], a[1] / b[0]


def within_noise(bounds: Sequence[float] | None) -> bool:
    """True where the ratio's spread reaches across 1.0 (no spread known: not claimed either way, False)."""
    return bounds is not None and bounds[0] <= 1.0 <= bounds[1]


def ratio_text(value: float, bounds: Sequence[float] | None, suffix: str = "x") -> str:
    """'1.06x (1.05-1.07)', or '1.00x (0.97-1.03, within noise)'; the bare ratio where no spread is known."""
    text = f"{value:.2f}{suffix}"
    if bounds is None:
        return text
    inner = f"{_bound(bounds[0])}-{_bound(bounds[1])}"
    return f"{text} ({inner}, {WITHIN_NOISE})" if within_noise(bounds) else f"{text} ({inner})"


def _bound(value: float) -> str:
    """Two decimals, or three where two would print 1.00 (which side of 1.0 a bound falls on matters)."""
    text = f"{value:.2f}"
    return f"{value:.3f}" if text == "1.00" else text


def add_ranges(records: Sequence[Any], baseline: str = "einsum") -> None:
    """Fill `speedup_range` of every record with a speedup from its einsum record (same scenario, case, size):
    for a results.json written before the range was stored, or after its records were put together again."""
    bases = {(r.scenario, r.case, r.size): r for r in records if r.variant == baseline and r.status == "ok"}
    for rec in records:
        base = bases.get((rec.scenario, rec.case, rec.size))
        if rec.speedup is not None and base is not None and rec is not base:
            bounds = ratio_range(base, rec)
            rec.speedup_range = list(bounds) if bounds is not None else None
