"""The pallas backend: its kernels against float32 einsum, its tiling arithmetic, and the conformance kit.

On CPU the kernels run in Pallas' interpreter (the same kernel code Triton compiles on a GPU), with
the small `tiling.INTERPRET` tiles, which differ per pass so that block boundaries and paddings fall
differently in the forward, dK/dV and dQ kernels.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import openpi_problem

import flashpatch
from flashpatch import backends
from flashpatch.backends import masks
from flashpatch.backends.base import ChainBackend, Problem
from flashpatch.backends.pallas import PallasBackend, compat, kernel, tiling
from flashpatch.core import selection
from flashpatch.testing import conformance, layouts
from flashpatch.testing.conformance import assert_finite, rel_err

TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 5e-3}


# --- the kernel against a float32 einsum ---


def prefix_reference(q, k, v, rank):
    """float32 softmax attention where row t attends keys [0, rank[b, t]); rows with rank 0 give 0."""
    g = q.shape[2] // k.shape[2]
    kk = jnp.repeat(k.astype(jnp.float32), g, axis=2)
    vv = jnp.repeat(v.astype(jnp.float32), g, axis=2)
    visible = jnp.arange(k.shape[1])[None, None, :] < rank[:, :, None]  # (B, T, S)
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kk)
    logits = jnp.where(visible[:, None], logits, -jnp.inf)
    logits = jnp.where(jnp.any(visible, -1)[:, None, :, None], logits, 0.0)
    out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), vv)
    return jnp.where((rank > 0)[:, :, None, None], out, 0.0)


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """Ranks (B, T) and head shapes; keys S = rank's bound (or more)."""

    rank: np.ndarray
    kv_len: int
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 16

    def arrays(self, dtype, seed: int = 0):
        b, t = self.rank.shape
        kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
        q = jax.random.normal(kq, (b, t, self.num_heads, self.head_dim)) * self.head_dim**-0.5
        k = jax.random.normal(kk, (b, self.kv_len, self.num_kv_heads, self.head_dim))
        v = jax.random.normal(kv, (b, self.kv_len, self.num_kv_heads, self.head_dim))
        cot = jax.random.normal(kc, q.shape)
        return q.astype(dtype), k.astype(dtype), v.astype(dtype), jnp.asarray(self.rank, jnp.int32), cot


def _ranks(layout_mask: np.ndarray) -> np.ndarray:
    """The chain form's rank per row of an openpi mask (the kernel sees keys already sorted)."""
    return np.asarray(masks.analyze(jnp.asarray(layout_mask)).rank)


def _kernel_cases() -> dict[str, KernelCase]:
    pi0 = _ranks(layouts.pi0(2, 40, actions=9, masked_image=1, seed=1).mask)
    fast = _ranks(layouts.pi0_fast(2, 36, causal=11, masked_image=2, seed=4).mask)
    odd = _ranks(layouts.pi0(1, 30, actions=6, seed=5).mask)  # batch 1, T = S = 37
    cache = np.asarray(conformance.CASES["suffix_over_cache"].mask.sum(-1), np.int32)  # T=10 over S=50
    return {
        "pi0": KernelCase(pi0, pi0.shape[1]),
        "pi0_fast": KernelCase(fast, fast.shape[1]),
        "decode_t1": KernelCase(np.array([[18], [27]], np.int32), 41),
        "batch1_odd_37": KernelCase(odd, 37),
        "suffix_over_cache": KernelCase(cache, 50),
        "gqa_2kv": KernelCase(pi0, pi0.shape[1], num_heads=4, num_kv_heads=2),
        "mha_head_dim_24": KernelCase(odd, 37, num_heads=2, num_kv_heads=2, head_dim=24),
        "head_dim_256": KernelCase(np.array([[5, 0, 17, 17, 12]], np.int32), 19, num_heads=2, head_dim=256),
    }


KERNEL_CASES = _kernel_cases()


