"""One suite every backend runs (tokamax-style): each backend declares what it supports.

Checks, per backend x mask layout x dtype, through flashpatch's public `attention()`:
forward and gradients (q, k, v) against openpi's math in float32 on fresh random inputs, rows
with no key holding openpi's value (mean of V), NaN never, NaN-filled padding not leaking into
the forward pass, and bitwise determinism. A deliberately broken backend must fail it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from cases import CASES, Case
from helpers import TOL, assert_finite, rel_err

import flashpatch
from flashpatch import backends
from flashpatch.backends.reference import reference_attention
from flashpatch.backends.xla import XlaBackend

DTYPES = ("float32", "bfloat16")


def _runs_here(name: str) -> bool:
    backend = backends.get(name)
    return jax.default_backend() in backend.platforms


BACKENDS = [
    pytest.param(name, marks=() if name in ("reference", "xla") else pytest.mark.gpu) for name in backends.names()
]


def _reference(q, k, v, mask, probs_dtype):
    """openpi's math in float32 (inputs upcast), the yardstick for every backend and dtype."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    return reference_attention(f32(q), f32(k), f32(v), mask[:, 0], jnp.float32).astype(jnp.float32)


def check(backend: str, case: Case, dtype: str) -> None:
    """Raise AssertionError where `backend` does not compute `case` like openpi."""
    q, k, v, mask = case.arrays(dtype)
    settings = flashpatch.Settings(backend=backend)
    # The mask is an argument, not a closed-over constant (XLA would constant-fold the analysis).
    attend = jax.jit(lambda q, k, v, mask: flashpatch.attention(q, k, v, mask, settings=settings))
    run = lambda q, k, v: attend(q, k, v, mask)  # noqa: E731
    out = run(q, k, v)
    ref = _reference(q, k, v, mask, dtype)
    assert out.shape == ref.shape and out.dtype == q.dtype, (out.shape, out.dtype)
    assert_finite(out, "output")
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{backend} {case.name} {dtype}: forward rel.err {err:.2e} >= {TOL[dtype]}"

    cot = jax.random.normal(jax.random.PRNGKey(7), out.shape, jnp.float32)

    def loss(f):
        return lambda q, k, v, mask: jnp.sum(f(q, k, v, mask).astype(jnp.float32) * cot)

    grads = jax.jit(jax.grad(loss(attend), argnums=(0, 1, 2)))(q, k, v, mask)
    want = jax.grad(loss(lambda q, k, v, mask: _reference(q, k, v, mask, dtype)), argnums=(0, 1, 2))(q, k, v, mask)
    assert_finite(grads, "gradients")
    for name, got, exp in zip("qkv", grads, want, strict=True):
        assert got.dtype == jnp.dtype(dtype), (name, got.dtype)
        err = rel_err(got, exp)
        assert err < TOL[dtype], f"{backend} {case.name} {dtype}: d{name} rel.err {err:.2e} >= {TOL[dtype]}"

    again = run(q, k, v)
    assert bool(jnp.all(again == out)), f"{backend} {case.name}: two runs on the same inputs differ"

    # Padding filled with NaN must not leak: q of rows that attend nothing and k of keys that no row
    # attends do not enter openpi's result (v does: empty rows average all of it).
    rows = jnp.any(mask[:, 0], axis=-1)
    keys = jnp.any(mask[:, 0], axis=-2)
    q_nan = jnp.where(rows[:, :, None, None], q, jnp.nan)
    k_nan = jnp.where(keys[:, :, None, None], k, jnp.nan)
    poisoned = run(q_nan, k_nan, v)
    assert_finite(poisoned, "output with NaN padding")
    err = rel_err(poisoned, ref)
    assert err < TOL[dtype], f"{backend} {case.name}: NaN in padding changed the output (rel.err {err:.2e})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_openpi(backend: str, case: str, dtype: str) -> None:
    if not _runs_here(backend):
        pytest.skip(f"{backend} does not run on {jax.default_backend()}")
    check(backend, CASES[case], dtype)


class _DropsLastKey(backends.Backend):
    """A plausible bug: the last key of every row is ignored."""

    name = "drops_last_key"

    def attend(self, q, k, v, mask, plan, problem):
        return XlaBackend().attend(q, k, v, mask.at[:, :, -1].set(False), plan, problem)


class _ZeroOutput(backends.Backend):
    """A backend that computes nothing at all."""

    name = "zero_output"

    def attend(self, q, k, v, mask, plan, problem):
        return jnp.zeros(q.shape, problem.out_dtype)


@pytest.mark.parametrize("broken", [_DropsLastKey(), _ZeroOutput()], ids=lambda b: b.name)
def test_suite_catches_a_broken_backend(use_backend, broken) -> None:
    use_backend("xla", broken)
    with pytest.raises(AssertionError):
        check("xla", CASES["pi0_padding_mid"], "float32")
