"""The ways to turn flashpatch on: enable()/disable(), install()/uninstall(), lazy binding, threads, @patch."""

from __future__ import annotations

import importlib
import pathlib
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import rel_err
from patching import TINY, numpy_params, spy_attention, tiny_attention

import flashpatch
from flashpatch import interception, settings
from flashpatch.settings import Settings
from flashpatch.testing import gemma, gemma_fast

TARGET_CLASSES = (gemma.Attention, gemma_fast.Attention)


@pytest.fixture(scope="module")
def tiny():
    return tiny_attention()


def _originals() -> dict[type, Callable[..., Any]]:
    return {cls: cls.__dict__["__call__"] for cls in TARGET_CLASSES}


def _assert_unpatched(originals: dict[type, Callable[..., Any]]) -> None:
    for cls, original in originals.items():
        assert cls.__dict__["__call__"] is original, f"{cls.__module__}.{cls.__qualname__} kept a patched __call__"
    assert interception.bound_targets() == {}


def _assert_patched(originals: dict[type, Callable[..., Any]]) -> None:
    for cls, original in originals.items():
        gate = cls.__dict__["__call__"]
        assert gate is not original and gate.__flashpatch_original__ is original, cls
    assert set(interception.bound_targets()) >= {f"{cls.__module__}.Attention" for cls in TARGET_CLASSES}


# --- context managers ------------------------------------------------------------------------------


def test_enable_patches_for_the_block_only() -> None:
    originals = _originals()
    with flashpatch.enable("xla", verify=True) as active:
        assert active == Settings(backend="xla", verify=True) == settings.current()
        _assert_patched(originals)
    assert settings.current() is None
    _assert_unpatched(originals)


def test_innermost_block_wins_and_leaving_restores() -> None:
    originals = _originals()
    with flashpatch.enable("xla"):
        with flashpatch.enable("reference"):
            assert settings.current() == Settings("reference")
            with flashpatch.disable() as off:
                assert off is None and settings.current() is None
                _assert_patched(originals)  # other blocks still hold the classes
            assert settings.current() == Settings("reference")
        assert settings.current() == Settings("xla")
    assert settings.current() is None
    _assert_unpatched(originals)


def test_exception_restores_state() -> None:
    originals = _originals()
    with pytest.raises(KeyError, match="boom"), flashpatch.enable("xla"), flashpatch.enable("reference"):
        raise KeyError("boom")
    assert settings.current() is None
    _assert_unpatched(originals)


