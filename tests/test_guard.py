"""The compile guard: a backend that fails at trace, at lowering or at compile on this machine gives way to the next
candidate (at the end openpi's own attention) with one warning, instead of ending the user's step.

Each failing backend is first shown to crash a jitted training step with the guard off, as every release before the
guard did; then to fall back with it on. On CPU the guard is asked to run for every platform (`guard.mode("all")`);
on a GPU it runs by default.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from patching import tiny_attention

import flashpatch
from flashpatch import backends
from flashpatch.backends.base import DenseBackend
from flashpatch.backends.xla import XlaBackend
from flashpatch.core import guard, selection

try:  # jax >= 0.4.36
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover - older JAX
    from jax.core import Primitive


def _with_zero_gradient(op):
    """`op` on the forward pass, zeros on the backward: what fails is then lowering or compiling, not tracing."""

    @jax.custom_vjp
    def f(q):
        return op(q)

    f.defvjp(lambda q: (op(q), None), lambda _, g: (jnp.zeros_like(g),))
    return f


_unlowerable = Primitive("flashpatch_test_unlowerable")
_unlowerable.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
_unlowerable.def_impl(lambda x: x)


class FailsAtTrace(DenseBackend):
    name = "xla"

    def attend(self, q, k, v, mask, problem):
        raise RuntimeError("flashpatch test: this kernel cannot be traced here")


class FailsAtLowering(DenseBackend):
    """Traces (the op has a shape rule) but has no lowering on any platform, as a Pallas Triton lowering that
    does not know the GPU."""

    name = "xla"

    def attend(self, q, k, v, mask, problem):
        return _with_zero_gradient(_unlowerable.bind)(XlaBackend().attend(q, k, v, mask, problem))


class FailsAtCompile(DenseBackend):
    """Lowers to an FFI custom call for which no handler is registered: XLA's compile fails, as it does for a
    kernel library with no code for the GPU or a tile that does not fit."""

    name = "xla"

    def attend(self, q, k, v, mask, problem):
        out = XlaBackend().attend(q, k, v, mask, problem)
        call = jax.ffi.ffi_call("flashpatch_test_no_handler", jax.ShapeDtypeStruct(out.shape, out.dtype))
        return _with_zero_gradient(call)(out)


FAILING = [FailsAtTrace(), FailsAtLowering(), FailsAtCompile()]
IDS = ["trace", "lowering", "compile"]


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    guard.forget()
    yield
    guard.forget()


@pytest.fixture(scope="module")
def tiny():
    return tiny_attention(seq=6)


def _step(tiny):
    """A jitted training step of openpi's (fixture) Gemma attention: loss and gradients."""
    return jax.jit(jax.grad(lambda params: jnp.sum(tiny(params) ** 2)))


@pytest.mark.parametrize("broken", FAILING, ids=IDS)
def test_without_the_guard_a_failing_kernel_ends_the_step(tiny, use_backend, broken) -> None:
    use_backend("xla", broken)
    with guard.mode("off"), flashpatch.enable("xla"), pytest.raises(Exception) as raised:
        jax.block_until_ready(_step(tiny)(tiny.params))
    assert "flashpatch test" in str(raised.value) or "flashpatch_test" in str(raised.value), raised.value


@pytest.mark.parametrize("broken", FAILING, ids=IDS)
def test_with_the_guard_a_named_backend_falls_back_with_one_warning(tiny, use_backend, broken) -> None:
    expected = jax.block_until_ready(_step(tiny)(tiny.params))  # unpatched: openpi's own attention
    use_backend("xla", broken)
    with guard.mode("all"), flashpatch.enable("xla"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with selection.recording() as chosen:
            got = jax.block_until_ready(_step(tiny)(tiny.params))
    assert {c.backend for c in chosen} == {"reference"}, chosen
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), got, expected)
    texts = [str(w.message) for w in caught if issubclass(w.category, flashpatch.FlashpatchWarning)]
    assert len(texts) == 1, texts
    [text] = texts
    assert text.startswith("flashpatch: xla failed to compile for a call of flashpatch.testing.gemma.Attention")
    for part in ("B=1, T=6, S=6", "jax ", "openpi's own attention runs there instead", "report it", "doctor"):
        assert part in text, (part, text)


