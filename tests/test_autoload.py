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
#: What the hook may import at start-up when FLASHPATCH is set: the settings and the registry, no JAX.
LIGHT = (
    "flashpatch",
    "flashpatch.switch",
    "flashpatch.switch.settings",
    "flashpatch.backends",
    "flashpatch.diagnostics",
    "flashpatch.openpi_sites",
)

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
from flashpatch.switch import interception
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


def run_python(code: str, path: pathlib.Path, *flags: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python [flags] -c code` with FLASHPATCH* taken from `env` only, `path` then flashpatch's root on the path."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPATCH")}
    environ["PYTHONPATH"] = os.pathsep.join([str(path), str(PACKAGE_ROOT)])
    environ.update(env)
    done = subprocess.run(
        [sys.executable, *flags, "-c", code], env=environ, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


SOURCE_PTH = pathlib.Path(__file__).resolve().parents[1] / "src" / "flashpatch_autoload.pth"
#: What site.py does with the .pth at start-up, for an interpreter where flashpatch is not pip-installed.
PROCESS_PTH = f"import site; site.addpackage({str(SOURCE_PTH.parent)!r}, {SOURCE_PTH.name!r}, set())\n"
LIST_HEAVY = f"import sys; print(' '.join(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"


def test_off_imports_nothing(tmp_path: pathlib.Path) -> None:
    done = run_python("import _flashpatch_autoload, sys; " + LIST_HEAVY + "; print('wrapt' in sys.modules)", tmp_path)
    *heavy, wrapt_loaded = done.stdout.split()
    assert heavy == [], f"with FLASHPATCH unset the hook imported {heavy}"
    assert wrapt_loaded == "False"
    assert done.stderr == ""


def test_the_hook_reads_off_as_settings_does(tmp_path: pathlib.Path) -> None:
    """The hook decides "off" before importing flashpatch, with its own copy of the spellings: the same ones."""
    code = (
        "import _flashpatch_autoload as hook; from flashpatch.switch import settings\n"
        "print(set(hook._OFF) == set(settings.OFF_SPELLINGS))"
    )
    assert run_python(code, tmp_path).stdout.strip() == "True"


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_explicitly_off_imports_nothing(tmp_path: pathlib.Path, value: str) -> None:
    done = run_python("import _flashpatch_autoload; " + LIST_HEAVY, tmp_path, FLASHPATCH=value)
    assert done.stdout.split() == []


def test_on_without_openpi_imports_no_jax(fake_openpi: pathlib.Path) -> None:
    done = run_python("import _flashpatch_autoload, json; " + LIST_HEAVY, fake_openpi, FLASHPATCH="1")
    heavy = [m for m in done.stdout.split() if m not in LIGHT]
    assert heavy == [], f"the hook must wait for openpi before importing JAX or flashpatch's core; it imported {heavy}"
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


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FLASHPATCH": "banana"}, "environment variable FLASHPATCH must be one of"),
        ({"FLASHPATCH": "1", "FLASHPATCH_BACKEND": "nonsense"}, "FLASHPATCH_BACKEND must be one of auto"),
        ({"FLASHPATCH": "1", "FLASHPATCH_VERIFY": "maybe"}, "FLASHPATCH_VERIFY must be one of"),
    ],
)
def test_a_typo_is_loud_at_start_and_again_when_openpi_comes(fake_openpi: pathlib.Path, env, named: str) -> None:
    """A typo must not quietly cost a training run its speed-up: a FlashpatchWarning when the interpreter
    starts (before openpi is imported), one more when openpi is imported, and flashpatch stays off."""
    code = (
        "import sys\n"
        "import _flashpatch_autoload\n"
        "print('started', flush=True); print('-- openpi --', file=sys.stderr, flush=True)\n"
        "import openpi.models.gemma, openpi.models.gemma_fast\n"  # two modules, one more warning
        "import flashpatch\n"
        "print('installed', flashpatch.installed())\n"
    )
    done = run_python(code, fake_openpi, PYTHONWARNINGS="always", **env)
    assert "installed None" in done.stdout, done.stdout
    at_start, _, at_import = done.stderr.partition("-- openpi --")
    for part, when in ((at_start, "at start"), (at_import, "at openpi's import")):
        assert part.count("FlashpatchWarning: ") == 1, f"{when}: {part}"
        assert named in part and "flashpatch is OFF" in part, f"{when}: {part}"
    assert "Traceback" not in done.stderr


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
    assert pth.read_text() == SOURCE_PTH.read_text(), "the installed .pth is not the one in src/"
    done = run_python(REPORT_PATCHED, fake_openpi, FLASHPATCH="1", FLASHPATCH_BACKEND="reference")
    report = _lines(done.stdout)
    assert report["installed"] == "Settings(backend='reference', verify=False)"
    assert report["gate"] == "True"

    done = run_python(REPORT_PATCHED, fake_openpi)
    assert _lines(done.stdout)["installed"] == "None", "FLASHPATCH unset, yet the .pth switched flashpatch on"


def test_the_pth_line_imports_nothing_of_ours_while_off(tmp_path: pathlib.Path) -> None:
    done = run_python(PROCESS_PTH + "import sys; print(sorted(m for m in sys.modules if 'flashpatch' in m))", tmp_path)
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("flag", ["", "1"])
def test_pytest_runs_clean_beside_the_hook(tmp_path: pathlib.Path, flag: str) -> None:
    """Another project's pytest run in a venv with flashpatch (its .pth processed at start-up, the pytest
    plugin registered) must not warn, not even under `-W error`, with FLASHPATCH unset or set."""
    test_file = tmp_path / "test_other_project.py"
    test_file.write_text("def test_nothing():\n    assert 1 + 1 == 2\n")
    code = PROCESS_PTH + (
        "import sys, pytest\n"
        f"sys.exit(pytest.main([{str(test_file)!r}, '-q', '-W', 'error', '-p', 'no:cacheprovider']))\n"
    )
    done = run_python(code, tmp_path, **({"FLASHPATCH": flag} if flag else {}))
    assert "1 passed" in done.stdout and "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr


@pytest.mark.parametrize("warnings_flag", ["error", "default"])
def test_a_bad_variable_under_warnings_as_errors_is_one_line_at_start(tmp_path: pathlib.Path, warnings_flag) -> None:
    """`python -W error` turns the hook's warning into an exception inside site.py, which printed some 80 lines of
    chained tracebacks; the hook says it in one line, and the interpreter starts."""
    done = run_python(PROCESS_PTH + "print('started')", tmp_path, "-W", warnings_flag, FLASHPATCH="maybe")
    assert done.stdout.strip() == "started"
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "FLASHPATCH must be one of" in lines[0] and "flashpatch is OFF" in lines[0], lines[0]
