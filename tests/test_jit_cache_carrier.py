"""flashpatch.jit_cache's gate between JAX's two cache-key hooks, on fake JAX modules and on the real one."""

from __future__ import annotations

import sys
import types

import jax
import pytest

from flashpatch import jit_cache, versions

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
    assert jit_cache.carrier_name(module) == expected


@pytest.mark.parametrize("xla_metadata", [False, None], ids=["no_setter", "no_module"])
def test_carrier_name_says_what_a_jax_without_either_hook_lacks(monkeypatch, xla_metadata) -> None:
    module = fake_jax(monkeypatch, "fakejax_carrier", user_context=False, xla_metadata=xla_metadata)
    with pytest.raises(ImportError, match=r"make_user_context \(JAX >= 0.7.2\).*set_xla_metadata"):
        jit_cache.carrier_name(module)


def test_installed_jax_gets_the_carrier_its_version_promises() -> None:
    """A JAX that adds or drops `make_user_context` away from 0.7.2 fails here, not at run time."""
    version = versions.installed("jax")
    assert version is not None
    expected = "user_context" if version >= USER_CONTEXT_SINCE else "xla_metadata"
    assert jit_cache.carrier_name() == expected, f"jax {version}"


def test_the_installed_carrier_retraces_when_the_key_changes() -> None:
    traces: list[str] = []

    @jax.jit
    def double(x):
        traces.append("traced")
        return x * 2

    with jit_cache.keyed("flashpatch-test:a"):
        double(1.0)
        double(2.0)
    assert len(traces) == 1
    with jit_cache.keyed("flashpatch-test:b"):
        double(3.0)
    assert len(traces) == 2, "a new key must retrace"
    with jit_cache.keyed("flashpatch-test:a"):
        double(4.0)
    assert len(traces) == 2, "a key seen before must hit the cache"
