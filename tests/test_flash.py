"""The flash backend's decomposition of openpi's masks into varlen kernel calls, on CPU.

The kernel is FlashAttention's on a GPU; here `segments.reference_varlen`, the kernel's contract in
plain JAX, stands in for it, so everything else (runs, slots, key copies, the causal call, the
fallback, NaN safety) runs through the conformance kit. The GPU conformance suite runs the real one.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashpatch import backends
from flashpatch.backends import masks
from flashpatch.backends.base import Backend
from flashpatch.backends.flash import FlashBackend, kernel, segments
from flashpatch.diagnostics import FlashpatchWarning
from flashpatch.testing import conformance, layouts


class _FlashOnCpu(FlashBackend):
    """flash with the kernel's contract in plain JAX: everything but the kernel, on CPU."""

    platforms = ("cpu", "gpu")

    def __init__(self, *args, varlen=segments.reference_varlen, **kwargs):
        super().__init__(*args, varlen=varlen, **kwargs)

    def unsupported(self, problem):
        return Backend.unsupported(self, problem) or (None if problem.half_kv else "flash needs half-precision k and v")


@pytest.fixture
def on_cpu(use_backend):
    def install(**kwargs) -> FlashBackend:
        backend = _FlashOnCpu(**kwargs)
        use_backend("flash", backend)
        return backend

    return install


def _runs(rank_rows):
    rank = jnp.asarray(rank_rows, jnp.int32)
    found = segments.runs(rank)
    return np.asarray(found.start), np.asarray(found.causal)


def test_runs_of_equal_rank_and_causal_staircases() -> None:
    # a prefix piece (rank 3), padding, another piece, a single state row, an action block, a staircase.
    start, causal = _runs([[3, 3, 0, 3, 3, 4, 6, 6, 7, 8, 9]])
    assert start.tolist() == [[True, False, True, True, False, True, True, False, True, False, False]]
    assert causal.tolist() == [[False] * 8 + [True] * 3]


def test_a_single_row_above_a_block_is_its_own_run() -> None:
    """pi0's state row (rank P+1) then its action block (rank P+51): no staircase."""
    start, causal = _runs([[5, 5, 6, 56, 56]])
    assert start.tolist() == [[True, False, True, True, False]] and not causal.any()


def test_pi0_has_no_causal_rows_and_pi0_fast_one_staircase() -> None:
    pi0 = masks.analyze(jnp.asarray(layouts.pi0(3, 64, actions=10, masked_image=1, seed=2).mask))
    fast = masks.analyze(jnp.asarray(layouts.pi0_fast(2, 40, causal=13, masked_image=2, seed=4).mask))
    assert not bool(segments.plan(pi0).has_causal)
    p = segments.plan(fast)
    assert bool(p.has_causal) and bool(p.exact)
    assert np.asarray(segments.runs(fast.rank).causal).sum(axis=1).tolist() == [13, 13]


def test_segments_cover_every_row_and_every_key_copy() -> None:
    mask = jnp.asarray(layouts.pi0(3, 64, actions=10, masked_image=1, seed=2).mask)
    plan = masks.analyze(mask)
    p = segments.plan(plan, 4, 1)
    b, t, s = mask.shape
    for seg, slots in ((p.constant, 4), (p.causal, 1)):
        assert int(seg.cu_q[-1]) == b * t and int(seg.cu_k[-1]) == b * slots * s
        assert bool(jnp.all(jnp.diff(seg.cu_q) >= 0)) and bool(jnp.all(jnp.diff(seg.cu_k) >= 0))


def test_more_runs_than_slots_is_refused() -> None:
    mask = jnp.asarray(layouts.pi0(3, 64, actions=10, masked_image=1, seed=2).mask)  # up to 4 runs a row
    plan = masks.analyze(mask)
    assert bool(segments.plan(plan, 4, 1).exact)
    assert not bool(segments.plan(plan, 3, 1).exact)


STRUCTURED = [name for name, case in conformance.CASES.items() if case.structured]


@pytest.mark.parametrize("case", STRUCTURED)
def test_matches_openpi(on_cpu, case: str) -> None:
    on_cpu()
    conformance.check("flash", conformance.CASES[case], "bfloat16")


def test_arbitrary_mask_takes_the_exact_fallback_with_a_warning(on_cpu) -> None:
    import flashpatch
    from flashpatch import diagnostics

    on_cpu()
    diagnostics.forget()
    q, k, v, mask = conformance.CASES["arbitrary"].arrays("bfloat16")
    with pytest.warns(FlashpatchWarning, match="does not have the structure flash computes"):
        out = jax.block_until_ready(flashpatch.attention(q, k, v, mask, settings="flash"))
    assert conformance.rel_err(out, conformance.float32_reference(q, k, v, mask)) < conformance.TOL["bfloat16"]