def check_kernel(case: KernelCase, dtype: str, *, config: tiling.Config | None = None) -> None:
    """Raise AssertionError where the kernel's forward or gradients differ from the float32 reference."""
    q, k, v, rank, cot = case.arrays(dtype)
    attend = lambda q, k, v: kernel.flash_attention(q, k, v, rank, config=config)  # noqa: E731
    out = jax.jit(attend)(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    assert_finite(out, "output")
    rows = (rank > 0)[:, :, None, None]
    tol = TOL[dtype]
    ref = prefix_reference(q, k, v, rank)
    err = rel_err(out, ref, rows)
    assert err < tol, f"forward rel.err {err:.2e} >= {tol}"

    # The cotangent is not zero on rows with rank 0: they must still contribute nothing.
    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * cot)

    grads = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: prefix_reference(q, k, v, rank)), argnums=(0, 1, 2))(q, k, v)
    assert_finite(grads, "gradients")
    for name, got, exp in zip("qkv", grads, want, strict=True):
        assert got.dtype == jnp.dtype(dtype), (name, got.dtype)
        err = rel_err(got, exp)
        assert err < tol, f"d{name} rel.err {err:.2e} >= {tol}"
    assert not np.any(np.asarray(grads[0], np.float32)[~np.asarray(rank > 0)]), "rows with no key got a dq"


@pytest.mark.parametrize("case", list(KERNEL_CASES), ids=str)
def test_kernel_matches_float32(case: str) -> None:
    check_kernel(KERNEL_CASES[case], "float32")


#: bf16 kernels compile slowly on CPU under jax 0.5.3 (XLA's LLVM passes, ~40 s for pi0's fwd+bwd; 3 s on 0.12):
#: one layout in the quick subset.
@pytest.mark.parametrize("case", ["pi0", pytest.param("pi0_fast", marks=pytest.mark.slow), "batch1_odd_37"])
def test_kernel_bf16(case: str) -> None:
    check_kernel(KERNEL_CASES[case], "bfloat16")


def test_kernel_f16() -> None:
    check_kernel(KERNEL_CASES["decode_t1"], "float16")


def test_kernel_with_other_tiles() -> None:
    """Tiles larger than the sequence and tiles of one size in every pass give the same answer."""
    big = tiling.Config("big", tiling.Tile(64, 64), tiling.Tile(64, 64), tiling.Tile(64, 64))
    check_kernel(KERNEL_CASES["pi0"], "float32", config=big)
    check_kernel(KERNEL_CASES["pi0_fast"], "float32", config=tiling.SMALLEST)


def test_nan_in_padding_does_not_leak() -> None:
    """NaN in q of rows with rank 0 and in k at or past the batch row's largest rank changes nothing."""
    case = KERNEL_CASES["pi0"]
    q, k, v, rank, cot = case.arrays("float32")
    q_nan = jnp.where((rank > 0)[:, :, None, None], q, jnp.nan)
    beyond = jnp.arange(k.shape[1])[None, :] >= jnp.max(rank, axis=1, keepdims=True)
    assert bool(jnp.any(beyond)) and bool(jnp.any(rank == 0))
    k_nan = jnp.where(beyond[:, :, None, None], jnp.nan, k)

    def run(q, k, v):
        loss = lambda q, k, v: jnp.sum(kernel.flash_attention(q, k, v, rank) * cot)  # noqa: E731
        return kernel.flash_attention(q, k, v, rank), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    run = jax.jit(run)
    clean_out, clean_grads = run(q, k, v)
    out, grads = run(q_nan, k_nan, v)
    assert_finite((out, grads), "output and gradients with NaN padding")
    real = np.asarray(rank > 0)
    np.testing.assert_array_equal(np.asarray(out)[real], np.asarray(clean_out)[real])
    np.testing.assert_array_equal(np.asarray(grads[0])[real], np.asarray(clean_grads[0])[real])
    np.testing.assert_array_equal(np.asarray(grads[0])[~real], 0.0)
    np.testing.assert_array_equal(grads[2], clean_grads[2])
    keep = ~np.asarray(beyond)
    np.testing.assert_array_equal(np.asarray(grads[1])[keep], np.asarray(clean_grads[1])[keep])


def test_all_rows_empty_is_finite() -> None:
    """A batch row where no row attends anything: output and gradients finite, gradients zero."""
    case = KernelCase(np.array([[0, 0, 0], [2, 0, 3]], np.int32), 5)
    q, k, v, rank, cot = case.arrays("float32")
    loss = lambda q, k, v: jnp.sum(kernel.flash_attention(q, k, v, rank) * cot)  # noqa: E731
    out = kernel.flash_attention(q, k, v, rank)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert_finite((out, grads))
    for g in (out, *grads):
        assert not np.any(np.asarray(g)[0])


