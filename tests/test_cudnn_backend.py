"""The cudnn backend: what it accepts, how it prepares masks, and (on a GPU) that cuDNN computes openpi's attention.

On CPU, the backend's whole preparation (lengths or dense mask, even padding, zeroed unused
queries and keys) runs with JAX's XLA attention in place of cuDNN, through the conformance checks.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, assert_finite, openpi_problem, rel_err

import flashpatch
from flashpatch import backends
from flashpatch.backends import cudnn
from flashpatch.backends.base import Backend, Problem
from flashpatch.diagnostics import FlashpatchWarning
from flashpatch.testing import layouts
from flashpatch.testing.conformance import CASES, Case, check, float32_reference


def _problem(**changes) -> Problem:
    """openpi's shapes on an H100-like GPU: 8 query heads, 1 kv head, head dim 256, bf16."""
    return openpi_problem(**changes)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend to run on a CUDA GPU with the given capability and cuDNN; JAX's own checks pass."""

    def set_gpu(capability=(9, 0), version=90800):
        monkeypatch.setattr(cudnn, "compute_capability", lambda: capability)
        monkeypatch.setattr(cudnn, "cudnn_version", lambda: version)
        monkeypatch.setattr(cudnn, "jax_rejects", lambda problem, use_seq_lengths=True: None)

    set_gpu()
    return set_gpu


def test_registered_and_gpu_only() -> None:
    assert "cudnn" in backends.names()
    backend = backends.get("cudnn")
    assert backend.platforms == ("gpu",)
    if jax.default_backend() == "cpu":
        assert "runs on gpu, not cpu" in backend.unsupported(_problem(platform="cpu"))


@pytest.mark.parametrize(
    ("changes", "gpu", "expected"),
    [
        ({}, {}, None),
        ({"q_dtype": "float32", "probs_dtype": "float32"}, {}, None),  # gemma_fast: q cast to k's dtype
        ({"head_dim": 128}, {"capability": (8, 0), "version": 8904}, None),
        ({"head_dim": 256}, {"capability": (8, 9)}, "only on Hopper or newer; this GPU has compute capability 8.9"),
        ({"head_dim": 256}, {"version": 90400}, "only with cuDNN 9.5.0 or newer; JAX loaded 9.4.0"),
        ({"head_dim": 256}, {"capability": (10, 0), "version": 92200}, "needs cuDNN 9.23.0 or newer"),
        ({"head_dim": 256}, {"capability": (10, 0), "version": 92300}, None),
        ({"head_dim": 256}, {"capability": (12, 0), "version": 92500}, "no backward for head dim 256"),
        ({"head_dim": 128}, {"capability": (12, 0), "version": 90501}, None),
        ({"head_dim": 12}, {}, "multiple of 8 and at most 256; got 12"),
        ({"head_dim": 264}, {}, "multiple of 8 and at most 256; got 264"),
        ({"kv_len": 1}, {}, "kv length 1"),
        ({"k_dtype": "float32", "v_dtype": "float32"}, {}, "half-precision dtype"),
        ({"v_dtype": "float16"}, {}, "half-precision dtype"),
        ({"q_dtype": "float64"}, {}, "q is float64"),
        ({"platform": "cpu"}, {}, "runs on gpu, not cpu"),
        ({"head_dim": 64}, {"capability": (7, 5)}, "compute capability 8.0 or newer"),
        ({"head_dim": 64}, {"version": 8900}, "cuDNN 8.9.4 or newer; JAX loaded 8.9.0"),
        ({}, {"capability": None}, "NVIDIA GPU under CUDA"),
        ({}, {"version": None}, "JAX reports no cuDNN"),
    ],
)
def test_limits(fake_gpu, changes, gpu, expected) -> None:
    fake_gpu(**gpu)
    reason = cudnn.CudnnBackend().unsupported(_problem(**changes))
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, reason


def test_jax_refusal_is_a_reason(fake_gpu, monkeypatch) -> None:
    monkeypatch.setattr(cudnn, "jax_rejects", lambda problem, use_seq_lengths=True: "JAX's cuDNN attention refuses it")
    assert cudnn.CudnnBackend().unsupported(_problem()) == "JAX's cuDNN attention refuses it"


