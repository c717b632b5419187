"""Block sizes, warps and pipeline stages for the Pallas flash-attention kernels, per GPU generation.

Each kernel keeps some tiles resident for its whole loop and streams others, `num_stages` copies
deep (Triton's software pipeline keeps that many loads in flight in shared memory). The model used
here, per kernel, with H the padded head dim and e the element size in bytes:

    forward   resident q (bq*H*e)          + stages * (k + v tiles, 2*bk*H*e)  + p tile (bq*bk*e)
    dK/dV     resident k, v (2*bk*H*e)     + stages * (q + dO tiles, 2*bq*H*e) + p^T and dS^T (2*bq*bk*e)
    dQ        resident q, dO (2*bq*H*e)    + stages * (k + v tiles, 2*bk*H*e)  + dS tile (bq*bk*e)

plus `RESERVE` bytes for Triton's own scratch (cross-warp reductions, layout conversions). The
budget per block is the architecture's opt-in maximum of shared memory per thread block:

    sm80 (A100, A800)                    163 KiB = 166912 B  (164 KiB per SM, 1 KiB kept by CUDA)
    sm86, sm89 (A6000, 3090, 4090, L40S)  99 KiB = 101376 B
    sm90 (H100, H200)                    227 KiB = 232448 B

Worked numbers at openpi's head_dim 256 in bf16 (a 64-row tile is 64*256*2 = 32 KiB):

    sm90 "sm90-128x64": forward 128 q x 64 k, 2 stages: 64 + 2*(32+32) + 16 = 208 KiB
                        dK/dV 64 q x 64 k, 2 stages:    64 + 2*(32+32) + 16 = 208 KiB
                        dQ 64 q x 64 k, 2 stages:       64 + 2*(32+32) +  8 = 200 KiB  (all <= 227 - 4)
    sm80 "sm80-128x32": forward 128 x 32, 2 stages:     64 + 2*(16+16) +  8 = 136 KiB
                        dK/dV 32 q x 64 k, 2 stages:    64 + 2*(16+16) +  8 = 136 KiB
                        dQ 64 q x 32 k, 2 stages:       64 + 2*(16+16) +  4 = 132 KiB  (all <= 163 - 4)
                        (sm90's forward, 208 KiB, does not fit: that is why sm80 has its own list)
    sm86 "sm86-64x32":  forward 64 x 32, 1 stage:       32 + 1*(16+16) +  4 =  68 KiB
                        dK/dV 16 q x 32 k, 2 stages:    32 + 2*( 8+ 8) +  2 =  66 KiB
                        dQ 32 q x 32 k, 1 stage:        32 + 1*(16+16) +  2 =  66 KiB  (all <= 99 - 4)
                        (a 64 x 32 forward with 2 stages needs 100 KiB: one stage only here)

`config_for` takes the first of the generation's candidates that fits the model for the given head
dim and dtype, else the first of the smaller generations' that does (float32 tiles are twice as
large), else `SMALLEST`.
The model is an estimate, not Triton's allocator: `benchmarks/lab/gpu/pallas_sweep.py` times the
candidates (`candidates(cc)`) and reports the ones that fail to compile.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KIB = 1024
#: Triton's own shared-memory scratch, kept out of every budget.
RESERVE = 4 * KIB
#: Opt-in maximum shared memory per thread block, by compute capability (major, minor).
SHARED_MEMORY = {
    (8, 0): 163 * KIB,
    (8, 6): 99 * KIB,
    (8, 7): 163 * KIB,
    (8, 9): 99 * KIB,
    (9, 0): 227 * KIB,
    (10, 0): 227 * KIB,
    (12, 0): 99 * KIB,
}
#: Budget for a compute capability not listed above (the smallest of sm80+).
UNKNOWN_SHARED_MEMORY = 99 * KIB


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


def shared_memory(config: Config, head_dim: int, dtype) -> dict[str, int]:
    """Modelled shared-memory bytes of each kernel (the formulas of the module docstring), RESERVE included."""
    h = padded_head_dim(head_dim)
    e = np.dtype(dtype).itemsize
    f, d, q = config.forward, config.dkv, config.dq
    return {
        "forward": f.block_q * h * e + f.num_stages * 2 * f.block_k * h * e + f.block_q * f.block_k * e + RESERVE,
        "dkv": 2 * d.block_k * h * e + d.num_stages * 2 * d.block_q * h * e + 2 * d.block_q * d.block_k * e + RESERVE,
        "dq": 2 * q.block_q * h * e + q.num_stages * 2 * q.block_k * h * e + q.block_q * q.block_k * e + RESERVE,
    }


def parse_capability(compute_capability: str | None) -> tuple[int, int] | None:
    """'9.0' or '90' or 'sm_90' -> (9, 0); None stays None."""
    if compute_capability is None:
        return None
    text = str(compute_capability).lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, minor = text.split(".", 1)
        return int(major), int(minor)
    return int(text[:-1]), int(text[-1])


def shared_memory_limit(compute_capability: str | None) -> int:
    """Bytes of shared memory one thread block may use on this generation."""
    cc = parse_capability(compute_capability)
    if cc is None:
        return UNKNOWN_SHARED_MEMORY
    return SHARED_MEMORY.get(cc, UNKNOWN_SHARED_MEMORY)


def fits(config: Config, compute_capability: str | None, head_dim: int, dtype) -> bool:
    limit = shared_memory_limit(compute_capability)
    return max(shared_memory(config, head_dim, dtype).values()) <= limit


SM90 = (
    Config("sm90-128x64", forward=Tile(128, 64, 8, 2), dkv=Tile(64, 64, 8, 2), dq=Tile(64, 64, 8, 2)),
    Config("sm90-64x64", forward=Tile(64, 64, 4, 2), dkv=Tile(32, 64, 4, 2), dq=Tile(64, 32, 4, 2)),
    Config("sm90-128x32", forward=Tile(128, 32, 8, 3), dkv=Tile(64, 32, 8, 2), dq=Tile(128, 32, 8, 2)),
    Config("sm90-64x32", forward=Tile(64, 32, 4, 3), dkv=Tile(32, 32, 4, 3), dq=Tile(32, 32, 4, 3)),
)
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


def candidates(compute_capability: str | None) -> tuple[Config, ...]:
    """The generation's own configs, best first (the GPU sweep times each of them); None: interpret mode."""
    cc = parse_capability(compute_capability)
    if cc is None:
        return (INTERPRET,)
    limit = shared_memory_limit(compute_capability)
    if limit >= SHARED_MEMORY[(9, 0)]:
        return SM90
    if limit >= SHARED_MEMORY[(8, 0)]:
        return SM80
    return SM86


def config_for(compute_capability: str | None, head_dim: int, dtype) -> Config:
    """The first config that fits this generation's shared memory for `head_dim` and `dtype`.

    Its own `candidates` first, then the smaller generations' (float32 tiles are twice as large),
    then `SMALLEST`. None: interpret mode (`INTERPRET`).
    """
    if compute_capability is None:
        return INTERPRET
    for config in (*candidates(compute_capability), *SM80, *SM86):
        if fits(config, compute_capability, head_dim, dtype):
            return config
    return SMALLEST


def device_capability(device=None) -> str | None:
    """'9.0' for a CUDA device (the default device if None), None for anything else."""
    import jax

    device = device or jax.devices()[0]
    return getattr(device, "compute_capability", None) if device.platform == "gpu" else None
