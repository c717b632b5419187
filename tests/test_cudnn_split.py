"""The cudnn_split backend: how it splits openpi's masks, and that the split is exact.

On CPU the whole backend (sorting, the head through sequence lengths, the tail slab, putting rows
back) runs with JAX's XLA attention in place of cuDNN, through the conformance checks. The GPU
conformance suite runs it on cuDNN.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sorts_in_a_layer_loop

from flashpatch import backends
from flashpatch.backends import cudnn_split, masks
from flashpatch.backends.base import Backend
from flashpatch.diagnostics import FlashpatchWarning
from flashpatch.testing import layouts
from flashpatch.testing.conformance import CASES, check


class _SplitOnXla(cudnn_split.CudnnSplitBackend):
    """cudnn_split with JAX's XLA attention in place of cuDNN: everything but the kernel, on CPU."""

    platforms = ("cpu", "gpu")

    def __init__(self, **kwargs):
        super().__init__(implementation="xla", **kwargs)

    def unsupported(self, problem):
        return Backend.unsupported(self, problem)


@pytest.fixture
def on_xla(use_backend):
    def install(**kwargs) -> None:
        use_backend("cudnn_split", _SplitOnXla(**kwargs))

    return install


def test_registered_and_gpu_only() -> None:
    assert "cudnn_split" in backends.names()
    assert backends.get("cudnn_split").platforms == ("gpu",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tail_max": 0}, "tail_max must be a positive")],
)
def test_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        cudnn_split.CudnnSplitBackend(**kwargs)


def _split(mask: np.ndarray, tail_max: int = cudnn_split.TAIL_ROWS) -> cudnn_split.Split:
    plan = masks.analyze(jnp.asarray(mask))
    assert bool(plan.exact)
    return cudnn_split.split(plan, tail_max)


def test_split_of_pi0_layouts() -> None:
    """pi0: the valid prefix is the head (it attends itself), state + actions the tail; pi0.5 likewise."""
    for state_token, suffix in ((True, 11), (False, 10)):
        layout = layouts.pi0(3, 40, actions=10, state_token=state_token, masked_image=1, seed=3)
        parts = _split(layout.mask)
        prefix_valid = layout.valid[:, :40].sum(axis=1)
        np.testing.assert_array_equal(parts.head_rows, prefix_valid)
        np.testing.assert_array_equal(parts.head_keys, prefix_valid)
        np.testing.assert_array_equal(parts.tail_rows, [suffix] * 3)
        assert bool(cudnn_split.tail_fits(masks.analyze(jnp.asarray(layout.mask)), cudnn_split.TAIL_ROWS))
        # the head rows come first in sorted order and are the valid prefix rows, in sequence order
        for b in range(3):
            head = np.asarray(parts.q_order[b, : prefix_valid[b]])
            np.testing.assert_array_equal(head, np.flatnonzero(layout.valid[b, :40]))
            keys = np.asarray(parts.k_order[b, : prefix_valid[b]])
            np.testing.assert_array_equal(keys, np.flatnonzero(layout.valid[b, :40]))


def test_split_of_empty_rows_and_long_tails() -> None:
    mask = np.zeros((2, 6, 6), bool)
    mask[0] = layouts.causal(1, 6).mask[0]  # head = row 0 (one key), tail = 5 rows
    parts = _split(mask, tail_max=4)  # batch row 1 attends nothing
    np.testing.assert_array_equal(parts.head_rows, [1, 0])
    np.testing.assert_array_equal(parts.head_keys, [1, 0])
    np.testing.assert_array_equal(parts.tail_rows, [5, 0])
    plan = masks.analyze(jnp.asarray(mask))
    assert not bool(cudnn_split.tail_fits(plan, 4))
    assert bool(cudnn_split.tail_fits(plan, 5))


def test_head_goes_to_cudnn_as_sequence_lengths(monkeypatch) -> None:
    """The head's call carries lengths and no dense mask; NaN-free zeros beyond them."""
    seen = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    layout = layouts.pi0(2, 40, actions=10, seed=1)
    parts = _split(layout.mask)
    q = jnp.full((2, 51, 2, 8), jnp.nan, jnp.bfloat16)
    kv = jnp.ones((2, 51, 1, 8), jnp.bfloat16)
    out = cudnn_split.head_attention(q, kv, kv, parts, "xla")
    assert len(seen) == 1 and seen[0].get("mask") is None and seen[0].get("bias") is None
    np.testing.assert_array_equal(seen[0]["query_seq_lengths"], parts.head_rows)
    np.testing.assert_array_equal(seen[0]["key_value_seq_lengths"], parts.head_keys)
    assert out.shape == (2, 51, 2, 8)


#: Every structured layout (pi0 with a missing image, pi0.5, pi0-FAST, causal, decode, a suffix
#: over a KV cache, two kv heads, batch 1, odd lengths, padding only).
STRUCTURED = [name for name, case in CASES.items() if case.structured]


@pytest.mark.parametrize("case", STRUCTURED)
def test_matches_openpi(on_xla, case: str) -> None:
    on_xla()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlashpatchWarning)  # no fallback anywhere
        check("cudnn_split", CASES[case], "float32")


def test_matches_openpi_bf16(on_xla) -> None:
    on_xla()
    check("cudnn_split", CASES["pi0_masked_image"], "bfloat16")


