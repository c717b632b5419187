"""flashpatch.switch: one stack of frames per thread, the process default, and the gate's mode."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from patching import tiny_attention

import flashpatch
from flashpatch import drift, interception, switch
from flashpatch.backends.reference import reference_attention
from flashpatch.settings import Settings
from flashpatch.switch import Mode
from flashpatch.testing import layouts


def test_frames_stack_and_unstack_with_their_modes_and_keys() -> None:
    assert switch.top().mode is Mode.OFF and switch.open_frames() == ()
    with flashpatch.enable("xla") as on:
        frame = switch.top()
        assert (frame.settings, frame.mode, frame.key) == (on, Mode.ON, on.cache_key)
        with flashpatch.disable():
            assert (switch.top().mode, switch.top().key, switch.current()) == (Mode.OFF, "off", None)
            assert len(switch.open_frames()) == 2
        assert switch.top() is frame
    assert switch.open_frames() == () and switch.top().mode is Mode.OFF


def test_every_mode_has_its_own_jit_key() -> None:
    chosen = Settings("xla")
    keys = set()
    for mode in Mode:
        with switch.entered(None if mode is Mode.OFF else chosen, mode) as frame:
            keys.add(frame.key)
            assert switch.current() == (chosen if mode in (Mode.ON, Mode.TRACE_REPLACEMENT) else None)
    assert len(keys) == len(Mode)


def test_a_mode_that_runs_the_gate_needs_settings() -> None:
    with pytest.raises(ValueError, match="TRACE_ORIGINAL needs settings"):
        switch.enter(None, Mode.TRACE_ORIGINAL)
    assert switch.open_frames() == () and not interception.bound_targets()


def test_the_drift_guard_passes_run_in_their_own_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate learns what to do from the frame it reads: the model's call is ON, the guard's two
    abstract passes TRACE_ORIGINAL and TRACE_REPLACEMENT, each in a frame of its own."""
    seen: list[Mode] = []
    real_top = switch.top

    def top() -> switch.Frame:
        frame = real_top()
        seen.append(frame.mode)
        return frame

    monkeypatch.setattr(switch, "top", top)
    monkeypatch.setattr(drift, "_layouts", {})  # the guard checks each layout once per process
    tiny = tiny_attention(seq=5)
    with flashpatch.enable("xla"):
        tiny.trace()
        depth = len(switch.open_frames())
    assert seen == [Mode.ON, Mode.TRACE_ORIGINAL, Mode.TRACE_REPLACEMENT], seen
    assert depth == 1, "the guard's frames outlived its passes"


def test_the_shape_only_core_is_openpis_math_with_no_platform() -> None:
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4, 16))
    k = v = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 1, 16))
    mask = layouts.causal(2, 6).mask[:, None]
    got = drift.shape_only_core(q, k, v, mask, probs_dtype=jnp.bfloat16)
    want = reference_attention(q, k, v, mask[:, 0], jnp.bfloat16)
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        drift.shape_only_core(q, k, v, mask[:, :, :5])


def test_leaving_an_outer_block_from_another_thread_closes_what_was_opened_inside_it() -> None:
    outer, inner = flashpatch.enable("xla"), flashpatch.enable("reference")
    outer.__enter__()
    inner.__enter__()
    errors: list[BaseException] = []

    def leave_outer() -> None:
        try:
            outer.__exit__(None, None, None)
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=leave_outer, name="other")
    thread.start()
    thread.join(timeout=60)
    assert len(errors) == 1 and "left on thread 'other'" in str(errors[0]), errors
    assert switch.current() is None and not interception.bound_targets()
    inner.__exit__(None, None, None)  # closed already; leaving it here drops it with its jit key
    outer.__exit__(None, None, None)
    assert switch.open_frames() == ()


def test_one_block_object_on_several_threads_at_once() -> None:
    block = flashpatch.enable("xla")
    inside = threading.Barrier(3, timeout=30)
    seen: dict[str, Settings | None] = {}

    def worker(name: str) -> None:
        with block:
            inside.wait()
            seen[name] = switch.current()
            inside.wait()
        seen[name + " after"] = switch.current()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    with block:
        inside.wait()
        inside.wait()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == {"a": Settings("xla"), "b": Settings("xla"), "a after": None, "b after": None}
    assert not interception.bound_targets()


def test_leaving_a_block_more_often_than_entering_it_says_so() -> None:
    block = flashpatch.enable("xla")
    with block:
        pass
    with pytest.raises(RuntimeError, match=r"flashpatch.enable\('xla', verify=False\) was left more often"):
        block.__exit__(None, None, None)


def test_a_failed_install_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from flashpatch import jit_cache

    def broken(key):
        raise RuntimeError("no global key today")

    monkeypatch.setattr(jit_cache, "set_global_key", broken)
    with pytest.raises(RuntimeError, match="no global key today"):
        flashpatch.install("xla")
    assert flashpatch.installed() is None and not interception.bound_targets()