def _assert_broken_kernel_fails(monkeypatch, fault: str) -> None:
    monkeypatch.setattr(kernel, "_FAULT", fault)
    try:
        with pytest.raises(AssertionError, match=r"rel\.err"):
            check_kernel(KERNEL_CASES["pi0_fast"], "float32")
    finally:
        jax.clear_caches()  # no trace of the broken kernel may serve a later test


def test_an_off_by_one_rank_bound_fails_the_check(monkeypatch) -> None:
    _assert_broken_kernel_fails(monkeypatch, "rank_off_by_one")


def test_a_dropped_rescale_fails_the_check(monkeypatch) -> None:
    _assert_broken_kernel_fails(monkeypatch, "no_rescale")


def test_the_kernel_itself_runs() -> None:
    """Through flashpatch.attention, the forward is one pallas_call and the gradient adds dQ and dK/dV (no fallback)."""
    case = conformance.CASES["pi0_padding_mid"]
    q, k, v, mask = case.arrays("float32")
    settings = flashpatch.Settings(backend="pallas")
    attend = lambda q, k, v, mask: flashpatch.attention(q, k, v, mask, settings=settings)  # noqa: E731
    forward = compat.pallas_call_names(jax.make_jaxpr(attend)(q, k, v, mask))
    assert forward == ["flashpatch_attention_fwd"]
    loss = lambda q, k, v, mask: jnp.sum(attend(q, k, v, mask))  # noqa: E731
    backward = compat.pallas_call_names(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, mask))
    assert sorted(backward) == ["flashpatch_attention_dkv", "flashpatch_attention_dq", "flashpatch_attention_fwd"]


def _pretend_a_gpu(monkeypatch) -> None:
    """JAX 0.12 asks the local GPU for its compute capability while lowering a Triton call; 0.5.3 does not."""
    try:
        from jax._src.pallas.triton import gpu_info, pallas_call_registration
    except ImportError:  # 0.5.3: lowering falls back to sm80 by itself
        return
    h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h200)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernels_lower_to_triton(monkeypatch, dtype: str) -> None:
    """Without a GPU: every pass lowers to Triton IR for CUDA (each primitive has a Triton rule, tiles have legal
    shapes), at openpi's head_dim 256 with the sm90 tiles. Triton's own compilation is left to the GPU."""
    from jax import export

    _pretend_a_gpu(monkeypatch)
    config = tiling.config_for("9.0", 256, dtype)
    q = jax.ShapeDtypeStruct((2, 37, 8, 256), dtype)
    kv = jax.ShapeDtypeStruct((2, 37, 1, 256), dtype)
    rank = jax.ShapeDtypeStruct((2, 37), jnp.int32)

    def grads(q, k, v, rank):
        loss = lambda q, k, v: jnp.sum(kernel.flash_attention(q, k, v, rank, config=config, interpret=False))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    target = "__gpu$xla.gpu.triton"
    exported = export.export(
        jax.jit(grads), platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(target)]
    )(q, kv, kv, rank)
    assert exported.mlir_module().count(f"@{target}") + exported.mlir_module().count(f'"{target}"') == 3


def test_the_kernel_is_called(monkeypatch) -> None:
    calls = []
    real = kernel.flash_attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernel, "flash_attention", counting)
    case = conformance.CASES["decode_t1"]
    q, k, v, mask = case.arrays("float32")
    flashpatch.attention(q, k, v, mask, settings=flashpatch.Settings(backend="pallas"))
    assert len(calls) == 1 and calls[0]["interpret"] is True


def test_rank_gets_no_gradient_and_bad_shapes_are_refused() -> None:
    case = KERNEL_CASES["decode_t1"]
    q, k, v, rank, _ = case.arrays("float32")
    with pytest.raises(ValueError, match="rank must be"):
        kernel.flash_attention(q, k, v, rank[:, :0])
    with pytest.raises(ValueError, match="multiple of"):
        kernel.flash_attention(q[:, :, :3], k[:, :, :1].repeat(2, axis=2), v[:, :, :1].repeat(2, axis=2), rank)
    # rank is an integer input of the custom VJP: differentiating the rest leaves it alone
    jax.grad(lambda q: jnp.sum(kernel.flash_attention(q, k, v, rank)))(q)


def test_fold_queries_round_trip() -> None:
    q = jnp.arange(2 * 3 * 6 * 2, dtype=jnp.float32).reshape(2, 3, 6, 2)
    folded = kernel.fold_queries(q, 2)
    assert folded.shape == (2, 2, 9, 2)
    # row t*G + g of kv head kh is query head kh*G + g of token t
    np.testing.assert_array_equal(folded[1, 1, 2 * 3 + 1], q[1, 2, 1 * 3 + 1])
    np.testing.assert_array_equal(kernel.unfold_queries(folded, 3), q)


