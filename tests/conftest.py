"""Shared test set-up: fresh flashpatch state around every test, GPU tests skipped without a GPU."""

from __future__ import annotations

import jax
import pytest

import flashpatch
from flashpatch import diagnostics, interception, settings
from flashpatch.testing import register

register()

pytest_plugins = ["pytester"]


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_flashpatch():
    """Every test starts and ends with flashpatch off and nothing patched (unless a session-wide install)."""
    diagnostics.forget()
    session_default = settings.get_default()
    yield
    if settings.get_default() != session_default:
        flashpatch.uninstall()
        if session_default is not None:
            flashpatch.install(backend=session_default.backend, verify=session_default.verify)
    assert not getattr(settings._local, "stack", []), "a test left an enable() block open"
    if session_default is None:
        assert not interception.bound_targets(), "a test left targets patched"
