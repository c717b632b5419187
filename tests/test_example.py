"""examples/compare_patched.py tells a CPU user what they see: why the blockwise path is not faster there,
that a backend they named could not run (without pointing at `auto`, which they did not ask for), and in
--help which backends there are."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import pytest

import flashpatch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "compare_patched.py"

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="what a CPU user sees")


def _example(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPATCH")}
    env.update(PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_named_backend_that_cannot_run_is_named_not_auto() -> None:
    done = _example("--length", "64", "--backend", "cudnn")
    assert done.returncode == 0, done.stderr
    assert "cudnn cannot run here" in done.stdout, done.stdout
    assert "auto" not in done.stdout, done.stdout


def test_help_lists_the_backends() -> None:
    done = _example("--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert ", ".join(flashpatch.backend_choices()) in text, done.stdout
    assert "float32, bfloat16" in text, done.stdout


def test_the_first_example_shows_flashpatch_at_work() -> None:
    """One run of the example (it compiles the model twice: about a minute on 2 CPU cores) checked for all it
    promises: the backend that ran, a real second computation close to the original, and why, on a CPU, the
    blockwise path is not the faster one."""
    done = _example("--length", "64")
    assert done.returncode == 0, done.stderr
    assert "flashpatch.enable('xla') ran: xla" in done.stdout, done.stdout
    diff = float(done.stdout.split("outputs ")[1].split(",")[0])
    assert 0 < diff < 1e-3, done.stdout  # a real second computation, close to the original
    assert "flashpatch (xla)" in done.stdout
    text = " ".join(done.stdout.split())
    assert "on a CPU at this size the einsum is usually faster" in text, done.stdout
    assert "for memory" in text, done.stdout


def test_the_first_example_rejects_a_too_short_sequence_in_one_line() -> None:
    done = _example("--length", "5")
    assert done.returncode == 2 and "--length must be at least" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