def test_tile_schedules() -> None:
    rank = jnp.array([[3, 3, 0, 0, 9, 9, 9, 9]], jnp.int32)  # q tiles of 2 rows: (3,3) (0,0) (9,9) (9,9)
    hi, lo = kernel._row_tile_bounds(rank, 2)
    np.testing.assert_array_equal(hi, [[3, 0, 9, 9]])
    np.testing.assert_array_equal(lo, [[3, 0, 9, 9]])
    order, n_full, n_all = kernel._key_tile_schedule(rank, 2, 4, 12)  # key tiles [0,4) [4,8) [8,12)
    np.testing.assert_array_equal(n_full, [[2, 2, 0]])  # tiles 2 and 3 see keys [0,8) whole
    np.testing.assert_array_equal(n_all, [[3, 2, 2]])  # tile 0 sees part of [0,4); tile 1 nothing
    np.testing.assert_array_equal(order[0, 0, :3], [2, 3, 0])
    np.testing.assert_array_equal(order[0, 2, :2], [2, 3])


# --- tiling: the shared-memory arithmetic per generation ---

GENERATIONS = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def test_configs_fit_shared_memory() -> None:
    for cc in GENERATIONS:
        for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
            for head_dim in (64, 96, 128, 256):
                config = tiling.config_for(cc, head_dim, dtype)
                used = tiling.shared_memory(config, head_dim, dtype, cc)
                assert max(used.values()) <= tiling.shared_memory_limit(cc), (cc, config.name, used)


def test_generations_differ_where_they_must() -> None:
    bf16 = jnp.bfloat16
    sm90, sm80, sm86 = (tiling.config_for(cc, 256, bf16) for cc in ("9.0", "8.0", "8.6"))
    assert tiling.config_for("8.9", 256, bf16) == sm86
    assert len({sm90, sm80, sm86}) == 3
    # sm90's first choice does not fit an A100, and the A100's does not fit a 99 KiB part
    assert not tiling.fits(sm90, "8.0", 256, bf16)
    assert not tiling.fits(sm80, "8.6", 256, bf16)
    assert tiling.shared_memory_limit("8.6") == 99 * 1024 < tiling.shared_memory_limit("8.0")
    assert tiling.shared_memory_limit("9.0") == 227 * 1024
    # float32 tiles are twice the size: sm90 moves down its list
    assert tiling.config_for("9.0", 256, jnp.float32) != sm90
    assert tiling.config_for(None, 256, bf16) == tiling.INTERPRET


