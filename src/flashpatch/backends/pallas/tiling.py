"""Block sizes, warps and pipeline stages for the Pallas flash-attention kernels, per GPU generation.

Each kernel keeps some tiles resident for its whole loop and streams others, `num_stages` copies
deep (Triton's software pipeline keeps that many loads in flight in shared memory). The estimate
used here, per kernel, with H the padded head dim and e the element size in bytes:

    forward   resident q (bq*H*e)          + stages * (k + v tiles, 2*bk*H*e)  + p tile (bq*bk*e)
    dK/dV     resident k, v (2*bk*H*e)     + stages * (q + dO tiles, 2*bq*H*e) + p^T and dS^T (2*bq*bk*e)
    dQ        resident q, dO (2*bq*H*e)    + stages * (k + v tiles, 2*bk*H*e)  + dS tile (bq*bk*e)

plus, on compute capability 10.x and 11.x (Blackwell's tcgen05 MMA, B200) with 2 or more stages, one more
streamed tile (bk*H*e for forward and dQ, bq*H*e for dK/dV): there Triton's pipeline keeps an extra buffer
of the operands an asynchronous MMA still reads; plus `RESERVE` bytes for Triton's own scratch (barriers,
cross-warp reductions). The budget per block is the GPU's opt-in maximum of shared memory per thread block
(`flashpatch.backends.machine`: the driver's figure on a real GPU, NVIDIA's table by compute capability
otherwise): 163 KiB on sm80, 99 KiB on sm86, sm89 and sm120, 227 KiB on sm90 and sm100.

The estimate is meant to be an upper bound of what Triton's compiler allocates: CI compiles every
generation's kernels without a GPU and fails where a kernel does not fit or the estimate falls below the
compiler's figure (`tests/pallas_generations.py`, `.ci/generations`; docs/architecture.md, "The
per-generation compile check", has the figures and which Triton was checked).

Worked numbers at openpi's head_dim 256 in bf16 (a 64-row tile is 64*256*2 = 32 KiB), RESERVE left out:

    sm90 "sm90-128x64":  forward 128 q x 64 k, 2 stages: 64 + 2*(32+32) + 16      = 208 KiB
                         dK/dV 64 q x 64 k, 2 stages:    64 + 2*(32+32) + 16      = 208 KiB
                         dQ 64 q x 64 k, 2 stages:       64 + 2*(32+32) +  8      = 200 KiB  (all <= 227 - 4)
    sm100 "sm100-64x64": forward 64 q x 64 k, 2 stages:  32 + 2*(32+32) +  8 + 32 = 200 KiB
                         dK/dV 32 q x 64 k, 2 stages:    64 + 2*(16+16) +  8 + 16 = 152 KiB
                         dQ 64 q x 32 k, 2 stages:       64 + 2*(16+16) +  4 + 16 = 148 KiB  (all <= 227 - 4)
                         (sm90's tiling, 240 KiB for its forward and dK/dV here, does not fit sm100)
    sm80 "sm80-128x32":  forward 128 x 32, 2 stages:     64 + 2*(16+16) +  8      = 136 KiB
                         dK/dV 32 q x 64 k, 2 stages:    64 + 2*(16+16) +  8      = 136 KiB
                         dQ 64 q x 32 k, 2 stages:       64 + 2*(16+16) +  4      = 132 KiB  (all <= 163 - 4)
                         (sm90's forward, 208 KiB, does not fit: that is why sm80 has its own list)
    sm86 "sm86-64x32":   forward 64 x 32, 1 stage:       32 + 1*(16+16) +  4      =  68 KiB
                         dK/dV 16 q x 32 k, 2 stages:    32 + 2*( 8+ 8) +  2      =  66 KiB
                         dQ 32 q x 32 k, 1 stage:        32 + 1*(16+16) +  2      =  66 KiB  (all <= 99 - 4)
                         (a 64 x 32 forward with 2 stages needs 100 KiB: one stage only here)

`config_for` takes the first of the generation's candidates that fits the estimate for the given head
dim, dtype and budget, else the first of the smaller generations' that does (float32 tiles are twice
as large), else `SMALLEST`; `fitting_config` says None where not even that fits.
The tilings were timed on the H200 only (docs/benchmarks.md, "The Pallas kernel"):
`benchmarks/lab/gpu/pallas_sweep.py` times the candidates (`candidates(cc)`) on a GPU and reports the
ones that fail to compile.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flashpatch.backends import machine

KIB = 1024
#: Triton's own shared-memory scratch (barriers, cross-warp reductions), kept out of every budget.
RESERVE = 4 * KIB
#: Compute capability majors whose MMA (tcgen05) Triton pipelines with one more buffer of the streamed tiles.
EXTRA_STAGE_MAJORS = (10, 11)


@dataclasses.dataclass(frozen=True)
class Tile:
    """One kernel's launch shape: rows of q per tile, keys per tile, warps, pipeline stages."""

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for field in ("block_q", "block_k"):
            size = getattr(self, field)
            # Triton tensors have power-of-two shapes; its dot needs every dimension >= 16.
            if size < 16 or size & (size - 1):
                raise ValueError(f"{field} must be a power of two >= 16; got {size}")
        if self.num_stages < 1 or self.num_warps < 1:
            raise ValueError(f"num_warps and num_stages must be positive; got {self}")


