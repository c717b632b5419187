"""Shared test set-up: fresh flashpatch state around every test, GPU tests skipped without a GPU."""

from __future__ import annotations

import contextlib

import jax
import pytest

from flashpatch import backends
from flashpatch.testing import fresh_state, register

register()

pytest_plugins = ["pytester"]


@pytest.fixture
def use_backend():
    """use_backend(name, instance): `name` computed by `instance` for the rest of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda name, backend: stack.enter_context(backends.override(name, backend))


#: The quick subset (`-m "not slow"`) for the inner loop: every test, but of the long parametrized checks only
#: float32 and the layouts that differ most (pi0 with padding mid-sequence, pi0-FAST, a decode step, an arbitrary
#: mask); the other parametrizations and the end-to-end training runs are marked slow. CI runs everything.
QUICK_PARAMS = ("pi0_padding_mid", "pi0_fast", "decode_t1", "arbitrary", "pi0", "fast", "openpi_mask")
SLOW_FILES = ("test_multidevice.py",)


def _slow(item) -> bool:
    if item.path.name in SLOW_FILES:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    values = [str(v) for v in callspec.params.values()]
    layouts = [v for v in values if v not in ("float32", "bfloat16", "True", "False")]
    return "bfloat16" in values or (bool(layouts) and not any(v in QUICK_PARAMS for v in layouts))


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if _slow(item):
            item.add_marker(slow)
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_flashpatch(monkeypatch: pytest.MonkeyPatch):
    """Every test starts and ends with flashpatch off and nothing patched (unless a session-wide install), with
    no compile-guard verdicts of earlier tests, and blind to the developer's own `tune` tables (tests/test_tune.py
    gives each of its tests a cache of its own)."""
    from flashpatch.core import guard, tuning

    monkeypatch.setenv(tuning.ENV, "off")
    guard.forget()
    with fresh_state():
        yield