@pytest.fixture
def jax_sees_cudnn(monkeypatch):
    """Let JAX trace its cuDNN attention on CPU (nothing is compiled): it reads cuDNN 9.8.0."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
    cudnn.jax_rejects.cache_clear()
    yield
    cudnn.jax_rejects.cache_clear()


@pytest.mark.parametrize("use_seq_lengths", [True, False], ids=["lengths", "dense"])
def test_jax_accepts_odd_lengths_under_grad(jax_sees_cudnn, use_seq_lengths: bool) -> None:
    """JAX refuses odd T or S under differentiation; the backend's even padding gets past that."""
    problem = _problem(head_dim=128, q_len=51, kv_len=867)
    assert cudnn.jax_rejects(problem, use_seq_lengths) is None
    q = jax.ShapeDtypeStruct((2, 51, 8, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 867, 1, 128), jnp.bfloat16)

    def raw(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation="cudnn").astype(jnp.float32))

    with pytest.raises(NotImplementedError, match="sequence length"):
        jax.eval_shape(jax.grad(raw, argnums=(0, 1, 2)), q, kv, kv)


def test_jax_refusal_is_reported(jax_sees_cudnn) -> None:
    reason = cudnn.jax_rejects(_problem(head_dim=264))
    assert reason is not None and reason.startswith("JAX's cuDNN attention refuses it") and "264" in reason


def _padding_right(q_lens, kv_lens, t: int, s: int) -> np.ndarray:
    rows = np.arange(t)[None, :, None] < np.asarray(q_lens)[:, None, None]
    cols = np.arange(s)[None, None, :] < np.asarray(kv_lens)[:, None, None]
    return rows & cols


def _decode(start, filled, cache: int) -> np.ndarray:
    idx = np.arange(cache)
    return ((idx >= np.asarray(start)[:, None]) & (idx <= np.asarray(filled)[:, None]))[:, None, :]


#: Padding-right masks of several kinds, an example with no key at all included.
RIGHT_PADDED = Case("right_padded", _padding_right([5, 0, 9], [7, 0, 12], t=9, s=13))


@pytest.mark.parametrize(
    ("mask", "lengths"),
    [
        (RIGHT_PADDED.mask, ([5, 1, 9], [7, 1, 12])),
        (layouts.prefix_only(2, 29, pad=5).mask, ([24, 24], [24, 24])),
        (_decode([0, 0], [17, 30], cache=41), ([1, 1], [18, 31])),
        (np.ones((1, 3, 4), bool), ([3], [4])),
        (_decode([0, 4], [17, 30], cache=41), None),
        (layouts.causal(1, 6).mask, None),
        (layouts.pi0(2, 48, actions=10, seed=0).mask, None),
        (layouts.prefix_only(1, 6).mask & ~np.eye(6, dtype=bool)[None], None),
    ],
    ids=["right_padded", "prefix_padded", "decode_from_0", "full", "decode_from_4", "causal", "pi0", "holes"],
)
def test_padding_right_lengths(mask, lengths) -> None:
    got = jax.jit(cudnn.padding_right_lengths)(jnp.asarray(mask))
    assert bool(got.exact) == (lengths is not None)
    if lengths is not None:
        np.testing.assert_array_equal(got.q, lengths[0])
        np.testing.assert_array_equal(got.kv, lengths[1])


def test_dense_mask_sends_empty_rows_to_key_zero() -> None:
    mask = CASES["arbitrary"].mask
    empty = ~mask.any(axis=2)
    assert empty.any() and (~empty).any()
    got = np.asarray(cudnn.dense_mask(jnp.asarray(mask)))
    np.testing.assert_array_equal(got[~empty], mask[~empty])
    np.testing.assert_array_equal(got[empty], np.broadcast_to(np.arange(mask.shape[2]) == 0, got[empty].shape))