@dataclasses.dataclass(frozen=True)
class Config:
    """The tiles of the three kernels: forward, dK/dV (one key tile, loop over q) and dQ."""

    name: str
    forward: Tile
    dkv: Tile
    dq: Tile

    @property
    def row_multiple(self) -> int:
        """What the folded query rows are padded to: every kernel's q tile divides it."""
        return max(self.forward.block_q, self.dkv.block_q, self.dq.block_q)

    @property
    def key_multiple(self) -> int:
        """What the key length is padded to: every kernel's key tile divides it."""
        return max(self.forward.block_k, self.dkv.block_k, self.dq.block_k)


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels see: the next power of two, at least 16 (zero columns are exact)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _extra_stage(capability: tuple[int, int] | None, tile: Tile) -> int:
    """1 where this generation's pipeline keeps one more buffer of the streamed tiles (module docstring)."""
    return int(capability is not None and capability[0] in EXTRA_STAGE_MAJORS and tile.num_stages >= 2)


def shared_memory(config: Config, head_dim: int, dtype, compute_capability: str | None = None) -> dict[str, int]:
    """Estimated shared-memory bytes of each kernel (the formulas of the module docstring), RESERVE included.

    `compute_capability` ('10.0', ...) adds the generation's own term; None: the term of sm80 to sm90 and sm120.
    """
    h = padded_head_dim(head_dim)
    e = np.dtype(dtype).itemsize
    cc = parse_capability(compute_capability)
    f, d, q = config.forward, config.dkv, config.dq
    forward = f.block_q * h + f.num_stages * 2 * f.block_k * h + _extra_stage(cc, f) * f.block_k * h
    forward += f.block_q * f.block_k
    dkv = 2 * d.block_k * h + d.num_stages * 2 * d.block_q * h + _extra_stage(cc, d) * d.block_q * h
    dkv += 2 * d.block_q * d.block_k
    dq = 2 * q.block_q * h + q.num_stages * 2 * q.block_k * h + _extra_stage(cc, q) * q.block_k * h
    dq += q.block_q * q.block_k
    return {"forward": forward * e + RESERVE, "dkv": dkv * e + RESERVE, "dq": dq * e + RESERVE}


def parse_capability(compute_capability: str | None) -> tuple[int, int] | None:
    """'9.0' or '90' or 'sm_90' -> (9, 0); '10.0' or '100' -> (10, 0); None stays None."""
    if compute_capability is None:
        return None
    text = str(compute_capability).lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, minor = text.split(".", 1)
        return int(major), int(minor)
    return int(text[:-1]), int(text[-1])


def shared_memory_limit(compute_capability: str | None) -> int:
    """Bytes of shared memory one thread block may use on this generation (`machine.SHARED_MEMORY`)."""
    cc = parse_capability(compute_capability)
    if cc is None:
        return machine.UNKNOWN_SHARED_MEMORY
    return machine.SHARED_MEMORY.get(cc, machine.UNKNOWN_SHARED_MEMORY)


def fits(config: Config, compute_capability: str | None, head_dim: int, dtype, limit: int | None = None) -> bool:
    """Whether every kernel's estimate fits `limit` bytes (default: the generation's table figure)."""
    limit = shared_memory_limit(compute_capability) if limit is None else limit
    return max(shared_memory(config, head_dim, dtype, compute_capability).values()) <= limit


