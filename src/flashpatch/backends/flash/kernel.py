"""dew-flash-attn, the FlashAttention kernels this backend calls, and what the GPU at hand can run of it.

dew-flash-attn ships FlashAttention-3 for Hopper (sm90) and FlashAttention-2 built for sm80, which
every compute capability 8.x runs (A100, A6000, L40S, RTX 3090 / 4090), and for sm120; one function
takes packed variable-length sequences on either. It needs JAX >= 0.11.2 and one of its wheels
(`dew-flash-attn-cu12` / `-cu13`, matching JAX's CUDA major): `pip install "flashpatch[flash]"`.
Nothing here is imported before the backend is asked for.
"""

from __future__ import annotations

import functools
from types import ModuleType

import jax

from flashpatch import versions

#: The library's install name, and flashpatch's extra that installs it, per CUDA major of JAX's GPU plugin.
WHEELS = {12: "dew-flash-attn-cu12", 13: "dew-flash-attn-cu13"}
EXTRAS = {12: "flashpatch[flash]", 13: "flashpatch[flash-cu13]"}
#: Head dims the kernels take (narrower ones are padded up by the library).
MAX_HEAD_DIM = 256


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
        return (
            f"the installed {WHEELS[dew_major]} is built for CUDA {dew_major} but JAX runs CUDA {jax_major}: "
            f"pip uninstall {WHEELS[dew_major]} && {install_hint(jax_major)}"
        )
    try:
        import dew_flash_attn
    except ImportError:
        return f"dew-flash-attn is not installed ({install_hint(jax_major)}; it needs JAX 0.11.2 or newer)"
    except OSError as err:  # a library in the package failed to load
        return f"dew-flash-attn is installed but its kernel library failed to load ({err})"
    return dew_flash_attn


def generation(capability: tuple[int, int]) -> str:
    """The build target of the library's code a GPU of `capability` runs: sm90 (FA3), sm80 (FA2), sm120."""
    major, minor = capability
    if major == 9:
        return "sm90"
    if major == 8:
        return "sm80"
    return f"sm{major}{minor}"


def gpu_limits(capability: tuple[int, int] | None, built_for: tuple[str, ...]) -> str | None:
    """Why the library cannot run on a GPU of `capability`, or None."""
    if capability is None:
        return "FlashAttention's kernels need an NVIDIA GPU under CUDA"
    target = generation(capability)
    if target not in built_for:
        return (
            f"dew-flash-attn has no code for compute capability {capability[0]}.{capability[1]} "
            f"(its libraries hold {', '.join(built_for) or 'nothing loadable'})"
        )
    return None


def varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool) -> jax.Array:
    """`segments.VarlenKernel` through dew-flash-attn (softmax scale 1: q comes pre-scaled)."""
    module = load()
    if isinstance(module, str):
        raise RuntimeError(module)
    return module.flash_mha_varlen(
        q, k, v, cu_q, max_q, softmax_scale=1.0, is_causal=causal, key_cu_seqlens=cu_k, key_max_seqlen=max_k
    )
