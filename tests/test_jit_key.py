"""flashpatch.switch.jit_key: which of JAX's two cache-key hooks it uses (on fake JAX modules and the real one), and
that the installed one keys jit's cache per thread and process-wide."""

from __future__ import annotations

import sys
import threading
import types

import jax
import jax.numpy as jnp
import pytest

import flashpatch
from flashpatch import versions
from flashpatch.switch import jit_key

#: The first JAX release with `jax.make_user_context` (0.7.1 has none; checked in the released wheels).
USER_CONTEXT_SINCE = versions.parse("0.7.2")


def fake_jax(monkeypatch, name: str, *, user_context: bool, xla_metadata: bool | None) -> types.ModuleType:
    """A module tree `name`, `name.experimental[.xla_metadata]` offering the asked-for hooks.

    xla_metadata: True offers set_xla_metadata, False a module without it, None no module at all.
    """
    root = types.ModuleType(name)
    if user_context:
        root.make_user_context = lambda default: None
    experimental = types.ModuleType(f"{name}.experimental")
    monkeypatch.setitem(sys.modules, name, root)
    monkeypatch.setitem(sys.modules, experimental.__name__, experimental)
    if xla_metadata is not None:
        metadata = types.ModuleType(f"{name}.experimental.xla_metadata")
        if xla_metadata:
            metadata.set_xla_metadata = lambda **kwargs: None
        monkeypatch.setitem(sys.modules, metadata.__name__, metadata)
    return root


@pytest.mark.parametrize(
    ("user_context", "xla_metadata", "expected"),
    [
        (True, True, "user_context"),  # JAX >= 0.7.2 has both; the public hook wins
        (True, None, "user_context"),  # a future JAX that drops xla_metadata
        (False, True, "xla_metadata"),  # openpi's JAX 0.5.3
    ],
)
def test_carrier_name_on_fake_jax(monkeypatch, user_context, xla_metadata, expected) -> None:
    module = fake_jax(monkeypatch, "fakejax_carrier", user_context=user_context, xla_metadata=xla_metadata)
    assert jit_key.carrier_name(module) == expected


@pytest.mark.parametrize("xla_metadata", [False, None], ids=["no_setter", "no_module"])
def test_carrier_name_says_what_a_jax_without_either_hook_lacks(monkeypatch, xla_metadata) -> None:
    module = fake_jax(monkeypatch, "fakejax_carrier", user_context=False, xla_metadata=xla_metadata)
    with pytest.raises(ImportError, match=r"make_user_context \(JAX >= 0.7.2\).*set_xla_metadata"):
        jit_key.carrier_name(module)


def test_installed_jax_gets_the_carrier_its_version_promises() -> None:
    """A JAX that adds or drops `make_user_context` away from 0.7.2 fails here, not at run time."""
    version = versions.installed("jax")
    assert version is not None
    expected = "user_context" if version >= USER_CONTEXT_SINCE else "xla_metadata"
    assert jit_key.carrier_name() == expected, f"jax {version}"


def test_installed_jax_keys_its_caches_on_flashpatch() -> None:
    """Fails on a JAX release that drops both hooks, or whose hook stops keying jit's cache."""
    name = jit_key.carrier_name()
    traces: list[int] = []

    @jax.jit
    def f(x):
        traces.append(1)
        return x + 1

    one = jnp.float32(1)
    try:
        jit_key.apply("flashpatch-test:a")
        f(one)
        f(one)
        assert len(traces) == 1, f"JAX {jax.__version__} ({name}): the same key retraced"
        jit_key.apply("flashpatch-test:b")
        f(one)
        assert len(traces) == 2, f"JAX {jax.__version__} ({name}): a new key did not retrace"
        jit_key.apply("flashpatch-test:a")
        f(one)
        assert len(traces) == 2, f"JAX {jax.__version__} ({name}): a key seen before did not hit the cache"
    finally:
        jit_key.apply(None)
    assert jit_key.current() is None

    default = flashpatch.installed()
    jit_key.set_global("flashpatch-test:global")
    try:
        assert jit_key.current() == "flashpatch-test:global"
        f(one)
        assert len(traces) == 3, f"JAX {jax.__version__} ({name}): a new process-wide key did not retrace"
    finally:
        jit_key.set_global(default.cache_key if default else None)


def test_an_override_is_per_thread() -> None:
    seen: dict[str, str | None] = {}
    jit_key.apply("flashpatch-test:here")
    try:
        thread = threading.Thread(target=lambda: seen.setdefault("other", jit_key.current()))
        thread.start()
        thread.join(timeout=60)
        seen["here"] = jit_key.current()
    finally:
        jit_key.apply(None)
    assert seen == {"other": None, "here": "flashpatch-test:here"}
