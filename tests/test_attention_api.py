"""`flashpatch.attention`, the public core: what it runs under, what it refuses, its edge cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashpatch
from flashpatch.backends.xla import XlaBackend
from flashpatch.core import selection, verify
from flashpatch.testing import conformance


@pytest.mark.parametrize("backend", ["xla", "auto", "reference"])
def test_no_keys_at_all_gives_openpis_zeros(backend: str) -> None:
    """S = 0: openpi's einsum gives zeros; the blockwise path divided by zero."""
    q = jnp.ones((2, 3, 4, 16))
    k = v = jnp.zeros((2, 0, 1, 16))
    mask = jnp.zeros((2, 1, 3, 0), jnp.bool_)
    attend = lambda q: flashpatch.attention(q, k, v, mask, settings=flashpatch.Settings(backend))  # noqa: E731
    out = jax.jit(attend)(q)
    assert out.shape == q.shape and not np.asarray(out).any()
    grad = jax.grad(lambda q: jnp.sum(attend(q)))(q)
    assert np.isfinite(np.asarray(grad)).all()
    assert flashpatch_xla_direct(q, k, v, mask).shape == q.shape


def flashpatch_xla_direct(q, k, v, mask):
    from flashpatch.backends.base import Problem

    problem = Problem.of(q, k, v, q.dtype, jax.default_backend())
    return XlaBackend().attend(q, k, v, mask[:, 0], problem)


def test_verify_reports_inside_flax_scan_on_this_stack() -> None:
    """openpi's Gemma stack is an nn.scan: verify mode must be able to report from inside it."""
    assert verify.works_in_flax_scan(), "verify mode cannot report inside nn.scan with this JAX/flax"


def _ran(call) -> list[str]:
    with selection.recording() as chosen:
        jax.block_until_ready(call())
    return [c.backend for c in chosen]


def test_an_enclosing_enable_block_decides_the_backend() -> None:
    """A direct call inside `enable("xla")` runs xla, not openpi's own attention (it used to ignore the block)."""
    q, k, v, mask = conformance.CASES["pi0_padding_mid"].arrays("float32")
    with flashpatch.enable("xla"):
        assert _ran(lambda: flashpatch.attention(q, k, v, mask)) == ["xla"]
    assert _ran(lambda: flashpatch.attention(q, k, v, mask)) == ["reference"]  # auto on a CPU, small T * S
    with flashpatch.enable("xla"):  # an explicit argument still wins over the block
        assert _ran(lambda: flashpatch.attention(q, k, v, mask, settings="reference")) == ["reference"]


def test_settings_may_be_a_backend_name() -> None:
    q, k, v, mask = conformance.CASES["pi0_padding_mid"].arrays("float32")
    assert _ran(lambda: flashpatch.attention(q, k, v, mask, settings="xla")) == ["xla"]


def test_settings_of_another_type_is_one_clear_error() -> None:
    q, k, v, mask = conformance.CASES["pi0_padding_mid"].arrays("float32")
    with pytest.raises(TypeError, match=r"settings must be a flashpatch\.Settings or a backend name"):
        flashpatch.attention(q, k, v, mask, settings=["xla"])
    with pytest.raises(ValueError, match="backend must be one of"):
        flashpatch.attention(q, k, v, mask, settings="nope")


@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_integer_inputs_are_refused(arg: str) -> None:
    q, k, v, mask = conformance.CASES["pi0_padding_mid"].arrays("float32")
    inputs = {"q": q, "k": k, "v": v}
    inputs[arg] = inputs[arg].astype(jnp.int32)
    with pytest.raises(TypeError, match=f"{arg} must be floating point"):
        flashpatch.attention(inputs["q"], inputs["k"], inputs["v"], mask)


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas", "auto"])
@pytest.mark.parametrize("empty", ["batch", "query", "heads"])
def test_an_empty_axis_gives_an_empty_result_on_every_backend(backend: str, empty: str) -> None:
    """Batch 0 (or T = 0, or no heads) used to raise a bare ZeroDivisionError in pallas."""
    b, t, n = {"batch": (0, 5, 4), "query": (2, 0, 4), "heads": (2, 5, 0)}[empty]
    q = jnp.ones((b, t, n, 16))
    k = v = jnp.ones((b, 6, max(n, 1) if n else 1, 16))
    mask = jnp.ones((b, 1, t, 6), bool)
    with selection.recording() as chosen:
        out = flashpatch.attention(q, k, v, mask, settings=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert [c.backend for c in chosen] == ["reference"] and "nothing to compute" in chosen[0].reason


def test_a_probs_dtype_that_is_not_floating_point_is_refused() -> None:
    """An int8 probs dtype was accepted, and three backends gave three different answers."""
    q, k, v, mask = conformance.CASES["pi0_padding_mid"].arrays("float32")
    with pytest.raises(TypeError, match=r"probs_dtype must be floating point .* got int8"):
        flashpatch.attention(q, k, v, mask, probs_dtype="int8")


@pytest.mark.parametrize("arg", ["q", "attn_mask"])
def test_a_python_list_is_one_clear_error(arg: str) -> None:
    q, k, v, mask = conformance.CASES["pi0_padding_mid"].arrays("float32")
    inputs = {"q": q, "attn_mask": mask}
    inputs[arg] = np.asarray(inputs[arg]).tolist()
    with pytest.raises(TypeError, match=rf"{arg} must be a JAX or NumPy array; got list \(wrap it: jnp.asarray"):
        flashpatch.attention(inputs["q"], k, v, inputs["attn_mask"])


def test_verify_logs_an_agreement_at_info_and_a_disagreement_at_warning(use_backend, caplog) -> None:
    """Verify mode logged a 6e-08 agreement at WARNING; a broken backend must still stand out."""
    import logging

    from patching import ZeroBackend

    q, k, v, mask = conformance.CASES["pi0_padding_mid"].arrays("float32")
    caplog.set_level(logging.INFO, logger="flashpatch")
    jax.block_until_ready(flashpatch.attention(q, k, v, mask, settings=flashpatch.Settings("xla", verify=True)))
    [agreement] = [r for r in caplog.records if "verify" in r.getMessage()]
    assert agreement.levelno == logging.INFO and "within 2e-05" in agreement.getMessage()
    caplog.clear()
    use_backend("xla", ZeroBackend())
    jax.block_until_ready(
        flashpatch.attention(q, k, v, mask, settings=flashpatch.Settings("xla", verify=True), site="broken")
    )
    [disagreement] = [r for r in caplog.records if "verify" in r.getMessage()]
    assert disagreement.levelno == logging.WARNING and "MORE than the 2e-05 expected" in disagreement.getMessage()