def test_under_auto_a_failing_candidate_moves_on_to_the_next(use_backend) -> None:
    """On CPU `auto` takes xla from 1536 x 1536 (query, key) pairs; a broken xla gives way to openpi's own."""
    use_backend("xla", FailsAtCompile())
    q = jnp.ones((1, 1536, 2, 16))
    k = jnp.ones((1, 1536, 1, 16))
    mask = jnp.ones((1, 1, 1536, 1536), bool)
    with guard.mode("all"), warnings.catch_warnings(record=True) as caught, selection.recording() as chosen:
        warnings.simplefilter("always")
        out = jax.eval_shape(lambda q: flashpatch.attention(q, k, k, mask), q)
    assert out.shape == q.shape
    [choice] = chosen
    assert choice.backend == "reference" and [name for name, _ in choice.failed] == ["xla"], choice
    assert "it failed to compile here: JaxRuntimeError" in choice.reason or "XlaRuntimeError" in choice.reason
    assert sum(issubclass(w.category, flashpatch.FlashpatchWarning) for w in caught) == 1


def test_a_verdict_is_compiled_once_per_backend_and_shape(monkeypatch) -> None:
    compiled: list[tuple] = []
    real = guard._compile

    def counting(name, problem):
        compiled.append((name, problem.batch, problem.q_len))
        return real(name, problem)

    monkeypatch.setattr(guard, "_compile", counting)
    q, k, mask = jnp.ones((2, 8, 2, 16)), jnp.ones((2, 8, 1, 16)), jnp.ones((2, 1, 8, 8), bool)
    with guard.mode("all"):
        for _ in range(3):
            jax.eval_shape(lambda q: flashpatch.attention(q, k, k, mask, settings="xla"), q)
        jax.eval_shape(lambda q: flashpatch.attention(q[:1], k[:1], k[:1], mask[:1], settings="xla"), q)
        jax.eval_shape(lambda q: flashpatch.attention(q, k, k, mask, settings="reference"), q)
    assert compiled == [("xla", 2, 8), ("xla", 1, 8)], compiled
    assert guard.seconds_spent() > 0


@pytest.mark.parametrize(("setting", "guarded"), [("0", False), ("off", False), ("all", True), ("", False)])
def test_the_environment_switches_it(monkeypatch, setting: str, guarded: bool) -> None:
    """On a CPU: off by default (it guards GPU calls), on with FLASHPATCH_GUARD=all, skipped with 0 or off."""
    from flashpatch.backends.base import Problem

    monkeypatch.setenv(guard.ENV, setting) if setting else monkeypatch.delenv(guard.ENV, raising=False)
    problem = Problem(1, 8, 8, 2, 1, 16, "float32", "float32", "float32", "float32", jax.default_backend())
    assert guard.applies(problem) is guarded


def test_under_a_mesh_it_compiles_one_shard(monkeypatch) -> None:
    from flashpatch.backends import meshes
    from flashpatch.backends.base import Problem

    class Mesh:
        axis_names = ("batch", "model")
        shape = {"batch": 4, "model": 2}  # noqa: RUF012

    problem = Problem(32, 8, 8, 2, 1, 16, "float32", "float32", "float32", "float32", "cpu")
    monkeypatch.setattr(meshes, "active_mesh", lambda: Mesh())
    assert meshes.per_device(problem).batch == 8
    monkeypatch.setattr(meshes, "active_mesh", lambda: None)
    assert meshes.per_device(problem).batch == 32


def test_a_simulated_gpu_is_not_compiled_for() -> None:
    """CPU tests of what a GPU would choose simulate the GPU; there is nothing to compile for, so no verdict."""
    from flashpatch.backends import machine
    from flashpatch.backends.base import Problem

    problem = Problem(1, 8, 8, 2, 1, 16, "bfloat16", "bfloat16", "bfloat16", "bfloat16", "gpu")
    with machine.simulated("RTX 4090"), guard.mode("all"):
        assert guard.failure("pallas", problem) is None


def test_registered_backends_are_untouched(use_backend) -> None:
    """The fixture plants a broken backend per test; the registry must be as it was after."""
    assert isinstance(backends.get("xla"), XlaBackend)
