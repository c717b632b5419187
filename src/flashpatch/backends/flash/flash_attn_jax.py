"""flash-attn-jax, FlashAttention-2's own JAX binding, as the flash backend's varlen kernel on JAX before 0.9.

flash-attn-jax (BSD-3; `pip install "flashpatch[flash-attn-jax]"`) declares jax>=0.5,<0.9 and CUDA 12. What its
0.6.2 wheels hold and need, read from them (`builds`, and its sources in the sdist):

- GPU code: FlashAttention-2 built for sm80 alone (every 8.x runs it), plus compute_80 PTX. Hopper and Blackwell
  would run the PTX, compiled by the driver at first use: untried, so refused here.
- Its API's checks: compute capability 8.x, 9.0 or >= 10; head dims > 192 backward only on 8.0, 9.0 and >= 10, so
  8.6 and 8.9 (A6000, RTX 3090 / 4090, L40S) cannot train openpi's head_dim 256 with it (its 99 KB backward variant
  sits behind that check).
- JAX: its kernels read the device through XLA's FFI call `XLA_FFI_DeviceOrdinal_Get`, which jaxlib's FFI API has
  from 0.6.0 on (jaxlib/include/xla/ffi/api/c_api.h: absent in 0.5.1 and 0.5.3); on openpi's JAX 0.5.3 the kernels'
  first call fails (nshepperd/flash_attn_jax#12). So it serves JAX 0.6 to 0.8, where dew-flash-attn (JAX >= 0.11.2)
  cannot, and not openpi's pinned stack. Not run on a GPU by flashpatch: the H200 here runs CUDA 13 and JAX 0.11+.

The call: `flash_mha_varlen(q (Tq, N, H), k, v (Tk, K, H), cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q,
max_seqlen_k, softmax_scale, is_causal)`, int32 offsets, bf16 or fp16, returns the output alone; its backward sums
the key gradients over each group of query heads itself.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

import jax
import jax.numpy as jnp

from flashpatch import versions
from flashpatch.backends import machine
from flashpatch.backends.flash import builds

NAME = DISTRIBUTION = "flash-attn-jax"
EXTRA = "flashpatch[flash-attn-jax]"
#: The JAX its kernels run on: its Requires-Dist's ceiling, and the floor its FFI handlers need (above).
JAX_RANGE = ">=0.6.0,<0.9"
#: The first jaxlib whose XLA FFI API has XLA_FFI_DeviceOrdinal_Get.
FFI_DEVICE_ORDINAL_JAXLIB = "0.6.0"
#: Its modules that count the GPU's multiprocessors at lowering time (`_multiprocessors_from_jax`).
_COUNTING_MODULES = ("flash_attn_jax.varlen_fwd", "flash_attn_jax.varlen_bwd")


def limits(gpu: machine.Gpu, head_dim: int) -> str | None:
    """Why flash-attn-jax cannot train openpi's attention at `head_dim` on `gpu` here, or None."""
    jax_version = versions.installed("jax")
    release = builds.installed(DISTRIBUTION)
    if release is None:
        if jax_version is not None and not versions.satisfies(jax_version, JAX_RANGE):
            return f"flash-attn-jax runs on JAX 0.6 to 0.8 (JAX here is {jax_version})"
        return f'flash-attn-jax is not installed (pip install "{EXTRA}")'
    if isinstance(release, str):
        return release
    who = release.who
    reason = release.jax_refusal(jax_version)  # its Requires-Dist: jax<0.9.0,>=0.5.0 for 0.6.2
    if reason is not None:
        return reason
    library = release.libraries[0] if release.libraries else None
    if library is None:
        return f"{who} holds no kernel library"
    jaxlib = versions.installed("jaxlib") or jax_version
    ordinal_ok = jaxlib is None or versions.satisfies(jaxlib, f">={FFI_DEVICE_ORDINAL_JAXLIB}")
    if library.device_ordinal and not ordinal_ok:
        return (
            f"{who}'s kernels read the device through XLA's FFI call XLA_FFI_DeviceOrdinal_Get, which jaxlib "
            f"{jaxlib} does not have (it came in {FFI_DEVICE_ORDINAL_JAXLIB}), so its first call would fail on the GPU "
            "(nshepperd/flash_attn_jax#12)"
        )
    # Its extension links libcudart.so.12: JAX must run CUDA 12.
    if versions.installed("jax-cuda13-plugin") and not versions.installed("jax-cuda12-plugin"):
        return f"{who} is built for CUDA 12 but JAX runs CUDA 13"
    reason = library.refuses(gpu.capability, head_dim, who)
    if reason is not None:
        return reason
    return None


@functools.cache
def load() -> ModuleType | str:
    """The flash_attn_jax module, or why it cannot be used here (one sentence).

    JAX's CUDA backend starts first: its plugin loads libcudart.so.12, which the library's extension links
    against (the extension's own search path names a folder no wheel installs).
    """
    if machine.gpu() is None:
        return "flash-attn-jax needs an NVIDIA GPU under CUDA"
    try:
        import flash_attn_jax
    except ImportError as err:
        return f"flash-attn-jax is installed but does not import ({err})"
    except OSError as err:
        return f"flash-attn-jax is installed but its kernel library failed to load ({err})"
    _multiprocessors_from_jax()
    return flash_attn_jax


def _multiprocessors_from_jax() -> None:
    """flash-attn-jax 0.6 counts the GPU's multiprocessors at lowering time through `ctypes.CDLL("libcudart.so")`:
    pip's CUDA 12 runtime ships only libcudart.so.12, so in a pip-only environment that load fails (OSError inside
    the user's jit), and where a system CUDA toolkit provides the name it may be another CUDA major. Its modules get
    JAX's own count (the device's core_count) instead; a release without the function is left as it is."""

    count = functools.cache(lambda device_idx=0: _jax_multiprocessors(device_idx))
    for name in _COUNTING_MODULES:
        module = sys.modules.get(name)
        if module is not None and callable(getattr(module, "get_sm_count", None)):
            module.get_sm_count = count


def _jax_multiprocessors(device_idx: int = 0) -> int:
    return int(jax.devices()[device_idx].core_count)


def varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool) -> jax.Array:
    """`segments.VarlenKernel` through flash-attn-jax (softmax scale 1: q comes pre-scaled)."""
    module = load()
    if isinstance(module, str):
        raise RuntimeError(module)
    return module.flash_mha_varlen(
        q,
        k,
        v,
        cu_q.astype(jnp.int32),
        cu_k.astype(jnp.int32),
        max_seqlen_q=int(max_q),
        max_seqlen_k=int(max_k),
        softmax_scale=1.0,
        is_causal=bool(causal),
    )
