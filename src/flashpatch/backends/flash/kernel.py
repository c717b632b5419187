"""dew-flash-attn, the FlashAttention kernels this backend calls on JAX >= 0.11.2, and what it can run here.

dew-flash-attn ships FlashAttention-3 for Hopper (sm90) and FlashAttention-2 built for sm80, whose code every
compute capability 8.x runs (A100, A6000, L40S, RTX 3090 / 4090), and for sm120 (RTX 5090, RTX PRO 6000); nothing
for sm100 (B200). FA2's API refuses a head dim above 192 in the backward on 8.6 and 8.9, so there openpi's head_dim
256 does not train with it. One function takes packed variable-length sequences on either. It needs JAX >= 0.11.2
and the wheel of JAX's CUDA major (`dew-flash-attn-cu12` / `-cu13`): `pip install "flashpatch[flash]"`. What each
release holds is read from its files (`builds`), so a newer release is judged by what it holds. Nothing here
imports the library before the backend is asked for.
"""

from __future__ import annotations

import functools
from types import ModuleType

import jax

from flashpatch import versions
from flashpatch.backends import machine
from flashpatch.backends.flash import builds

NAME = "dew-flash-attn"
#: The library's install name, and flashpatch's extra that installs it, per CUDA major of JAX's GPU plugin.
WHEELS = {12: "dew-flash-attn-cu12", 13: "dew-flash-attn-cu13"}
EXTRAS = {12: "flashpatch[flash]", 13: "flashpatch[flash-cu13]"}
#: The JAX it needs (its wheels' Requires-Dist: jax>=0.11.2), for saying so before it is installed.
JAX_RANGE = ">=0.11.2"
#: Head dims the kernels take (narrower ones are padded up by the library).
MAX_HEAD_DIM = 256
_FA2, _FA3 = "libdew_flash_attn.", "libdew_flash_attn3."


def cuda_majors() -> tuple[int | None, int | None]:
    """(CUDA major of JAX's GPU plugin, CUDA major the installed dew-flash-attn wheel was built for); None: absent."""
    jax_major = next((m for m in WHEELS if versions.installed(f"jax-cuda{m}-plugin")), None)
    dew_major = next((m for m, wheel in WHEELS.items() if versions.installed(wheel)), None)
    return jax_major, dew_major


def install_hint(jax_major: int | None) -> str:
    return f'pip install "{EXTRAS.get(jax_major or 12, EXTRAS[12])}"'


@functools.cache
def load() -> ModuleType | str:
    """The dew_flash_attn module, or why it cannot be used here (one sentence)."""
    jax_major, dew_major = cuda_majors()
    if jax_major and dew_major and jax_major != dew_major:
        return _mismatch(jax_major, dew_major)
    try:
        import dew_flash_attn
    except ImportError:
        return f"dew-flash-attn is not installed ({install_hint(jax_major)}; it needs JAX 0.11.2 or newer)"
    except OSError as err:  # a library in the package failed to load
        return f"dew-flash-attn is installed but its kernel library failed to load ({err})"
    return dew_flash_attn


def _mismatch(jax_major: int, dew_major: int) -> str:
    return (
        f"the installed {WHEELS[dew_major]} is built for CUDA {dew_major} but JAX runs CUDA {jax_major}: "
        f"pip uninstall {WHEELS[dew_major]} && {install_hint(jax_major)}"
    )


def limits(gpu: machine.Gpu, head_dim: int) -> str | None:
    """Why dew-flash-attn cannot train openpi's attention at `head_dim` on `gpu` here, or None."""
    jax_version = versions.installed("jax")
    jax_major, dew_major = cuda_majors()
    if dew_major is None:
        if jax_version is not None and not versions.satisfies(jax_version, JAX_RANGE):
            return f"dew-flash-attn needs JAX 0.11.2 or newer (JAX here is {jax_version})"
        return f"dew-flash-attn is not installed ({install_hint(jax_major)})"
    if jax_major and jax_major != dew_major:
        return _mismatch(jax_major, dew_major)
    release = builds.installed(WHEELS[dew_major])
    if not isinstance(release, builds.Release):
        return release or f"dew-flash-attn is not installed ({install_hint(jax_major)})"
    who = release.who
    reason = release.jax_refusal(jax_version)
    if reason is not None:
        return reason
    # dew_flash_attn._hopper(): FlashAttention-3 where the FA3 library's build holds the GPU's code (sm90 alone);
    # it takes head dims up to 256, forward and backward. Elsewhere FlashAttention-2, with FA2's own checks.
    fa3, fa2 = release.library(_FA3), release.library(_FA2)
    if fa3 is None or fa3.code_for(gpu.capability) != "cubin":
        if fa2 is None:
            return f"{who} holds no FlashAttention-2 library"
        reason = fa2.refuses(gpu.capability, head_dim, who)
        if reason is not None:
            return reason
    return None


def varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool) -> jax.Array:
    """`segments.VarlenKernel` through dew-flash-attn (softmax scale 1: q comes pre-scaled)."""
    module = load()
    if isinstance(module, str):
        raise RuntimeError(module)
    return module.flash_mha_varlen(
        q, k, v, cu_q, max_q, softmax_scale=1.0, is_causal=causal, key_cu_seqlens=cu_k, key_max_seqlen=max_k
    )