def test_enabling_twice_is_harmless(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_attention(monkeypatch)
    originals = _originals()
    with flashpatch.enable("xla"), flashpatch.enable("xla"):
        _assert_patched(originals)
        tiny.trace()
    assert [c.settings for c in calls] == [Settings("xla")], "the class was patched twice or not at all"
    tiny.trace()
    assert len(calls) == 1, "the original ran patched after leaving"
    _assert_unpatched(originals)


def test_enable_as_decorator() -> None:
    originals = _originals()

    @flashpatch.enable("reference")
    def seen(fail: bool = False) -> Settings | None:
        if fail:
            raise RuntimeError("inside")
        return settings.current()

    assert seen() == Settings("reference")
    assert seen() == Settings("reference")  # the decorator makes a fresh block per call
    with pytest.raises(RuntimeError, match="inside"):
        seen(fail=True)
    assert settings.current() is None
    _assert_unpatched(originals)


def test_patched_attention_runs_through_flashpatch_and_matches(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_attention(monkeypatch)
    run = jax.jit(lambda params: tiny(params))
    original = run(tiny.params)
    assert calls == []
    with flashpatch.enable("xla"):
        patched = run(tiny.params)
        with flashpatch.disable():
            again = run(tiny.params)
    assert [(c.settings, c.site) for c in calls] == [(Settings("xla"), "flashpatch.testing.gemma.Attention")]
    assert rel_err(patched, original) < 2e-5
    assert bool(jnp.all(again == original))


def test_install_uninstall_idempotent() -> None:
    originals = _originals()
    flashpatch.uninstall()  # harmless with nothing installed
    assert flashpatch.installed() is None
    try:
        flashpatch.install("xla")
        flashpatch.install("xla")
        assert flashpatch.installed() == Settings("xla") == settings.current()
        _assert_patched(originals)
        flashpatch.install("reference", verify=True)
        assert flashpatch.installed() == Settings("reference", verify=True)
        with flashpatch.disable():
            assert settings.current() is None
        with flashpatch.enable("xla"):
            assert settings.current() == Settings("xla")
        assert settings.current() == Settings("reference", verify=True)
    finally:
        flashpatch.uninstall()
    flashpatch.uninstall()
    assert flashpatch.installed() is None and settings.current() is None
    _assert_unpatched(originals)  # one install, however often repeated, holds the classes once


def test_enable_outlives_uninstall() -> None:
    originals = _originals()
    with flashpatch.enable("xla"):
        flashpatch.install("reference")
        flashpatch.uninstall()
        assert settings.current() == Settings("xla")
        _assert_patched(originals)
    _assert_unpatched(originals)


# --- lazy binding ----------------------------------------------------------------------------------


@pytest.fixture
def fresh_gemma(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A not-yet-imported module with its own copy of openpi's Gemma (a new Attention class)."""
    name = f"fp_lazy_gemma_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(pathlib.Path(gemma.__file__).read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _trace_attention(module: Any) -> jax.ShapeDtypeStruct:
    """Trace init + call of `module.Attention` (no compiling, no running: the spy sees the path)."""
    cfg = module.get_config("tiny")
    x = jax.ShapeDtypeStruct((1, 4, cfg.width), jnp.float32)
    positions, mask = jnp.arange(4)[None], jnp.tril(jnp.ones((4, 4), bool))[None, None]
    attention = module.Attention(configs=(cfg,))

    def init_and_call(x):
        params = attention.init(jax.random.PRNGKey(0), [x], positions, mask, None)
        return attention.apply(params, [x], positions, mask, None)[0][0]

    return jax.eval_shape(init_and_call, x)


def test_enable_before_import_binds_on_import(fresh_gemma: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_attention(monkeypatch)
    flashpatch.register_target(fresh_gemma, "Attention", kind="gemma")
    with flashpatch.enable("xla"):
        assert fresh_gemma not in sys.modules
        module = importlib.import_module(fresh_gemma)
        gate = module.Attention.__dict__["__call__"]
        original = gate.__flashpatch_original__
        assert interception.bound_targets()[f"{fresh_gemma}.Attention"] is module.Attention
        _trace_attention(module)
    assert calls and {c.site for c in calls} == {f"{fresh_gemma}.Attention"}
    assert module.Attention.__dict__["__call__"] is original
    assert interception.bound_targets() == {}


def test_import_before_enable_binds_on_enable(fresh_gemma: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_attention(monkeypatch)
    module = importlib.import_module(fresh_gemma)
    original = module.Attention.__dict__["__call__"]
    flashpatch.register_target(fresh_gemma, "Attention", kind="gemma")
    with flashpatch.enable("xla"):
        assert module.Attention.__dict__["__call__"].__flashpatch_original__ is original
        _trace_attention(module)
    assert calls and {c.site for c in calls} == {f"{fresh_gemma}.Attention"}
    assert module.Attention.__dict__["__call__"] is original


def test_register_while_enabled_binds_at_once(fresh_gemma: str) -> None:
    module = importlib.import_module(fresh_gemma)
    original = module.Attention.__dict__["__call__"]
    with flashpatch.enable("xla"):
        assert f"{fresh_gemma}.Attention" not in interception.bound_targets()
        flashpatch.register_target(fresh_gemma, "Attention", kind="gemma")
        assert module.Attention.__dict__["__call__"].__flashpatch_original__ is original
    assert module.Attention.__dict__["__call__"] is original


def test_reexported_class_is_patched_once(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """openpi's class reached through a second registered name is wrapped once and restored once."""
    name = f"fp_reexport_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("from flashpatch.testing.gemma import Attention  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    original = gemma.Attention.__dict__["__call__"]
    flashpatch.register_target(name, "Attention", kind="gemma")
    try:
        with flashpatch.enable("xla"):
            module = importlib.import_module(name)
            assert module.Attention is gemma.Attention
            assert gemma.Attention.__dict__["__call__"].__flashpatch_original__ is original
        assert gemma.Attention.__dict__["__call__"] is original
    finally:
        sys.modules.pop(name, None)


def test_layout_guard_traces_the_replacement(fresh_gemma: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replacement that would change the parameter tree is caught before it runs (regression:
    the guard's dry run once compared the original with itself)."""
    module = importlib.import_module(fresh_gemma)
    target = flashpatch.register_target(fresh_gemma, "Attention", kind="gemma")
    adapter_cls = type(target.adapter)
    real_forward = adapter_cls.forward

    def forward_with_extra_param(self, instance, call, core):
        instance.param("extra", nn.initializers.zeros, (3,))
        return real_forward(self, instance, call, core)

    monkeypatch.setattr(adapter_cls, "forward", forward_with_extra_param)
    calls = spy_attention(monkeypatch)
    with (
        pytest.warns(flashpatch.FlashpatchWarning, match=r"would not reproduce the original \(at .*extra"),
        flashpatch.enable("xla"),
    ):
        _trace_attention(module)
    assert calls == [], "the drifted replacement ran"


# --- threads -------------------------------------------------------------------------------------------


def _in_thread(fn: Callable[[], Any]) -> Any:
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    if errors:
        raise errors[0]
    return result[0]


def test_enable_is_per_thread() -> None:
    entered, seen = threading.Barrier(2, timeout=30), {}

    def enabled() -> None:
        with flashpatch.enable("xla"):
            entered.wait()  # both threads are now past their start
            seen["enabled"] = settings.current()
            entered.wait()

    def plain() -> None:
        entered.wait()
        seen["plain"] = settings.current()
        entered.wait()

    threads = [threading.Thread(target=enabled), threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == {"enabled": Settings("xla"), "plain": None}
    assert settings.current() is None


def test_new_thread_starts_from_process_default() -> None:
    with flashpatch.enable("xla"):
        assert _in_thread(settings.current) is None  # an enable() block is not inherited
    flashpatch.install("reference")
    try:
        with flashpatch.enable("xla"):
            assert _in_thread(settings.current) == Settings("reference")
    finally:
        flashpatch.uninstall()
    assert _in_thread(settings.current) is None


def test_install_reaches_running_threads_without_their_own_block() -> None:
    installed, read = threading.Event(), {}

    def follower() -> None:
        installed.wait(30)
        read["follower"] = settings.current()

    def own_block() -> None:
        with flashpatch.disable():
            installed.wait(30)
            read["disabled"] = settings.current()
        with flashpatch.enable("xla"):
            read["enabled"] = settings.current()

    threads = [threading.Thread(target=follower), threading.Thread(target=own_block)]
    for thread in threads:
        thread.start()
    flashpatch.install("reference")
    try:
        installed.set()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        flashpatch.uninstall()
    assert read == {"follower": Settings("reference"), "disabled": None, "enabled": Settings("xla")}


# --- @patch on model factories -------------------------------------------------------------------------

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
    assert settings.current() is None and interception.bound_targets() == {}, "flashpatch leaked out of the model"

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
    state = numpy_params(abstract_state)
    del calls[:]
    patched = _run_nnx(nnx.merge(graphdef, state))
    assert calls and all(c.settings == Settings("xla") for c in calls), "the patch did not survive split/merge"
    assert settings.current() is None and interception.bound_targets() == {}, "flashpatch leaked out of the model"

    del calls[:]
    plain_graphdef, _ = nnx.split(nnx.eval_shape(lambda: _Pi0Like(nnx.Rngs(0))))
    original = _run_nnx(nnx.merge(plain_graphdef, state))
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


# --- what users found, each fixed (these tests failed before the fixes) ----------------------------------


def test_leaving_a_block_on_another_thread_raises_and_unpatches_the_thread_that_entered_it() -> None:
    from patching import ZeroBackend, ran_patched

    from flashpatch import backends

    tiny = tiny_attention()
    originals = _originals()
    with backends.override("xla", ZeroBackend()):
        run = jax.jit(lambda params: tiny(params))
        block = flashpatch.enable("xla")
        block.__enter__()
        assert ran_patched(run(tiny.params))
        with pytest.raises(RuntimeError, match=r"entered on thread .* left on thread"):
            _in_thread(lambda: block.__exit__(None, None, None))
        assert settings.current() is None, "the thread that entered the block still runs patched"
        _assert_unpatched(originals)
        assert not ran_patched(run(tiny.params)), "a function compiled inside the block still runs patched"
        with flashpatch.enable("xla"):  # this thread's next block: patched again, freshly traced
            assert settings.current() == Settings("xla")
            assert ran_patched(run(tiny.params))
        assert not ran_patched(run(tiny.params))
        block.__exit__(None, None, None)  # the entering thread may still leave it: a no-op now
    _assert_unpatched(originals)


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
    assert settings.current() is None and interception.bound_targets() == {}, "flashpatch leaked out of the model"


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


def test_one_enable_object_enters_nested_and_in_sequence() -> None:
    originals = _originals()
    block = flashpatch.enable("xla")
    with block as outer:
        with block as inner:
            assert outer == inner == Settings("xla") == settings.current()
            with flashpatch.disable():
                assert settings.current() is None
        assert settings.current() == Settings("xla")
        _assert_patched(originals)
    assert settings.current() is None
    _assert_unpatched(originals)
    for _ in range(2):
        with block:
            assert settings.current() == Settings("xla")
    assert settings.current() is None
    _assert_unpatched(originals)


def test_enable_and_disable_decorate_without_parentheses() -> None:
    @flashpatch.enable
    def enabled() -> Settings | None:
        return settings.current()

    @flashpatch.disable
    def disabled() -> Settings | None:
        return settings.current()

    assert enabled.__name__ == "enabled"
    assert enabled() == Settings()
    with flashpatch.enable("xla"):
        assert disabled() is None
        assert enabled() == Settings()
        assert settings.current() == Settings("xla")
    assert settings.current() is None


def test_a_failure_while_entering_leaves_nothing_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashpatch import jit_cache

    originals = _originals()

    def broken(key):
        raise RuntimeError("no cache key today")

    monkeypatch.setattr(jit_cache, "keyed", broken)
    with pytest.raises(RuntimeError, match="no cache key today"), flashpatch.enable("xla"):
        pass
    monkeypatch.undo()
    assert settings.current() is None
    _assert_unpatched(originals)


def test_leaving_nested_blocks_out_of_order_leaves_nothing_patched() -> None:
    outer, inner = flashpatch.enable("xla"), flashpatch.enable("reference")
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        outer.__exit__(None, None, None)
    assert settings.current() is None, "the thread is still patched after its outer block ended"
    inner.__exit__(None, None, None)  # a no-op now, and no second error
    assert settings.current() is None and not interception.bound_targets()


def test_leaving_blocks_out_of_order_leaves_no_stale_jit_key() -> None:
    """After blocks were left out of order, a function jitted while off must still retrace when enabled."""
    from patching import ZeroBackend, ran_patched, tiny_attention

    from flashpatch import backends

    tiny = tiny_attention()
    outer, inner = flashpatch.enable("xla"), flashpatch.enable("reference")
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(RuntimeError):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    with backends.override("xla", ZeroBackend()):
        run = jax.jit(lambda params: tiny(params))
        assert not ran_patched(run(tiny.params)), "off, yet the patched path ran"
        with flashpatch.enable("xla"):
            assert ran_patched(run(tiny.params)), "enabled, yet a stale compiled function ran"
