"""Binding targets: lazily on import, once per class, restored when the last holder leaves; the drift guard's
passes run in frames of their own."""

from __future__ import annotations

import importlib
import pathlib
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from patching import spy_attention, tiny_attention

import flashpatch
from flashpatch.backends.reference import reference_attention
from flashpatch.switch import drift, interception, state
from flashpatch.switch.state import Mode
from flashpatch.testing import gemma, layouts


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


def test_the_drift_guard_passes_run_in_their_own_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate learns what to do from the frame it reads: the model's call is ON, the guard's two
    abstract passes TRACE_ORIGINAL and TRACE_REPLACEMENT, each in a frame of its own."""
    seen: list[Mode] = []
    real_top = state.top

    def top() -> state.Frame:
        frame = real_top()
        if sys._getframe(1).f_code.co_name == "flashpatch_gate":  # the gate's own read
            seen.append(frame.mode)
        return frame

    monkeypatch.setattr(state, "top", top)
    monkeypatch.setattr(drift, "_layouts", {})  # the guard checks each layout once per process
    tiny = tiny_attention(seq=5)
    with flashpatch.enable("xla"):
        tiny.trace()
        depth = len(state.open_frames())
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
