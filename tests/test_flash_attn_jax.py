"""The flash backend with flash-attn-jax as its kernel, on CPU.

flash-attn-jax's kernels need a CUDA 12 GPU under JAX 0.6 to 0.8, which no CI machine has. So its adapter
(`flash.flash_attn_jax.varlen`, the code that calls the library) runs here against `StandIn`: the library's
`flash_mha_varlen` with its exact signature, the checks its Python and C++ make of a call, and the kernel's
contract computed in plain JAX. Where the real library imports (not in CI), its signature is compared with the
stand-in's and the adapter's call is traced through its own primitives, forward and backward.
"""

from __future__ import annotations

import ctypes
import importlib.util
import inspect
import math
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashpatch.backends import machine
from flashpatch.backends.flash import FlashBackend, flash_attn_jax, providers, segments
from flashpatch.testing import conformance

#: A stack on which flash-attn-jax serves an A100: its JAX range, jaxlib with the FFI device ordinal, no dew.
SERVES = {
    "jax": "0.8.1",
    "jaxlib": "0.8.1",
    "flash-attn-jax": "0.6.2",
    "dew-flash-attn-cu12": None,
    "dew-flash-attn-cu13": None,
}


class StandIn:
    """flash_attn_jax 0.6.2's `flash_mha_varlen` in plain JAX, refusing every call the library would refuse."""

    def flash_mha_varlen(
        self,
        q,
        k,
        v,
        seqlens_q,
        seqlens_k=None,
        *,
        max_seqlen_q: int = -1,
        max_seqlen_k: int = -1,
        softmax_scale: float | None = None,
        is_causal: bool = False,
        window_size: tuple = (-1, -1),
    ):
        seqlens_k = seqlens_q if seqlens_k is None else seqlens_k
        # varlen.py: FlashConfig is a static dataclass, so these must be Python values, not arrays.
        assert type(max_seqlen_q) is int and type(max_seqlen_k) is int, (max_seqlen_q, max_seqlen_k)
        assert softmax_scale is None or type(softmax_scale) is float, softmax_scale
        assert type(is_causal) is bool and tuple(window_size) == (-1, -1)
        # varlen_fwd.py's frontend and lowering.
        assert seqlens_q.shape == seqlens_k.shape, "seqlens_q and seqlens_k must have the same shape."
        assert q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16), (q.dtype, k.dtype, v.dtype)
        assert seqlens_q.ndim == 1 and seqlens_q.shape[0] - 1 >= 1
        # mha_fwd.cpp / mha_bwd.cpp: int32 offsets (ffi::Buffer<ffi::S32>), packed 3-D arrays, heads dividing.
        assert seqlens_q.dtype == jnp.int32 and seqlens_k.dtype == jnp.int32, (seqlens_q.dtype, seqlens_k.dtype)
        assert q.ndim == 3 and k.ndim == 3 and k.shape == v.shape and q.shape[2] == k.shape[2] <= 256
        assert q.shape[1] % k.shape[1] == 0, "Number of heads in key/value must divide number of heads in query"
        longest_q = q.shape[0] if max_seqlen_q == -1 else max_seqlen_q
        longest_k = k.shape[0] if max_seqlen_k == -1 else max_seqlen_k
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
        out = segments.reference_varlen(
            q.astype(jnp.float32) * scale, k, v, seqlens_q, seqlens_k, longest_q, longest_k, is_causal
        ).astype(q.dtype)
        # A segment longer than max_seqlen overruns the kernel's buffers (lse is (b, h, max_seqlen_q)).
        overrun = (jnp.max(jnp.diff(seqlens_q)) > longest_q) | (jnp.max(jnp.diff(seqlens_k)) > longest_k)
        return jnp.where(overrun, jnp.nan, out)


class _FlashAttnJaxOnCpu(FlashBackend):
    """The flash backend as shipped (its gates pick the provider), allowed to run on CPU."""

    platforms = ("cpu", "gpu")