SM90 = (
    Config("sm90-128x64", forward=Tile(128, 64, 8, 2), dkv=Tile(64, 64, 8, 2), dq=Tile(64, 64, 8, 2)),
    Config("sm90-64x64", forward=Tile(64, 64, 4, 2), dkv=Tile(32, 64, 4, 2), dq=Tile(64, 32, 4, 2)),
    Config("sm90-128x32", forward=Tile(128, 32, 8, 3), dkv=Tile(64, 32, 8, 2), dq=Tile(128, 32, 8, 2)),
    Config("sm90-64x32", forward=Tile(64, 32, 4, 3), dkv=Tile(32, 32, 4, 3), dq=Tile(32, 32, 4, 3)),
)
#: sm100 (B200): sm90's first tiling does not fit (module docstring); the largest tiles that do, 8 warps as on sm90.
#: Compile-checked in CI, not timed on a B200.
SM100 = (Config("sm100-64x64", forward=Tile(64, 64, 8, 2), dkv=Tile(32, 64, 8, 2), dq=Tile(64, 32, 8, 2)),)
SM80 = (
    Config("sm80-128x32", forward=Tile(128, 32, 8, 2), dkv=Tile(32, 64, 4, 2), dq=Tile(64, 32, 4, 2)),
    Config("sm80-64x32", forward=Tile(64, 32, 4, 2), dkv=Tile(32, 32, 4, 2), dq=Tile(32, 32, 4, 2)),
)
SM86 = (
    Config("sm86-64x32", forward=Tile(64, 32, 4, 1), dkv=Tile(16, 32, 4, 2), dq=Tile(32, 32, 4, 1)),
    Config("sm86-32x32", forward=Tile(32, 32, 4, 2), dkv=Tile(16, 32, 4, 1), dq=Tile(32, 16, 4, 2)),
)
#: Fits every budget above at head_dim 256 in float32 (the last resort of `config_for`).
SMALLEST = Config("smallest", forward=Tile(16, 16, 4, 1), dkv=Tile(16, 16, 4, 1), dq=Tile(16, 16, 4, 1))
#: CPU interpret mode: small problems; tiles of different sizes per kernel, so that tests cross
#: block boundaries and paddings differently in each pass.
INTERPRET = Config("interpret", forward=Tile(32, 16, 1, 1), dkv=Tile(16, 32, 1, 1), dq=Tile(32, 32, 1, 1))


def candidates(compute_capability: str | None, limit: int | None = None) -> tuple[Config, ...]:
    """The generation's own configs, best first (the GPU sweep times each of them); None: interpret mode.

    `limit`: the GPU's own budget where known (default: the generation's table figure).
    """
    cc = parse_capability(compute_capability)
    if cc is None:
        return (INTERPRET,)
    limit = shared_memory_limit(compute_capability) if limit is None else limit
    if limit >= machine.SHARED_MEMORY[(9, 0)]:
        return (*SM100, *SM90) if cc[0] in EXTRA_STAGE_MAJORS else SM90
    if limit >= machine.SHARED_MEMORY[(8, 0)]:
        return SM80
    return SM86


def fitting_config(compute_capability: str | None, head_dim: int, dtype, limit: int | None = None) -> Config | None:
    """The first config whose estimate fits the budget for `head_dim` and `dtype`; None where none does.

    Its own `candidates` first, then the smaller generations' (float32 tiles are twice as large), then
    `SMALLEST`. `limit`: the GPU's own bytes per block (`machine.gpu().shared_memory`; default: the
    generation's table figure). None as compute capability: interpret mode (`INTERPRET`).
    """
    if compute_capability is None:
        return INTERPRET
    for config in (*candidates(compute_capability, limit), *SM80, *SM86, SMALLEST):
        if fits(config, compute_capability, head_dim, dtype, limit):
            return config
    return None


def config_for(compute_capability: str | None, head_dim: int, dtype, limit: int | None = None) -> Config:
    """`fitting_config`, or `SMALLEST` where nothing fits (`pallas.unsupported` refuses such a GPU first)."""
    return fitting_config(compute_capability, head_dim, dtype, limit) or SMALLEST


def for_gpu(gpu: machine.Gpu | None, head_dim: int, dtype) -> Config | None:
    """The tiling for this GPU (`machine.gpu()`: its compute capability and its real shared memory per block);
    None where not even SMALLEST fits it. A GPU whose facts cannot be read (None: not NVIDIA under CUDA) gets
    the tiling of the smallest budget of any GPU since Ampere."""
    if gpu is None:
        return fitting_config("8.0", head_dim, dtype, machine.UNKNOWN_SHARED_MEMORY)
    major, minor = gpu.capability
    return fitting_config(f"{major}.{minor}", head_dim, dtype, gpu.shared_memory)
