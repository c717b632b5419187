"""What this machine offers the kernels: the GPU (kind, compute capability, shared memory per block) and the
cuDNN JAX loaded. Read in one place, and pretended in one place (`simulated`), so that the CPU tests walk every
GPU generation openpi's users train on through the same gates a real GPU meets.

Nothing here imports a GPU library: the GPU is read from JAX's device, its shared memory from the CUDA driver
where one is loaded (`cuDeviceGetAttribute`), else from NVIDIA's table by compute capability.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator, Mapping

from flashpatch import versions

KIB = 1024

#: Opt-in maximum of shared memory per thread block, by compute capability (the CUDA C++ Programming Guide,
#: "Technical Specifications per Compute Capability": 163 KB on 8.0 and 8.7, 99 KB on 8.6, 8.9 and 12.x,
#: 227 KB on 9.0 and 10.x).
SHARED_MEMORY: dict[tuple[int, int], int] = {
    (8, 0): 163 * KIB,
    (8, 6): 99 * KIB,
    (8, 7): 163 * KIB,
    (8, 9): 99 * KIB,
    (9, 0): 227 * KIB,
    (10, 0): 227 * KIB,
    (10, 3): 227 * KIB,
    (12, 0): 99 * KIB,
    (12, 1): 99 * KIB,
}
#: For a compute capability not in the table: the smallest budget of any GPU since Ampere.
UNKNOWN_SHARED_MEMORY = 99 * KIB
#: The CUDA driver's attribute CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN.
_CU_SHARED_MEMORY_OPTIN = 97


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as the kernels' gates see it."""

    kind: str  # JAX's device_kind, e.g. "NVIDIA H200"
    capability: tuple[int, int]  # compute capability, e.g. (9, 0)
    shared_memory: int  # opt-in bytes of shared memory one thread block may use

    @property
    def sm(self) -> str:
        """The build target name: 'sm90' for compute capability 9.0."""
        return f"sm{self.capability[0]}{self.capability[1]}"

    @property
    def generation(self) -> str:
        major = self.capability[0]
        return {8: "Ampere / Ada", 9: "Hopper", 10: "Blackwell (data center)", 12: "Blackwell (RTX)"}.get(
            major, f"compute capability {major}.x"
        )

    @classmethod
    def of(cls, kind: str, capability: tuple[int, int]) -> Gpu:
        """A GPU whose shared memory is NVIDIA's figure for its compute capability."""
        return cls(kind, capability, SHARED_MEMORY.get(capability, UNKNOWN_SHARED_MEMORY))


#: The GPUs openpi's users train on, one per generation and shared-memory budget, for simulated tests, the support
#: matrix (docs/user-guide.md) and doctor. Device kinds as JAX reports them.
KNOWN: dict[str, Gpu] = {
    "A100": Gpu.of("NVIDIA A100-SXM4-80GB", (8, 0)),
    "A6000": Gpu.of("NVIDIA RTX A6000", (8, 6)),
    "RTX 3090": Gpu.of("NVIDIA GeForce RTX 3090", (8, 6)),
    "RTX 4090": Gpu.of("NVIDIA GeForce RTX 4090", (8, 9)),
    "L40S": Gpu.of("NVIDIA L40S", (8, 9)),
    "H100": Gpu.of("NVIDIA H100 80GB HBM3", (9, 0)),
    "H200": Gpu.of("NVIDIA H200", (9, 0)),
    "B200": Gpu.of("NVIDIA B200", (10, 0)),
    "RTX 5090": Gpu.of("NVIDIA GeForce RTX 5090", (12, 0)),
    "RTX PRO 6000": Gpu.of("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", (12, 0)),
}


@dataclasses.dataclass(frozen=True)
class _Simulation:
    gpu: Gpu | None
    cudnn: int | None


_simulation: contextvars.ContextVar[_Simulation | None] = contextvars.ContextVar("flashpatch_machine", default=None)


@contextlib.contextmanager
def simulated(
    gpu: Gpu | str | None = None, *, cudnn: int | None = 90501, versions_: Mapping[str, str | None] | None = None
) -> Iterator[Gpu | None]:
    """Within the block (this thread or task), the gates see `gpu` (a Gpu, a name in KNOWN, or None: no GPU), the
    cuDNN `cudnn` (cuDNN's numbering: 90501 is 9.5.1, openpi's) and the package versions `versions_` (name ->
    version, None: not installed; others as installed). For CPU tests of what a GPU would decide."""
    chosen = KNOWN[gpu] if isinstance(gpu, str) else gpu
    token = _simulation.set(_Simulation(chosen, cudnn))
    try:
        with versions.simulated(versions_ or {}):
            yield chosen
    finally:
        _simulation.reset(token)


def is_simulated() -> bool:
    return _simulation.get() is not None


def gpu() -> Gpu | None:
    """The default device if it is an NVIDIA GPU under CUDA (or the simulated one); None otherwise."""
    simulation = _simulation.get()
    if simulation is not None:
        return simulation.gpu
    return _real_gpu()


def cudnn_version() -> int | None:
    """The cuDNN JAX has loaded, as cuDNN numbers it (90501 for 9.5.1), or the simulated one; None without one."""
    simulation = _simulation.get()
    if simulation is not None:
        return simulation.cudnn if simulation.gpu is not None else None
    return _real_cudnn()


def cudnn_text(version: int) -> str:
    """cuDNN 9 numbers versions major*10000 + minor*100 + patch; cuDNN 8 used major*1000 + minor*100 + patch."""
    if version >= 90000:
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
    return f"{version // 1000}.{version // 100 % 10}.{version % 100}"


@functools.cache
def _real_gpu() -> Gpu | None:
    import jax

    device = jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in device.client.platform_version.lower():
        return None
    major, minor = (int(part) for part in str(device.compute_capability).split(".")[:2])
    measured = _driver_shared_memory(getattr(device, "local_hardware_id", None) or 0)
    found = Gpu.of(device.device_kind, (major, minor))
    return found if measured is None else dataclasses.replace(found, shared_memory=measured)


def _driver_shared_memory(ordinal: int) -> int | None:
    """The GPU's own opt-in shared memory per block, from the CUDA driver JAX loaded; None where it cannot say."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
        device, value = ctypes.c_int(), ctypes.c_int()
        if driver.cuInit(0) or driver.cuDeviceGet(ctypes.byref(device), ordinal):
            return None
        if driver.cuDeviceGetAttribute(ctypes.byref(value), _CU_SHARED_MEMORY_OPTIN, device):
            return None
    except (OSError, AttributeError):
        return None
    return value.value or None


def _real_cudnn() -> int | None:
    try:
        from jax._src.lib import cuda_versions  # where JAX's own cuDNN attention reads it (0.5 to 0.12)
    except ImportError:
        return None
    if cuda_versions is None:
        return None
    try:
        return int(cuda_versions.cudnn_get_version())
    except Exception:  # a CUDA plugin without a loadable cuDNN
        return None
