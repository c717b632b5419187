"""Where JAX's Pallas Triton backend can run flashpatch's kernels: the installed JAX and the GPU, each rule
mirroring the check of JAX, XLA or Triton that would otherwise fail the user's step at lowering or compile time.

The GPU is read through `flashpatch.backends.machine` and the versions through `flashpatch.versions`, so that
`machine.simulated("RTX 5090", versions_={"jax": "0.11.1"})` walks CPU tests through the gates a real GPU meets.
What each JAX release does is written down in docs/architecture.md, "Pallas Triton per JAX release".
"""

from __future__ import annotations

import functools
import re

from flashpatch import versions
from flashpatch.backends import machine
from flashpatch.backends.pallas import tiling

#: jax 0.11.0 and 0.11.1 know Pallas Triton GPUs by name: `GpuVersion` in `jax/_src/pallas/triton/gpu_info.py`,
#: in its order. `get_gpu_info` matches these at the start of the device kind, whole words only, and raises
#: `ValueError: Unsupported GPU device kind` for any other NVIDIA GPU, which `pallas_call_lowering`
#: (`jax/_src/pallas/triton/pallas_call_registration.py`) re-raises as `RuntimeError: No supported GPU devices
#: found` while the user's step is lowered. jax 0.11.2 matches anywhere in the kind and, failing that, takes
#: any "NVIDIA ..." device with its own compute capability.
NAMED_GPUS_JAX_0_11 = (
    "NVIDIA A10",
    "NVIDIA A30",
    "NVIDIA A100",
    "NVIDIA H100",
    "NVIDIA H200",
    "NVIDIA GH200",
    "NVIDIA B200",
    "NVIDIA GB200",
    "NVIDIA B300",
    "NVIDIA GB300",
    "NVIDIA GB10",
    "NVIDIA L4",
    "NVIDIA L40",
    "Tesla T4",
    "NVIDIA GeForce RTX 4090",
    "NVIDIA RTX PRO 4500",
    "NVIDIA RTX PRO 5000",
    "NVIDIA RTX PRO 6000",
    "NVIDIA Thor",
)
#: The releases with that list (gpu_info.py appeared in 0.11.0; 0.11.2 accepts any NVIDIA GPU).
NAMED_GPUS_JAX = ">=0.11.0,<0.11.2"
#: `_GPU_VERSION_RE` of those releases: the names as alternatives, in order, between word boundaries (`re.match`).
_NAMED_GPU_RE = re.compile(r"\b(" + "|".join(NAMED_GPUS_JAX_0_11) + r")\b")
#: XLA compiles Triton for compute capability 8.0 and up only: `CheckAtLeastAmpere` / `EnsureTritonSupports
#: ComputeCapability` ("Triton support is only enabled for Ampere GPUs (compute capability 8.0) and up"), in the
#: CUDA plugin of jaxlib 0.5.3 as in today's.
MIN_CAPABILITY = (8, 0)
#: JAX's id of the Pallas Triton deprecation (`jax._src.deprecations`, from 0.11.2): once JAX "accelerates" it,
#: lowering raises instead of warning.
DEPRECATION_ID = "jax-pallas-triton"
#: What JAX said when it deprecated the backend (the Pallas changelog, "Released with JAX 0.11.0", Triton).
DEPRECATION = (
    "JAX deprecated its Pallas Triton backend in 0.11.0 (it warns at every lowering from 0.11.2) and will remove "
    "it in a future release"
)


def _jax_version() -> str:
    found = versions.installed("jax")
    return str(found) if found is not None else "?"


@functools.cache
def _triton_backend_error() -> str | None:
    """Why `jax.experimental.pallas.triton` cannot serve here (gone, or its deprecation made an error); else None."""
    try:
        import jax.experimental.pallas.triton  # noqa: F401
    except ImportError as error:
        return f"jax.experimental.pallas.triton does not import ({error})"
    try:
        from jax._src import deprecations

        accelerated = deprecations.is_accelerated(DEPRECATION_ID)
    except Exception:  # before 0.11.2 the id is not registered: nothing to accelerate
        accelerated = False
    if accelerated:
        return "JAX raises instead of warning at its lowering (the deprecation is accelerated)"
    return None


def backend_missing() -> str | None:
    """Why this JAX has no Pallas Triton backend for the kernels, in one sentence; None while it has one."""
    error = _triton_backend_error()
    if error is None:
        return None
    return (
        f"pallas is written in Pallas for Triton, which jax {_jax_version()} no longer offers: {error}. "
        f"{DEPRECATION}; on this JAX auto takes the next path (flash, cudnn or openpi's own attention)"
    )


def named_gpu_refused(kind: str) -> bool:
    """Whether jax 0.11.0 / 0.11.1's `gpu_info.get_gpu_info` would raise for this device kind."""
    return _NAMED_GPU_RE.match(kind) is None


def gpu_refusal(gpu: machine.Gpu, head_dim: int, dtype, sized: bool = True) -> str | None:
    """Why Pallas Triton under the installed JAX cannot run the kernels on `gpu`, in one sentence; else None.

    `sized`: also refuse where no tiling's estimate fits the GPU's shared memory (False for a tiling the caller
    chose, which the estimate, an upper bound, does not second-guess; the compile guard still tries it).
    """
    jax_version = versions.installed("jax")
    if gpu.capability < MIN_CAPABILITY:
        return (
            f"pallas needs compute capability 8.0 or newer: XLA compiles Triton kernels for Ampere and later only, "
            f"and the {gpu.kind} is {gpu.capability[0]}.{gpu.capability[1]}"
        )
    if jax_version is not None and versions.satisfies(jax_version, NAMED_GPUS_JAX) and named_gpu_refused(gpu.kind):
        return (
            f"jax {jax_version}'s Pallas Triton lowering knows GPUs by name and not the {gpu.kind} (it raises 'No "
            "supported GPU devices found' when the step is lowered; jax/_src/pallas/triton/gpu_info.py); jax 0.11.2 "
            "or newer accepts any NVIDIA GPU: pip install -U 'jax[cuda12]>=0.11.2'"
        )
    if sized and tiling.for_gpu(gpu, head_dim, dtype) is None:
        capability = f"{gpu.capability[0]}.{gpu.capability[1]}"
        need = max(tiling.shared_memory(tiling.SMALLEST, head_dim, dtype, capability).values())
        return (
            f"pallas's smallest tiles at head_dim {head_dim} in {dtype} need about {need} B of shared memory per "
            f"block and the {gpu.kind} allows {gpu.shared_memory} B"
        )
    return None