@pytest.mark.parametrize("case", ["pi0_fast"])
def test_matches_openpi_with_a_slab_inside_the_rows(on_xla, case: str) -> None:
    """A short slab (16 rows) sits at the first tail row, not against the end (in some batch rows)."""
    on_xla(tail_max=16)
    parts = _split(CASES[case].mask, tail_max=16)
    start, _ = cudnn_split.tail_window(parts)
    assert bool(jnp.any(start == parts.head_rows))  # some slabs not moved left
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlashpatchWarning)
        check("cudnn_split", CASES[case], "float32")


def test_permute_rows_gradient_is_a_gather() -> None:
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 3))
    order = jnp.stack([jax.random.permutation(jax.random.PRNGKey(i), 7) for i in (1, 2)])
    cot = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 3))
    loss = lambda f: lambda x: jnp.sum(f(x, order) * cot)  # noqa: E731
    np.testing.assert_array_equal(masks.permute_rows(x, order), masks.gather_rows(x, order))
    np.testing.assert_allclose(jax.grad(loss(masks.permute_rows))(x), jax.grad(loss(masks.gather_rows))(x))
    backward = str(jax.make_jaxpr(jax.grad(loss(masks.permute_rows)))(x))
    assert "scatter" not in backward and "gather" in backward


def _warns_and_matches(case, match: str) -> None:
    import flashpatch
    from flashpatch import diagnostics
    from flashpatch.testing.conformance import TOL, float32_reference, rel_err

    diagnostics.forget()
    q, k, v, mask = case.arrays("float32")
    with pytest.warns(FlashpatchWarning, match=match):
        out = jax.block_until_ready(flashpatch.attention(q, k, v, mask, settings="cudnn_split"))
        jax.effects_barrier()
    assert rel_err(out, float32_reference(q, k, v, mask)) < TOL["float32"]


def test_long_tail_takes_the_dense_path_with_a_warning(on_xla) -> None:
    on_xla(tail_max=4)
    _warns_and_matches(CASES["pi0_padding_mid"], "at most 4 rows outside the largest block")
    with pytest.raises(AssertionError, match="its fallback ran"):
        check("cudnn_split", CASES["pi0_padding_mid"], "float32")


def test_unstructured_mask_takes_the_core_fallback(on_xla) -> None:
    on_xla()
    _warns_and_matches(CASES["arbitrary"], "does not have the structure cudnn_split computes")


def test_a_wrong_split_fails_the_suite(on_xla, monkeypatch) -> None:
    """The suite notices a head that is one key short."""
    on_xla()
    right = cudnn_split.split

    def one_key_short(plan, tail_max=cudnn_split.TAIL_ROWS):
        parts = right(plan, tail_max)
        return parts._replace(head_keys=jnp.maximum(parts.head_keys - 1, 0))

    monkeypatch.setattr(cudnn_split, "split", one_key_short)
    with pytest.raises(AssertionError):
        check("cudnn_split", CASES["pi0_padding_mid"], "float32")


def test_fast_path_runs_outside_the_conditional_and_after_it(on_xla) -> None:
    """Inside a conditional the fast path ran 1.6-1.8x slower on the H100 (benchmarks/history/training-speed.md),
    so only the fallback may sit inside `cond`, forward and backward; the fallback warning adds no conditional of
    its own (0.17 ms per call there); the fallback is rematerialised, so the branch that skips it writes no
    residuals beyond placeholders for q, k, v and the mask; and in the forward pass the fast path is
    ordered after the conditional (a barrier on its inputs), since the host waits for all work queued
    before a conditional's predicate."""
    import flashpatch

    q, k, v, mask = CASES["pi0_masked_image"].arrays("float32")
    settings = flashpatch.Settings(backend="cudnn_split")
    on_xla()

    def loss(q, k, v, mask):
        return jnp.sum(flashpatch.attention(q, k, v, mask, settings=settings))

    placeholders = {"broadcast_in_dim", "empty", "empty2"}
    forward, training = (lambda *a: flashpatch.attention(*a, settings=settings)), jax.grad(loss, argnums=(0, 1, 2))
    for fn, expected in ((forward, 1), (training, 2)):
        jaxpr = jax.make_jaxpr(fn)(q, k, v, mask).jaxpr
        conds = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
        assert len(conds) == expected, "one conditional per pass: the structure check's fallback, with its warning"
        for eqn in conds:
            accepted_branch = eqn.params["branches"][1].jaxpr
            assert {e.primitive.name for e in accepted_branch.eqns} <= placeholders, accepted_branch
            assert len(eqn.outvars) <= 5, [str(o.aval) for o in eqn.outvars]

    jaxpr = jax.make_jaxpr(forward)(q, k, v, mask).jaxpr
    (cond,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
    barriers = [eqn for eqn in jaxpr.eqns if "optimization_barrier" in str(eqn)]
    orders_q = [b for b in barriers if cond.outvars[0] in _inputs(b) and jaxpr.invars[0] in _inputs(b)]
    assert orders_q, "the fast path's queries are not ordered after the fallback's conditional"


def _inputs(eqn) -> list:
    """An equation's input variables, those of the equations it wraps (custom_jvp) included."""
    found = list(eqn.invars)
    for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
            found += [v for e in inner.eqns for v in e.invars]
    return found


def test_mask_analysis_is_hoisted_out_of_the_layer_loop(on_xla) -> None:
    """Under a scan over layers (openpi's nn.scan) the sorts of the mask analysis depend on the mask
    alone, and XLA moves them out of the loop: the layout is computed once per forward pass."""
    on_xla()
    total, in_loop = sorts_in_a_layer_loop("cudnn_split", "pi0_masked_image", "float32")
    assert total >= 2 and in_loop == 0, "the mask's sorts run in every layer"
