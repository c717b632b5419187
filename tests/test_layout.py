"""What the repository's layout promises: the README's test command runs the parity lab's tests, which live
with the lab; the package's docstrings name scripts and scenarios that exist."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

from flashpatch.bench import options

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "src" / "flashpatch" / "bench"


def _readme_test_command() -> str:
    section = ROOT.joinpath("README.md").read_text().split("## Set up and test", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("pip install"), lines  # what .ci/run expects
    return lines[1]


def test_the_readme_test_command_collects_the_parity_lab_tests_where_they_live() -> None:
    command = _readme_test_command().split()
    assert command[:3] == ["python", "-m", "pytest"], command
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, *command[1:], "--collect-only"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = [line.strip() for line in done.stdout.splitlines() if "::" in line or line.strip().endswith(".py")]
    parity = [line for line in collected if line.startswith("benchmarks/parity/tests/")]
    assert parity, "the README's test command does not run the parity lab's tests"
    assert any(line.startswith("tests/") for line in collected)
    assert not list((ROOT / "tests").glob("test_*parity*.py")), "the lab's tests belong with the lab"
    assert "benchmarks" not in (ROOT / "tests" / "conftest.py").read_text(), "tests/ must not put the lab on sys.path"


def test_bench_docstrings_name_what_exists() -> None:
    package_doc = ast.get_docstring(ast.parse((BENCH / "__init__.py").read_text()))
    for scenario in options.SCENARIOS:
        assert f"`{scenario}`" in package_doc, f"flashpatch.bench's docstring omits the {scenario} scenario"
    for path in sorted(BENCH.rglob("*.py")):
        for named in re.findall(r"\b(?:scripts|benchmarks)/[\w/.-]+\.(?:py|sh|md)\b", path.read_text()):
            assert (ROOT / named).exists(), f"{path.relative_to(ROOT)} names {named}, which does not exist"