def test_docstring_arithmetic_is_the_model() -> None:
    """The worked numbers in tiling's docstring are what `shared_memory` computes (less the reserve)."""
    doc = tiling.__doc__
    for cc, name in (("9.0", "sm90-128x64"), ("10.0", "sm100-64x64"), ("8.0", "sm80-128x32"), ("8.6", "sm86-64x32")):
        config = next(c for c in tiling.candidates(cc) if c.name == name)
        assert tiling.config_for(cc, 256, jnp.bfloat16) == config
        used = tiling.shared_memory(config, 256, jnp.bfloat16, cc)
        kib = {k: (v - tiling.RESERVE) // 1024 for k, v in used.items()}
        lines = doc[doc.index(f'"{name}"') :].splitlines()[:3]  # forward, dK/dV, dQ
        stated = [int(re.search(r"= +(\d+) KiB", line).group(1)) for line in lines]
        assert stated == [kib["forward"], kib["dkv"], kib["dq"]], (name, stated, kib)


def test_candidates_and_capabilities() -> None:
    assert tiling.parse_capability("9.0") == tiling.parse_capability("sm_90") == tiling.parse_capability("90") == (9, 0)
    assert tiling.candidates("9.0") == tiling.SM90 and tiling.candidates("8.0") == tiling.SM80
    assert tiling.candidates("8.6") == tiling.candidates("8.9") == tiling.candidates("12.0") == tiling.SM86
    assert tiling.candidates("10.0") == (*tiling.SM100, *tiling.SM90)
    assert tiling.parse_capability("10.0") == tiling.parse_capability("100") == (10, 0)
    assert tiling.candidates(None) == (tiling.INTERPRET,)
    assert tiling.config_for("8.6", 256, jnp.float32) == tiling.SMALLEST  # nothing larger fits 99 KiB
    with pytest.raises(ValueError, match="power of two"):
        tiling.Tile(48, 32)


# --- precision and dtype: what the GPU does that interpret mode does not show ---


def _dot_precisions(a_dtype, b_dtype) -> list:
    a, b = jnp.ones((16, 32), a_dtype), jnp.ones((32, 16), b_dtype)
    jaxpr = jax.make_jaxpr(compat.dot)(a, b)
    return [eqn.params["precision"] for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]


def test_float32_products_are_ieee_half_products_default() -> None:
    # Triton lowers DEFAULT precision on float32 to TF32 (jax's Triton lowering, 0.5.3 and 0.12); HIGHEST to IEEE.
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert _dot_precisions(jnp.float32, jnp.float32) == [highest]
    assert _dot_precisions(jnp.bfloat16, jnp.bfloat16) == [None]


def test_float32_q_runs_the_kernel_in_the_keys_half_dtype(monkeypatch) -> None:
    # pi0-FAST keeps q in float32 beside bf16 keys: promoting made its H200 step slower than the einsum.
    seen = []

    def spy(q, k, v, rank, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return jnp.zeros(q.shape, q.dtype)

    monkeypatch.setattr(kernel, "flash_attention", spy)
    case = conformance.CASES["pi0_fast"]
    q, k, v, mask = case.arrays("bfloat16")
    jax.eval_shape(lambda q: flashpatch.attention(q, k, v, mask, settings="pallas"), q.astype(jnp.float32))
    assert seen == [(jnp.dtype(jnp.bfloat16),) * 3]
    seen.clear()
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    jax.eval_shape(lambda q: flashpatch.attention(q, k32, v32, mask, settings="pallas"), q32)
    assert seen == [(jnp.dtype(jnp.float32),) * 3]


def test_float32_q_beside_half_keys_matches_float32() -> None:
    # pi0-FAST's dtypes: q in float32, k and v in bf16. The kernel rounds q to bf16; the result stays within
    # bf16's tolerance of openpi's math in float32, forward and gradients.
    q, k, v, mask = conformance.CASES["pi0_fast"].arrays("bfloat16")
    q = q.astype(jnp.float32)
    attend = jax.jit(lambda q, k, v: flashpatch.attention(q, k, v, mask, settings="pallas"))
    out = attend(q, k, v)
    ref = conformance.float32_reference(q, k, v, mask)
    assert out.dtype == jnp.float32
    assert rel_err(out, ref) < conformance.TOL["bfloat16"]
    cot = jax.random.normal(jax.random.PRNGKey(3), out.shape, jnp.float32)
    got = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) * cot), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda q, k, v: jnp.sum(conformance.float32_reference(q, k, v, mask) * cot), (0, 1, 2))(q, k, v)
    assert_finite(got, "gradients")
    for name, g, w in zip("qkv", got, want, strict=True):
        assert rel_err(g, w) < conformance.TOL["bfloat16"], name


# --- the backend ---


def _problem(**changes) -> Problem:
    return openpi_problem(**{"q_len": 40, "kv_len": 40, **changes})


def test_backend_declares_and_refuses() -> None:
    backend = backends.get("pallas")
    assert isinstance(backend, PallasBackend) and backend.name == "pallas"
    assert isinstance(backend, ChainBackend) and backend.fallback is None  # the fastest exact path here
    assert backend.platforms == ("cpu", "gpu")
    assert backend.unsupported(_problem()) is None
    assert "head_dim up to 256" in backend.unsupported(_problem(head_dim=288))
    assert "tpu" in backend.unsupported(_problem(platform="tpu"))
    assert "int8" in backend.unsupported(_problem(q_dtype="int8"))
    assert any("pallas" in rule.backends and rule.platform == "gpu" for rule in selection.RULES)
    assert not any("pallas" in rule.backends for rule in selection.RULES if rule.platform == "cpu")


# --- the conformance kit (the "arbitrary" case runs the core's in-graph fallback) ---


@pytest.mark.parametrize(("case", "dtype"), list(conformance.params("pallas")), ids=str)
def test_conformance(case: str, dtype: str) -> None:
    reason = conformance.skip_reason("pallas", dtype)
    if reason is not None:
        pytest.skip(reason)
    conformance.check("pallas", conformance.CASES[case], dtype)
