"""kvax block sizes, warps and stages per shape, chosen by measurement on an H100.

Each row covers problems up to `max_len` keys; the first row that fits is used. The numbers
come from `scripts/gpu/kvax_sweep.py` (results and how they ran: benchmarks/results/kvax_sweep*.json).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Blocks:
    query: int
    kv: int
    warps: int
    stages: int

    def __str__(self) -> str:
        return f"{self.query}x{self.kv}w{self.warps}s{self.stages}"


@dataclasses.dataclass(frozen=True)
class Tuning:
    max_len: int
    forward: Blocks
    backward: Blocks


#: head_dim -> rows ordered by max_len. Filled from the H100 sweep; kvax's own H100 defaults
#: (128x128 forward, 64x128 backward, 8 warps, 3 stages) were 1.9x slower forward at head_dim 256.
TABLE: dict[int, tuple[Tuning, ...]] = {
    256: (
        Tuning(2048, Blocks(128, 64, 8, 2), Blocks(32, 32, 4, 2)),
        Tuning(1 << 30, Blocks(128, 64, 8, 2), Blocks(64, 128, 8, 2)),
    ),
}
DEFAULT = Tuning(1 << 30, Blocks(128, 64, 8, 2), Blocks(64, 64, 4, 2))


def choose(head_dim: int, kv_len: int) -> Tuning:
    for row in TABLE.get(head_dim, ()):
        if kv_len <= row.max_len:
            return row
    return DEFAULT
