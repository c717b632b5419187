"""@flashpatch.patch and patch_model: models that carry their own settings through init, apply, nnx, pickling
and clone; and how they meet the caller's enable() / disable() blocks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import rel_err
from patching import TINY, numpy_params, spy_attention

import flashpatch
from flashpatch.switch import interception, state
from flashpatch.switch.settings import Settings
from flashpatch.testing import gemma

SEQ = 6


def _call_inputs() -> tuple[list[jax.Array], jax.Array, jax.Array]:
    x = jnp.linspace(-1.0, 1.0, SEQ * TINY.width, dtype=jnp.float32).reshape(1, SEQ, TINY.width)
    return [x], jnp.arange(SEQ)[None], jnp.tril(jnp.ones((SEQ, SEQ), bool))[None]


def _linen_gemma() -> gemma.Module:
    return gemma.Module(configs=[TINY], embed_dtype="float32", vocab_size=16)


@pytest.mark.parametrize(
    ("decorate", "backend"), [(flashpatch.patch, "auto"), (flashpatch.patch(backend="xla"), "xla")], ids=["bare", "xla"]
)
def test_patch_linen_factory(decorate, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_attention(monkeypatch)
    make = decorate(_linen_gemma)
    assert make.__name__ == "_linen_gemma"
    model = make()
    # gemma.Module.init is openpi's convenience init; linen's goes through init_with_output (patched).
    shapes = jax.eval_shape(lambda: nn.Module.init(model, jax.random.PRNGKey(0), method="init", use_adarms=[False]))
    assert calls and all(c.settings == Settings(backend) for c in calls)
    params = numpy_params(shapes)

    xs, positions, mask = _call_inputs()
    del calls[:]
    jax.eval_shape(lambda p: model.apply(p, xs, positions, mask), params)
    assert calls and all(c.settings == Settings(backend) for c in calls)
    assert state.current() is None and interception.bound_targets() == {}, "flashpatch leaked out of the model"

    del calls[:]
    jax.eval_shape(lambda p: _linen_gemma().apply(p, xs, positions, mask), params)
    assert calls == [], "a module the factory did not make ran patched"


class _Pi0Like(nnx.Module):
    """openpi's Pi0 pattern: a linen Gemma inside NNX through nnx.bridge.ToNNX, initialised lazily."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        llm = nnx.bridge.ToNNX(_linen_gemma())
        llm.lazy_init(rngs=rngs, method="init", use_adarms=[False])
        self.llm = llm

    def __call__(self, xs, positions, mask) -> jax.Array:
        return self.llm(xs, positions, mask)[0][0]


def _run_nnx(model: nnx.Module) -> jax.Array:
    xs, positions, mask = _call_inputs()
    return nnx.jit(lambda m, xs: m(xs, positions, mask))(model, xs)


def test_patch_nnx_factory_survives_split_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_attention(monkeypatch)

    @flashpatch.patch(backend="xla")
    def make_model(rngs: nnx.Rngs) -> _Pi0Like:
        return _Pi0Like(rngs)

    # As openpi restores a checkpoint: abstract model, split, fill the state, merge.
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))))
    params = numpy_params(abstract_state)
    del calls[:]
    patched = _run_nnx(nnx.merge(graphdef, params))
    assert calls and all(c.settings == Settings("xla") for c in calls), "the patch did not survive split/merge"
    assert state.current() is None and interception.bound_targets() == {}, "flashpatch leaked out of the model"

    del calls[:]
    plain_graphdef, _ = nnx.split(nnx.eval_shape(lambda: _Pi0Like(nnx.Rngs(0))))
    original = _run_nnx(nnx.merge(plain_graphdef, params))
    assert calls == []
    assert rel_err(patched, original) < 2e-5


class _NoLinen(nnx.Module):
    """An NNX model with no linen module inside: nothing for @patch to patch."""


def test_patch_rejects_what_it_cannot_patch() -> None:
    with pytest.raises(TypeError, match=r"linen Module.*got int"):
        flashpatch.patch(lambda: 3)()
    with pytest.raises(TypeError, match="got _NoLinen"):
        flashpatch.patch_model(_NoLinen())
    with pytest.raises(TypeError, match=r"by keyword .*got 'xla'"):
        flashpatch.patch("xla")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="backend must be one of"):
        flashpatch.patch(backend="nope")


def _patched_gemma() -> gemma.Module:
    return flashpatch.patch(backend="xla")(_linen_gemma)()


def test_a_patched_model_pickles_and_stays_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    pickle.dumps(_linen_gemma())  # the control: the unpatched model pickles
    model = pickle.loads(pickle.dumps(_patched_gemma()))
    calls = spy_attention(monkeypatch)
    jax.eval_shape(lambda: nn.Module.init(model, jax.random.PRNGKey(0), method="init", use_adarms=[False]))
    assert calls and all(c.settings == Settings("xla") for c in calls), "the unpickled model runs unpatched"

    # openpi's Pi0 pattern: the linen Gemma inside NNX.
    nnx_model = pickle.loads(pickle.dumps(flashpatch.patch(backend="xla")(_Pi0Like)(nnx.Rngs(0))))
    xs, positions, mask = _call_inputs()
    del calls[:]
    jax.eval_shape(lambda: nnx_model(xs, positions, mask))
    assert calls and all(c.settings == Settings("xla") for c in calls), "the unpickled NNX model runs unpatched"
    assert state.current() is None and interception.bound_targets() == {}, "flashpatch leaked out of the model"


def test_a_clone_of_a_patched_model_stays_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _patched_gemma()
    calls = spy_attention(monkeypatch)
    for clone in (model.clone(), model.copy(), model.clone(embed_dtype="float32")):
        del calls[:]
        jax.eval_shape(lambda m=clone: nn.Module.init(m, jax.random.PRNGKey(0), method="init", use_adarms=[False]))
        assert calls and all(c.settings == Settings("xla") for c in calls), "the clone runs unpatched"
    del calls[:]
    jax.eval_shape(lambda: nn.Module.init(_linen_gemma(), jax.random.PRNGKey(0), method="init", use_adarms=[False]))
    assert calls == [], "cloning a patched model patched a model it did not make"


def test_the_callers_block_wins_over_a_patched_models_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`with flashpatch.disable()` around a patched model runs openpi's original (as disable() promises), and an
    enclosing enable() picks the backend for that call; without a block the model's own settings hold, also over
    the process default."""
    model = _patched_gemma()  # backend "xla"
    calls = spy_attention(monkeypatch)

    def init() -> None:
        jax.eval_shape(lambda: nn.Module.init(model, jax.random.PRNGKey(0), method="init", use_adarms=[False]))

    with flashpatch.disable():
        init()
    assert calls == [], "disable() did not reach the patched model"
    with flashpatch.enable("reference"):
        init()
    assert calls and {c.settings for c in calls} == {Settings("reference")}
    del calls[:]
    flashpatch.install("auto")
    try:
        init()
    finally:
        flashpatch.uninstall()
    assert calls and {c.settings for c in calls} == {Settings("xla")}
    assert state.current() is None and interception.bound_targets() == {}
