"""The parity lab's tests: its harness (benchmarks/parity) on the path, the fixture models patched like openpi's,
and flashpatch's state fresh around every test, as in the package's own suite (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

from flashpatch import backends
from flashpatch.testing import fresh_state, register

register()
#: The harness's modules import each other by name (they run as scripts: `python benchmarks/parity/...`).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def use_backend():
    """use_backend(name, instance): `name` computed by `instance` for the rest of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda name, backend: stack.enter_context(backends.override(name, backend))


@pytest.fixture(autouse=True)
def _clean_flashpatch():
    """Every test starts with every message unsaid and ends with flashpatch as it found it."""
    with fresh_state():
        yield