def test_pad_to_even() -> None:
    q, k, v = (np.ones((1, n, 2, 8), np.float32) for n in (5, 7, 7))
    mask = np.ones((1, 5, 7), bool)
    qp, kp, vp, mp = (np.asarray(x) for x in cudnn.pad_to_even(q, k, v, mask))
    assert qp.shape == (1, 6, 2, 8) and kp.shape == vp.shape == (1, 8, 2, 8) and mp.shape == (1, 6, 8)
    assert not (qp[:, 5].any() or kp[:, 7].any() or vp[:, 7].any() or mp[:, 5].any() or mp[:, :, 7].any())
    assert mp[:, :5, :7].all() and qp[:, :5].all() and kp[:, :7].all()
    assert cudnn.pad_to_even(q[:, :4], k[:, :6], v[:, :6], mask[:, :4, :6])[0].shape == (1, 4, 2, 8)


def test_what_cudnn_is_given(monkeypatch) -> None:
    """Half-precision q; zero queries for rows with no key and zero keys that no row attends (so NaN
    padding cannot pass through cuDNN's additive bias); even T and S; no row without a key."""
    given = {}

    def spy(q, k, v, **kwargs):
        given.update(q=q, k=k, v=v, **kwargs)
        return jnp.zeros(q.shape, q.dtype)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v, mask = CASES["arbitrary"].arrays(jnp.float32)  # T = 21, S = 23, row 0 attends nothing
    k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    mask = mask.at[:, :, :, 5].set(False)[:, 0]  # key 5 attended by no row
    out = cudnn.cudnn_attention(q, k, v, mask, jnp.float32, use_seq_lengths=False)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert given["q"].dtype == jnp.bfloat16 and given["scale"] == 1.0 and given["implementation"] == "cudnn"
    assert given["q"].shape[1] == 22 and given["k"].shape[1] == given["v"].shape[1] == 24
    rows, keys = np.asarray(mask).any(axis=2), np.asarray(mask).any(axis=1)
    np.testing.assert_array_equal(given["q"][:, :21], jnp.where(rows[:, :, None, None], q, 0).astype(jnp.bfloat16))
    np.testing.assert_array_equal(given["k"][:, :23], jnp.where(keys[:, :, None, None], k, 0))
    np.testing.assert_array_equal(given["v"][:, :23], v)
    sent = np.asarray(given["mask"])[:, 0]
    assert sent.shape == (2, 22, 24) and sent.any(axis=2).all()
    np.testing.assert_array_equal(sent[:, :21, :23][rows], np.asarray(mask)[rows])


class _CudnnOnXla(cudnn.CudnnBackend):
    """The cudnn backend with JAX's XLA attention in place of cuDNN: everything but the kernel, on CPU."""

    platforms = ("cpu", "gpu")

    def __init__(self, use_seq_lengths: bool = True):
        super().__init__(use_seq_lengths, implementation="xla")

    def unsupported(self, problem):
        return Backend.unsupported(self, problem)


def _check_no_fallback(case: Case, dtype: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlashpatchWarning)
        check("cudnn", case, dtype)


def _case(name: str) -> Case:
    return RIGHT_PADDED if name == RIGHT_PADDED.name else CASES[name]


#: Padding on the right (the lengths branch, odd and unequal T and S, an example with no key), and
#: masks that take the dense branch: padding mid-sequence, a fully masked row in an arbitrary mask,
#: a decode step (T = 1), two kv heads. The GPU conformance suite runs every case on cuDNN.
@pytest.mark.parametrize(
    ("case", "use_seq_lengths", "dtype"),
    [
        ("prefix_padded", True, "float32"),
        (RIGHT_PADDED.name, True, "float32"),
        ("prefix_padded", False, "float32"),
        (RIGHT_PADDED.name, False, "float32"),
        ("pi0_padding_mid", True, "float32"),
        ("arbitrary", True, "float32"),
        ("decode_t1", True, "float32"),
        ("gqa_2kv", True, "float32"),
        (RIGHT_PADDED.name, True, "bfloat16"),
        ("pi0_padding_mid", True, "bfloat16"),
    ],
    ids=str,
)
def test_preparation_matches_openpi(monkeypatch, use_backend, case: str, use_seq_lengths: bool, dtype: str) -> None:
    use_backend("cudnn", _CudnnOnXla(use_seq_lengths))
    _check_no_fallback(_case(case), dtype)


