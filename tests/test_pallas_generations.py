"""The per-generation compile check (`tests/pallas_generations.py`, run by `.ci/generations`) and tiling.py's
choices per generation.

Lowering runs here, on CPU, on whichever stack runs the suite. Compiling needs PyPI's `triton`, which the test
venvs do not hold (CI compiles in a venv of its own): those tests find it in this interpreter or in
FLASHPATCH_TRITON_PYTHON (a Python that imports triton) and are skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pallas_generations as generations
import pytest

from flashpatch.backends import machine
from flashpatch.backends.pallas import tiling

SCRIPT = Path(generations.__file__)


def test_every_kernel_lowers_to_triton_ir(tmp_path: Path) -> None:
    assert generations.lower(tmp_path, [80, 100], ["bfloat16"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entries = manifest["kernels"]
    assert [(e["target"], e["kernel"]) for e in entries] == [
        (cc, kernel) for cc in (80, 100) for kernel in ("forward", "dq", "dkv")
    ]
    for entry in entries:
        config = tiling.config_for(f"{entry['target'] // 10}.{entry['target'] % 10}", 256, "bfloat16")
        tile = {"forward": config.forward, "dq": config.dq, "dkv": config.dkv}[entry["kernel"]]
        assert entry["tiling"] == config.name
        assert (entry["num_warps"], entry["num_stages"]) == (tile.num_warps, tile.num_stages)
        assert entry["limit"] == machine.SHARED_MEMORY[(entry["target"] // 10, entry["target"] % 10)]
        text = (tmp_path / entry["ir"]).read_text()
        assert text.startswith("module") and "tt.func" in text and "tt.dot" in text


@pytest.mark.parametrize("cc", sorted(generations.TARGETS))
@pytest.mark.parametrize("dtype", generations.DTYPES)
def test_each_generations_estimate_fits(cc: int, dtype: str) -> None:
    capability = f"{cc // 10}.{cc % 10}"
    config = tiling.config_for(capability, generations.HEAD_DIM, dtype)
    assert tiling.fits(config, capability, generations.HEAD_DIM, dtype)


def test_sm90s_tiling_does_not_fit_sm100() -> None:
    """The compiler gives sm90's dK/dV 238,640 B on sm100 (docs/architecture.md, "The per-generation compile
    check"); the estimate says no, and sm100 gets its own tiling."""
    assert not tiling.fits(tiling.SM90[0], "10.0", 256, "bfloat16")
    assert tiling.config_for("10.0", 256, "bfloat16") == tiling.SM100[0]
    assert tiling.config_for("9.0", 256, "bfloat16") == tiling.SM90[0]


def _triton_python() -> str | None:
    if importlib.util.find_spec("triton") is not None:
        return sys.executable
    return os.environ.get("FLASHPATCH_TRITON_PYTHON") or None


def _compile(directory: Path) -> subprocess.CompletedProcess:
    python = _triton_python()
    if python is None:
        pytest.skip("needs PyPI's triton (FLASHPATCH_TRITON_PYTHON: a Python that imports it); .ci/generations has it")
    return subprocess.run(
        [python, str(SCRIPT), "compile", str(directory)],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_CACHE_DIR": str(directory / "cache")},
        check=False,
    )


@pytest.mark.slow
def test_an_oversized_tiling_fails_and_so_does_an_underestimate(tmp_path: Path) -> None:
    """sm90's tiling forced onto sm86 (99 KiB) fails each kernel; sm86's own passes, until its estimate is made
    lower than the compiler's figure."""
    oversized = tmp_path / "oversized"
    generations.lower(oversized, [86], ["bfloat16"], forced="sm90-128x64")
    result = _compile(oversized)
    assert result.returncode == 1, result.stdout + result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 3 and all("allows 101376 B per block" in line for line in fails), result.stdout

    own = tmp_path / "own"
    generations.lower(own, [86], ["bfloat16"])
    result = _compile(own)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "generations: 3 passed, 0 failed" in result.stdout
    manifest = json.loads((own / "manifest.json").read_text())
    manifest["kernels"][2]["estimate"] = 1024  # an estimate far below any kernel's real use
    (own / "manifest.json").write_text(json.dumps(manifest))
    result = _compile(own)
    assert result.returncode == 1
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "sm86 bfloat16 sm86-64x32 dkv: tiling.py estimates 1024 B, below" in fails[0]
