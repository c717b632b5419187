"""The interpreter-start hook (`flashpatch_autoload.pth` -> `_flashpatch_autoload`), in fresh interpreters.

Subprocesses find flashpatch where this test found it (the source tree's src/ or site-packages),
and a fake `openpi` (re-exporting flashpatch's openpi-compatible fixtures) in tmp_path.
"""

from __future__ import annotations

import os
import pathlib
import site
import subprocess
import sys

import pytest

import flashpatch

PACKAGE_ROOT = pathlib.Path(flashpatch.__file__).resolve().parent.parent
HEAVY = ("jax", "jaxlib", "flax", "numpy", "flashpatch")

FAKE_OPENPI = {
    "openpi/__init__.py": "",
    "openpi/models/__init__.py": "",
    "openpi/models/gemma.py": (
        "from flashpatch.testing.gemma import Attention, Config, Module, _apply_rope, _name, get_config, lora\n"
        '__all__ = ["Attention", "Config", "Module", "_apply_rope", "_name", "get_config", "lora"]\n'
    ),
    "openpi/models/gemma_fast.py": (
        "from flashpatch.testing.gemma_fast import Attention, Module, _apply_rope\n"
        '__all__ = ["Attention", "Module", "_apply_rope"]\n'
    ),
}

REPORT_PATCHED = """
import sys
import openpi.models.gemma as gemma
import flashpatch
from flashpatch import interception
print("installed", flashpatch.installed())
print("bound", sorted(interception.bound_targets()))
print("gate", getattr(gemma.Attention.__call__, "__flashpatch_original__", None) is not None)
"""


@pytest.fixture
def fake_openpi(tmp_path: pathlib.Path) -> pathlib.Path:
    for name, text in FAKE_OPENPI.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def run_python(code: str, path: pathlib.Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -c code` with FLASHPATCH* taken from `env` only, `path` then flashpatch's root on the path."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPATCH")}
    environ["PYTHONPATH"] = os.pathsep.join([str(path), str(PACKAGE_ROOT)])
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


LIST_HEAVY = f"import sys; print(' '.join(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"


def test_off_imports_nothing(tmp_path: pathlib.Path) -> None:
    done = run_python("import _flashpatch_autoload, sys; " + LIST_HEAVY + "; print('wrapt' in sys.modules)", tmp_path)
    *heavy, wrapt_loaded = done.stdout.split()
    assert heavy == [], f"with FLASHPATCH unset the hook imported {heavy}"
    assert wrapt_loaded == "False"
    assert done.stderr == ""


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_explicitly_off_imports_nothing(tmp_path: pathlib.Path, value: str) -> None:
    done = run_python("import _flashpatch_autoload; " + LIST_HEAVY, tmp_path, FLASHPATCH=value)
    assert done.stdout.split() == []


def test_on_without_openpi_imports_no_jax(fake_openpi: pathlib.Path) -> None:
    done = run_python("import _flashpatch_autoload, json; " + LIST_HEAVY, fake_openpi, FLASHPATCH="1")
    assert done.stdout.split() == [], "the hook must wait for openpi before importing flashpatch or JAX"
    assert done.stderr == ""


def _lines(stdout: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in stdout.strip().splitlines())


def test_importing_openpi_installs_process_wide(fake_openpi: pathlib.Path) -> None:
    done = run_python(
        "import _flashpatch_autoload\n" + REPORT_PATCHED, fake_openpi, FLASHPATCH="1", FLASHPATCH_BACKEND="xla"
    )
    report = _lines(done.stdout)
    assert report["installed"] == "Settings(backend='xla', verify=False)"
    assert report["bound"] == "['openpi.models.gemma.Attention']"
    assert report["gate"] == "True"
    assert "Warning" not in done.stderr, done.stderr


def test_bad_backend_warns_once_and_runs(fake_openpi: pathlib.Path) -> None:
    code = (
        "import _flashpatch_autoload\n"
        "import openpi.models.gemma, openpi.models.gemma_fast\n"  # two hooks fire, one warning
        "import flashpatch\n"
        "print('installed', flashpatch.installed())\n"
    )
    # PYTHONWARNINGS=always: Python's own once-per-location filter must not hide a second warning.
    done = run_python(
        code, fake_openpi, FLASHPATCH="1", FLASHPATCH_BACKEND="bogus", PYTHONWARNINGS="always::UserWarning"
    )
    assert _lines(done.stdout) == {"installed": "None"}
    assert done.stderr.count("flashpatch could not switch on") == 1, done.stderr
    assert "FLASHPATCH_BACKEND" in done.stderr and "'bogus'" in done.stderr, done.stderr


def _installed_pth() -> pathlib.Path | None:
    for directory in [*site.getsitepackages(), site.getusersitepackages()]:
        candidate = pathlib.Path(directory) / "flashpatch_autoload.pth"
        if candidate.is_file():
            return candidate
    return None


def test_pth_file_switches_on_a_plain_interpreter(fake_openpi: pathlib.Path) -> None:
    pth = _installed_pth()
    if pth is None:
        pytest.skip("flashpatch_autoload.pth is not in site-packages (flashpatch is not pip-installed here)")
    assert pth.read_text().strip() == "import _flashpatch_autoload"
    done = run_python(REPORT_PATCHED, fake_openpi, FLASHPATCH="1", FLASHPATCH_BACKEND="reference")
    report = _lines(done.stdout)
    assert report["installed"] == "Settings(backend='reference', verify=False)"
    assert report["gate"] == "True"

    done = run_python(REPORT_PATCHED, fake_openpi)
    assert _lines(done.stdout)["installed"] == "None", "FLASHPATCH unset, yet the .pth switched flashpatch on"