@pytest.fixture
def stand_in(monkeypatch, use_backend):
    """The flash backend on a simulated A100 under JAX 0.8 (flash-attn-jax serves), the stand-in as the library."""
    monkeypatch.setattr(flash_attn_jax, "load", StandIn)
    use_backend("flash", _FlashAttnJaxOnCpu())
    with machine.simulated("A100", versions_=SERVES):
        yield


@pytest.mark.parametrize("case", [name for name, case in conformance.CASES.items() if case.structured])
def test_matches_openpi_through_the_adapter(stand_in, case: str) -> None:
    problem = conformance.problem_of(conformance.CASES[case], "bfloat16", "gpu")
    assert providers.choose(machine.gpu(), problem.head_dim).name == "flash-attn-jax"
    conformance.check("flash", conformance.CASES[case], "bfloat16")


def _no_scale(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """The adapter's call without softmax_scale: the library's default 1/sqrt(d) scales q twice."""
    return StandIn().flash_mha_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, is_causal=causal)


def _short_max(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """max_seqlen_q below a segment's length: the kernel would overrun its buffers."""
    return StandIn().flash_mha_varlen(
        q, k, v, cu_q, cu_k, max_seqlen_q=1, max_seqlen_k=max_k, softmax_scale=1.0, is_causal=causal
    )


def _unsigned_offsets(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """Offsets in another integer type than the library's int32 buffers."""
    return StandIn().flash_mha_varlen(
        q, k, v, cu_q.astype(jnp.uint32), cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=1.0
    )


@pytest.mark.parametrize("broken", [_no_scale, _short_max, _unsigned_offsets])
def test_a_wrong_call_of_the_library_fails(stand_in, use_backend, broken) -> None:
    use_backend("flash", _FlashAttnJaxOnCpu(varlen=broken))
    with pytest.raises(AssertionError):
        conformance.check("flash", conformance.CASES["pi0_fast"], "bfloat16")


def test_the_library_gets_jax_s_multiprocessor_count(monkeypatch) -> None:
    """Its modules' `get_sm_count` (ctypes.CDLL("libcudart.so"), absent from pip's CUDA runtime) is replaced."""
    original = lambda device_idx=0: 1 / 0  # noqa: E731
    fwd, bwd = types.ModuleType("flash_attn_jax.varlen_fwd"), types.ModuleType("flash_attn_jax.varlen_bwd")
    fwd.get_sm_count = bwd.get_sm_count = original
    monkeypatch.setitem(sys.modules, fwd.__name__, fwd)
    monkeypatch.setitem(sys.modules, bwd.__name__, bwd)
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(core_count=132)])
    flash_attn_jax._multiprocessors_from_jax()
    assert fwd.get_sm_count() == 132 and bwd.get_sm_count(0) == 132


# --- the real library, where it imports ----------------------------------------------------------------------------


def _real_library():
    """flash_attn_jax, importable on CPU once a CUDA 12 runtime is loaded (pip's nvidia-cuda-runtime-cu12)."""
    if importlib.util.find_spec("flash_attn_jax") is None:
        pytest.skip("flash-attn-jax is not installed (pip install 'flashpatch[flash-attn-jax]')")
    runtime = importlib.util.find_spec("nvidia.cuda_runtime")
    if runtime is not None:
        for folder in runtime.submodule_search_locations or ():
            path = os.path.join(folder, "lib", "libcudart.so.12")
            if os.path.exists(path):
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    try:
        import flash_attn_jax as library
    except (ImportError, OSError) as err:
        pytest.skip(f"flash-attn-jax does not import here: {err}")
    return library


def test_the_stand_in_has_the_library_s_signature() -> None:
    library = _real_library()

    def parameters(function) -> list:
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    assert parameters(library.flash_mha_varlen) == parameters(StandIn().flash_mha_varlen)


