"""What the wheel ships: the package's folders, the interpreter-start hook, and the license pyproject declares."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    [built] = out.glob("flashpatch-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_ships_the_license_it_declares(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    [license_file] = [n for n in names if n.endswith("/licenses/LICENSE")]
    text = wheel.read(license_file).decode()
    assert text == (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "Apache-2.0" in wheel.read(metadata).decode()


def test_the_wheel_ships_every_folder_of_the_package_and_the_hook(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for module in ("switch/state.py", "core/attention.py", "core/guard.py", "tools/doctor.py", "backends/machine.py"):
        assert f"flashpatch/{module}" in names, module
    assert {"flashpatch_autoload.pth", "_flashpatch_autoload.py"} <= names
