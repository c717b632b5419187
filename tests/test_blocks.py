"""enable() / disable() blocks and decorators, install() / uninstall(): what is in force, and what is patched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err
from patching import spy_attention, tiny_attention

import flashpatch
from flashpatch.switch import interception, jit_key, state
from flashpatch.switch.settings import Settings
from flashpatch.switch.state import Mode, Source
from flashpatch.testing import gemma, gemma_fast

TARGET_CLASSES = (gemma.Attention, gemma_fast.Attention)


@pytest.fixture(scope="module")
def tiny():
    return tiny_attention()


def _originals() -> dict[type, Callable[..., Any]]:
    return {cls: cls.__dict__["__call__"] for cls in TARGET_CLASSES}


def assert_unpatched(originals: dict[type, Callable[..., Any]]) -> None:
    for cls, original in originals.items():
        assert cls.__dict__["__call__"] is original, f"{cls.__module__}.{cls.__qualname__} kept a patched __call__"
    assert interception.bound_targets() == {}


def assert_patched(originals: dict[type, Callable[..., Any]]) -> None:
    for cls, original in originals.items():
        gate = cls.__dict__["__call__"]
        assert gate is not original and gate.__flashpatch_original__ is original, cls
    assert set(interception.bound_targets()) >= {f"{cls.__module__}.Attention" for cls in TARGET_CLASSES}


def test_enable_patches_for_the_block_only() -> None:
    originals = _originals()
    with flashpatch.enable("xla", verify=True) as active:
        assert active == Settings(backend="xla", verify=True) == state.current()
        frame = state.top()
        assert (frame.mode, frame.source, frame.key) == (Mode.ON, Source.BLOCK, active.cache_key)
        assert jit_key.current() == active.cache_key
        assert_patched(originals)
    assert state.current() is None and state.open_frames() == () and jit_key.current() is None
    assert_unpatched(originals)


def test_innermost_block_wins_and_leaving_restores() -> None:
    originals = _originals()
    with flashpatch.enable("xla"):
        with flashpatch.enable("reference"):
            assert state.current() == Settings("reference")
            with flashpatch.disable() as off:
                assert off is None and state.current() is None
                assert (state.top().mode, jit_key.current()) == (Mode.OFF, "off")
                assert len(state.open_frames()) == 3
                assert_patched(originals)  # other blocks still hold the classes
            assert state.current() == Settings("reference")
        assert state.current() == Settings("xla")
    assert state.current() is None
    assert_unpatched(originals)


def test_an_exception_restores_state() -> None:
    originals = _originals()
    with pytest.raises(KeyError, match="boom"), flashpatch.enable("xla"), flashpatch.enable("reference"):
        raise KeyError("boom")
    assert state.current() is None and state.open_frames() == ()
    assert_unpatched(originals)


def test_enabling_twice_is_harmless(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_attention(monkeypatch)
    originals = _originals()
    with flashpatch.enable("xla"), flashpatch.enable("xla"):
        assert_patched(originals)
        tiny.trace()
    assert [c.settings for c in calls] == [Settings("xla")], "the class was patched twice or not at all"
    tiny.trace()
    assert len(calls) == 1, "the original ran patched after leaving"
    assert_unpatched(originals)


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


def test_backend_names_are_read_alike_everywhere() -> None:
    """enable(), Settings and FLASHPATCH_BACKEND take any case and surrounding spaces, and refuse alike."""
    from flashpatch.switch.settings import from_env

    assert Settings(" XLA ") == Settings("xla") == from_env({"FLASHPATCH": "1", "FLASHPATCH_BACKEND": "Xla "})
    with flashpatch.enable("XLA") as on:
        assert on == Settings("xla")
    with pytest.raises(ValueError, match=r"backend must be one of auto, reference, xla.*got 'nope'"):
        flashpatch.enable("nope")
    with pytest.raises(TypeError, match=r"a backend name is a str .*got int 3"):
        flashpatch.enable(3)  # type: ignore[call-overload]


# --- decorators ---------------------------------------------------------------------------------------


def test_enable_as_decorator() -> None:
    originals = _originals()

    @flashpatch.enable("reference")
    def seen(fail: bool = False) -> Settings | None:
        if fail:
            raise RuntimeError("inside")
        return state.current()

    assert seen() == Settings("reference")
    assert seen() == Settings("reference")  # the decorator makes a fresh block per call
    with pytest.raises(RuntimeError, match="inside"):
        seen(fail=True)
    assert state.current() is None
    assert_unpatched(originals)


def test_enable_and_disable_decorate_without_parentheses() -> None:
    @flashpatch.enable
    def enabled() -> Settings | None:
        return state.current()

    @flashpatch.disable
    def disabled() -> Settings | None:
        return state.current()

    assert enabled.__name__ == "enabled"
    assert enabled() == Settings()
    with flashpatch.enable("xla"):
        assert disabled() is None
        assert enabled() == Settings()
        assert state.current() == Settings("xla")
    assert state.current() is None


def test_a_decorator_refuses_what_it_cannot_decorate() -> None:
    with pytest.raises(TypeError, match=r"flashpatch.enable\('xla', verify=False\) decorates a function; got 3"):
        flashpatch.enable("xla")(3)  # type: ignore[arg-type]


# --- one object, many entries -------------------------------------------------------------------------


def test_one_enable_object_enters_nested_and_in_sequence() -> None:
    originals = _originals()
    block = flashpatch.enable("xla")
    with block as outer:
        with block as inner:
            assert outer == inner == Settings("xla") == state.current()
            with flashpatch.disable():
                assert state.current() is None
        assert state.current() == Settings("xla")
        assert_patched(originals)
    assert state.current() is None
    assert_unpatched(originals)
    for _ in range(2):
        with block:
            assert state.current() == Settings("xla")
    assert state.current() is None
    assert_unpatched(originals)


def test_leaving_a_block_more_often_than_entering_it_says_so_and_changes_nothing() -> None:
    block = flashpatch.enable("xla")
    with block:
        pass
    with flashpatch.enable("reference"):
        left = r"flashpatch.enable\('xla', verify=False\) was left on thread .* not open"
        with pytest.raises(RuntimeError, match=left):
            block.__exit__(None, None, None)
        assert state.current() == Settings("reference"), "a failed exit changed what is in force"


def test_leaving_an_outer_block_first_keeps_the_inner_one_in_force() -> None:
    """Out of order (manual __enter__/__exit__, or a generator sharing its caller's context): each exit closes its
    own frame; what is in force is always the innermost frame still open, and JAX's key follows it."""
    originals = _originals()
    outer, inner = flashpatch.enable("xla"), flashpatch.enable("reference")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert state.current() == Settings("reference") and jit_key.current() == Settings("reference").cache_key
    assert_patched(originals)
    inner.__exit__(None, None, None)
    assert state.current() is None and state.open_frames() == () and jit_key.current() is None
    assert_unpatched(originals)


def test_a_failure_while_entering_leaves_nothing_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    originals = _originals()

    def broken(key):
        raise RuntimeError("no cache key today")

    monkeypatch.setattr(jit_key, "apply", broken)
    with pytest.raises(RuntimeError, match="no cache key today"), flashpatch.enable("xla"):
        pass
    monkeypatch.undo()
    assert state.current() is None and state.open_frames() == () and state.holders() == 0
    assert_unpatched(originals)


def test_leaving_releases_the_hold_even_when_rekeying_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """One step of leaving failing (here: JAX's key) must not leave the targets patched process-wide."""
    originals = _originals()
    block = flashpatch.enable("xla")
    block.__enter__()
    real = jit_key.apply

    def broken(key):
        raise RuntimeError("no cache key today")

    monkeypatch.setattr(jit_key, "apply", broken)
    with pytest.raises(RuntimeError, match="no cache key today"):
        block.__exit__(None, None, None)
    monkeypatch.setattr(jit_key, "apply", real)
    jit_key.apply(None)
    assert state.open_frames() == () and state.holders() == 0
    assert_unpatched(originals)


def test_a_mode_that_runs_the_gate_needs_settings() -> None:
    with pytest.raises(ValueError, match="TRACE_ORIGINAL needs settings"):
        state.enter(None, Mode.TRACE_ORIGINAL)
    assert state.open_frames() == () and not interception.bound_targets()


def test_every_mode_has_its_own_jit_key() -> None:
    chosen = Settings("xla")
    keys = set()
    for mode in Mode:
        with state.entered(None if mode is Mode.OFF else chosen, mode, Source.GUARD) as frame:
            keys.add(frame.key)
            assert jit_key.current() == frame.key
            assert state.current() == (chosen if mode in (Mode.ON, Mode.TRACE_REPLACEMENT) else None)
    assert len(keys) == len(Mode)


# --- the process default ----------------------------------------------------------------------------------


def test_install_uninstall_idempotent() -> None:
    originals = _originals()
    flashpatch.uninstall()  # harmless with nothing installed
    assert flashpatch.installed() is None
    try:
        flashpatch.install("xla")
        flashpatch.install("xla")
        assert flashpatch.installed() == Settings("xla") == state.current()
        assert jit_key.current() == Settings("xla").cache_key
        assert_patched(originals)
        flashpatch.install("reference", verify=True)
        assert flashpatch.installed() == Settings("reference", verify=True)
        with flashpatch.disable():
            assert state.current() is None
        with flashpatch.enable("xla"):
            assert state.current() == Settings("xla")
        assert state.current() == Settings("reference", verify=True)
    finally:
        flashpatch.uninstall()
    flashpatch.uninstall()
    assert flashpatch.installed() is None and state.current() is None and state.holders() == 0
    assert_unpatched(originals)  # one install, however often repeated, holds the classes once


def test_enable_outlives_uninstall() -> None:
    originals = _originals()
    with flashpatch.enable("xla"):
        flashpatch.install("reference")
        flashpatch.uninstall()
        assert state.current() == Settings("xla")
        assert_patched(originals)
    assert_unpatched(originals)


def test_a_failed_install_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(key):
        raise RuntimeError("no global key today")

    monkeypatch.setattr(jit_key, "set_global", broken)
    with pytest.raises(RuntimeError, match="no global key today"):
        flashpatch.install("xla")
    assert flashpatch.installed() is None and state.holders() == 0 and not interception.bound_targets()
