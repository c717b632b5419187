"""`flashpatch.attention`, the public core: what it runs under, what it refuses, its edge cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashpatch
from flashpatch import selection, verify
from flashpatch.backends.xla import XlaBackend
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
    with pytest.raises(TypeError, match=f"{arg} must be a floating-point array"):
        flashpatch.attention(inputs["q"], inputs["k"], inputs["v"], mask)
