"""kvax block sizes, warps and stages per shape, chosen by measurement on an H100.

Each row covers problems up to `max_len` keys; the first row that fits is used. The numbers
come from `benchmarks/lab/gpu/kvax_sweep.py` (the H100 sweeps: benchmarks/history/kvax.md).
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


#: head_dim -> rows ordered by max_len. Forward: the fastest of the candidates timed through flashpatch at
#: B=2, T=S=4096 on the H100; backward at 4096: the faster of the two the sweep reached (the timings:
#: benchmarks/history/kvax.md, "Speed"). The backward choice at <= 2048 keys has not been timed by flashpatch:
#: a starting point from kvax probes on the H100, for benchmarks/lab/gpu/kvax_sweep.py's sweep at B=8, T=1024.
TABLE: dict[int, tuple[Tuning, ...]] = {
    256: (
        Tuning(2048, Blocks(128, 64, 8, 3), Blocks(32, 32, 4, 2)),
        Tuning(1 << 30, Blocks(128, 64, 8, 3), Blocks(64, 128, 8, 2)),
    ),
}
DEFAULT = Tuning(1 << 30, Blocks(128, 64, 8, 2), Blocks(64, 64, 4, 2))


def choose(head_dim: int, kv_len: int) -> Tuning:
    for row in TABLE.get(head_dim, ()):
        if kv_len <= row.max_len:
            return row
    return DEFAULT
