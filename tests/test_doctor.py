"""`python -m flashpatch doctor` runs and says what it should."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import flashpatch

SRC = pathlib.Path(flashpatch.__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "flashpatch", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_doctor_reports_versions_targets_and_the_choice() -> None:
    done = _run("doctor", "--q-len", "64", "--kv-len", "64")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("jax ", "flax ", "openpi.models.gemma.Attention", "T=64 S=64", "kvax: cannot: kvax runs on gpu"):
        assert expected in out, out
    assert "auto picks: reference" in out and "einsum is faster" in out, out


def test_doctor_for_a_long_sequence_picks_the_blockwise_path_on_cpu() -> None:
    done = _run("doctor", "--q-len", "4096", "--kv-len", "4096")
    assert done.returncode == 0 and "auto picks: xla" in done.stdout, done.stdout + done.stderr


def test_bad_invocation_is_a_usage_error() -> None:
    done = _run()
    assert done.returncode == 2 and "usage: python -m flashpatch doctor" in done.stderr