def test_the_adapter_s_call_traces_through_the_real_library(monkeypatch) -> None:
    """Abstract evaluation runs the library's own frontend, custom VJP and shape rules, forward and backward."""
    library = _real_library()
    monkeypatch.setattr(flash_attn_jax, "load", lambda: library)
    rows, keys, heads, kv_heads, width = 96, 160, 8, 1, 256
    q = jax.ShapeDtypeStruct((rows, heads, width), jnp.bfloat16)
    k = v = jax.ShapeDtypeStruct((keys, kv_heads, width), jnp.bfloat16)
    cu_q = jnp.asarray([0, 40, 40, 96], jnp.int32)
    cu_k = jnp.asarray([0, 0, 100, 160], jnp.int32)

    def loss(q, k, v, causal):
        out = flash_attn_jax.varlen(q, k, v, cu_q, cu_k, 56, 100, causal)
        return jnp.sum(out.astype(jnp.float32)), out

    for causal in (False, True):
        (_, out), grads = jax.eval_shape(
            jax.value_and_grad(lambda q, k, v, c=causal: loss(q, k, v, c), argnums=(0, 1, 2), has_aux=True), q, k, v
        )
        assert (out.shape, out.dtype) == ((rows, heads, width), jnp.bfloat16)
        assert [(g.shape, g.dtype) for g in grads] == [(x.shape, x.dtype) for x in (q, k, v)]


def test_the_adapter_s_call_lowers_for_cuda_through_the_real_library(monkeypatch) -> None:
    """Lowered for CUDA on this CPU (jax.export), through the library's own lowering rules: the FFI calls of its
    forward and backward with the adapter's attributes. Its multiprocessor count comes from the shim (the
    library's own asks the CUDA runtime for a GPU, which fails here)."""
    from jax import export

    library = _real_library()
    monkeypatch.setattr(flash_attn_jax, "load", lambda: library)
    for name in flash_attn_jax._COUNTING_MODULES:
        monkeypatch.setattr(sys.modules[name], "get_sm_count", sys.modules[name].get_sm_count)
    monkeypatch.setattr(flash_attn_jax, "_jax_multiprocessors", lambda device_idx=0: 108)
    flash_attn_jax._multiprocessors_from_jax()
    q = jax.ShapeDtypeStruct((96, 8, 256), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((160, 1, 256), jnp.bfloat16)
    offsets = jax.ShapeDtypeStruct((4,), jnp.int32)

    def loss(q, k, v, cu_q, cu_k):
        return jnp.sum(flash_attn_jax.varlen(q, k, v, cu_q, cu_k, 56, 100, True).astype(jnp.float32))

    targets = ("flash_mha_varlen_fwd", "flash_mha_varlen_bwd")
    exported = export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(t) for t in targets],
    )(q, k, k, offsets, offsets)
    text = exported.mlir_module()
    for target in targets:
        call = next(line for line in text.splitlines() if f"custom_call @{target}(" in line)
        assert "is_causal = true" in call and "max_seqlen_q = 56" in call and "max_seqlen_k = 100" in call, call
        assert "softmax_scale = 1.0" in call, call


def test_the_stand_in_computes_the_contract() -> None:
    """Against `segments.reference_varlen` directly: scale 1 gives the contract's value, rows with no keys 0."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(12, 4, 16)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(10, 2, 16)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(10, 2, 16)), jnp.bfloat16)
    cu_q, cu_k = jnp.asarray([0, 5, 12], jnp.int32), jnp.asarray([0, 0, 10], jnp.int32)
    got = StandIn().flash_mha_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=7, max_seqlen_k=10, softmax_scale=1.0)
    want = segments.reference_varlen(q, k, v, cu_q, cu_k, 7, 10, False)
    assert bool(jnp.all(got[:5] == 0)) and float(jnp.max(jnp.abs(got.astype(float) - want.astype(float)))) < 1e-2
