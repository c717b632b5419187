"""Every way a user may call the command line answers: `--version`, `python -m flashpatch.tools.doctor`;
none prints nothing and exits 0."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import flashpatch

SRC = pathlib.Path(flashpatch.__file__).resolve().parents[1]


def _run(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPATCH")}
    environ.update(PYTHONPATH=str(SRC), JAX_PLATFORMS="cpu", **env)
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=environ, capture_output=True, text=True, timeout=120
    )


def test_version_prints_the_version() -> None:
    for args in (("--version",), ("-V",)):
        done = _run("flashpatch", *args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"flashpatch {flashpatch.__version__}", done.stdout


def test_usage_names_version() -> None:
    assert "--version" in _run("flashpatch", "--help").stdout


def test_doctor_runs_as_its_own_module() -> None:
    done = _run("flashpatch.tools.doctor", "--q-len", "64", "--kv-len", "64")
    assert done.returncode == 0, done.stderr
    assert "flashpatch doctor" in done.stdout and "auto picks:" in done.stdout, done.stdout
    helped = _run("flashpatch.tools.doctor", "--help")
    assert helped.returncode == 0 and "usage: python -m flashpatch doctor" in helped.stdout, helped.stdout