def test_wrong_lengths_are_caught(monkeypatch, use_backend) -> None:
    """The lengths branch is the one that runs for padding-right masks, and the checks see it."""
    lengths = cudnn.padding_right_lengths
    monkeypatch.setattr(cudnn, "padding_right_lengths", lambda mask: lengths(mask)._replace(kv=lengths(mask).kv - 1))
    use_backend("cudnn", _CudnnOnXla())
    with pytest.raises(AssertionError):
        check("cudnn", CASES["prefix_padded"], "float32")


# --- On a GPU: cuDNN itself, at openpi's shapes (8 query heads, 1 kv head, head dim 256). ---

OPENPI_CASES = {
    case.name: case
    for case in [
        Case("pi0_padding_mid", layouts.pi0(2, 96, actions=10, masked_image=1, seed=0).mask),
        Case("pi0_fast", layouts.pi0_fast(2, 80, causal=13, masked_image=2, seed=4).mask),
        Case("right_padded", _padding_right([70, 0], [90, 0], t=77, s=101)),
        Case("prefix_padded", layouts.prefix_only(2, 64, pad=9).mask),
        Case("decode_gqa", _decode([0, 4], [17, 30], cache=41)),
        Case("decode_gqa_from_0", _decode([0, 0], [17, 30], cache=41)),
        Case("fully_masked_rows", CASES["arbitrary"].mask),
    ]
}
OPENPI_HEADS = dict(num_heads=8, num_kv_heads=1, head_dim=256)


@pytest.mark.gpu
@pytest.mark.parametrize("use_seq_lengths", [True, False], ids=["lengths", "dense"])
@pytest.mark.parametrize("case", list(OPENPI_CASES), ids=str)
def test_cudnn_matches_openpi_on_gpu(use_backend, case: str, use_seq_lengths: bool) -> None:
    use_backend("cudnn", cudnn.CudnnBackend(use_seq_lengths))
    base = OPENPI_CASES[case]
    openpi_case = Case(base.name, base.mask, **OPENPI_HEADS, structured=base.structured)
    problem = Problem.of(*openpi_case.arrays(jnp.bfloat16)[:3], jnp.bfloat16, "gpu")
    assert backends.get("cudnn").unsupported(problem) is None
    _check_no_fallback(openpi_case, "bfloat16")


@pytest.mark.gpu
def test_cudnn_float32_query_over_bf16_cache() -> None:
    """gemma_fast: float32 activations over a bfloat16 cache; the output stays float32."""
    case = Case("decode_gqa", OPENPI_CASES["decode_gqa"].mask, **OPENPI_HEADS)
    q, k, v, mask = case.arrays(jnp.float32)
    k, v = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    settings = flashpatch.Settings(backend="cudnn")
    run = jax.jit(lambda q, k, v: flashpatch.attention(q, k, v, mask, settings=settings))
    cot = jax.random.normal(jax.random.PRNGKey(7), q.shape, jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cot)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlashpatchWarning)
        out = run(q, k, v)
        grads = jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(q, k, v)
    ref = float32_reference(q, k, v, mask)
    want = jax.grad(loss(lambda q, k, v: float32_reference(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    assert out.dtype == jnp.float32
    assert_finite((out, grads))
    assert rel_err(out, ref) < TOL["bfloat16"]
    for got, exp in zip(grads, want, strict=True):
        assert rel_err(got, exp) < TOL["bfloat16"]


@pytest.mark.gpu
def test_single_key_falls_back_with_a_warning() -> None:
    case = Case("one_key", np.ones((1, 4, 1), bool), **OPENPI_HEADS)
    q, k, v, mask = case.arrays(jnp.bfloat16)
    with pytest.warns(FlashpatchWarning, match="kv length 1"):
        out = flashpatch.attention(q, k, v, mask, settings=flashpatch.Settings(backend="cudnn"))
    assert rel_err(out, float32_reference(q, k, v, mask)) < TOL["bfloat16"]