def test_too_many_runs_take_the_fallback(on_cpu) -> None:
    on_cpu(constant_slots=1)
    with pytest.raises(AssertionError, match="its fallback ran"):
        conformance.check("flash", conformance.CASES["pi0_masked_image"], "bfloat16")


def test_without_the_causal_call_a_staircase_is_refused(on_cpu) -> None:
    """pi0's target promises no causal runs; a staircase then takes the fallback, exactly."""
    import flashpatch
    from flashpatch import diagnostics

    on_cpu()
    diagnostics.forget()
    case = conformance.CASES["pi0_fast"]
    q, k, v, mask = case.arrays("bfloat16")
    ref = conformance.float32_reference(q, k, v, mask)
    with pytest.warns(FlashpatchWarning, match="does not have the structure flash computes"):
        out = flashpatch.attention(q, k, v, mask, settings="flash", causal_runs=False)
    assert conformance.rel_err(out, ref) < conformance.TOL["bfloat16"]


def _off_by_one(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """A plausible kernel bug: each segment's last key is dropped."""
    cu_short = jnp.concatenate([cu_k[:1], cu_k[1:] - 1])
    return segments.reference_varlen(q, k, v, cu_q, jnp.maximum(cu_short, cu_k[:-1].min()), max_q, max_k, causal)


def _no_causal(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """A kernel that ignores the causal flag."""
    return segments.reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, False)


@pytest.mark.parametrize(("broken", "case"), [(_off_by_one, "pi0_padding_mid"), (_no_causal, "pi0_fast")])
def test_a_broken_kernel_fails_the_suite(on_cpu, broken, case) -> None:
    on_cpu(varlen=broken)
    with pytest.raises(AssertionError):
        conformance.check("flash", conformance.CASES[case], "bfloat16")


def test_key_copy_gradients_are_summed_in_float32() -> None:
    x = jnp.full((1, 3, 1, 2), 1.0, jnp.bfloat16)
    cot = jnp.full((1 * 300 * 3, 1, 2), 1 / 256, jnp.bfloat16)
    _, vjp = jax.vjp(lambda x: segments._copies(x, 300), x)
    (grad,) = vjp(cot)
    assert grad.dtype == jnp.bfloat16 and float(grad[0, 0, 0, 0]) == pytest.approx(300 / 256, rel=1e-2)


def test_the_backend_says_why_it_cannot_run() -> None:
    import dataclasses

    from flashpatch.backends import machine

    flash = backends.get("flash")
    problem = conformance.problem_of(conformance.CASES["pi0_padding_mid"], "bfloat16", "gpu")
    current = {"jax": "0.12.0", "jaxlib": "0.12.0", "flash-attn-jax": None, "dew-flash-attn-cu13": None}
    with machine.simulated("H100", versions_={**current, "dew-flash-attn-cu12": None}):
        assert 'pip install "flashpatch[flash]"' in flash.unsupported(problem)
    with machine.simulated("B200", versions_={**current, "dew-flash-attn-cu12": "0.3.6"}):
        assert "no code for compute capability 10.0" in flash.unsupported(problem)
    with machine.simulated("H100", versions_={**current, "dew-flash-attn-cu12": "0.3.6"}):
        assert flash.unsupported(problem) is None
        assert "up to 256" in flash.unsupported(dataclasses.replace(problem, head_dim=512))
        assert "bfloat16" in flash.unsupported(dataclasses.replace(problem, k_dtype="float32", v_dtype="float32"))
    with machine.simulated(None, versions_={**current, "dew-flash-attn-cu12": "0.3.6"}):
        assert "need an NVIDIA GPU" in flash.unsupported(problem)


def test_no_warning_on_openpi_masks(on_cpu) -> None:
    on_cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlashpatchWarning)
        conformance.check("flash", conformance.CASES["suffix_over_cache"], "bfloat16")


def test_a_wheel_for_the_other_cuda_major_is_named_with_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(kernel, "cuda_majors", lambda: (13, 12))
    kernel.load.cache_clear()
    try:
        reason = kernel.load()
    finally:
        kernel.load.cache_clear()
    assert isinstance(reason, str)
    assert "built for CUDA 12 but JAX runs CUDA 13" in reason and 'pip install "flashpatch[flash-cu13]"' in reason


def test_the_packing_is_hoisted_out_of_the_layer_loop(on_cpu) -> None:
    """Under a scan over layers (openpi's nn.scan) the mask's analysis, the key order and the segment
    offsets depend on the mask alone: XLA moves them out of the loop, once per model call."""
    from helpers import sorts_in_a_layer_loop

    on_cpu()
    total, in_loop = sorts_in_a_layer_loop("flash", "pi0_masked_image", "bfloat16")
    assert total >= 1 and in_loop == 0, "the key sort runs in every layer"
