"""benchmarks/lab/attention_bound.py argues from measured numbers only: every time it uses is in a raw file (a JSON
or a log) of the committed results directory it names, and its step targets are judged against what the same
process measured in its step, never against a kernel timed alone."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_NUMBER = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?")


@pytest.fixture(scope="module")
def bound():
    spec = importlib.util.spec_from_file_location("attention_bound", ROOT / "benchmarks" / "lab" / "attention_bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raw_numbers(directory: pathlib.Path) -> list[float]:
    """Every decimal number in the run's raw files (JSON and logs; not its README, which quotes them)."""
    assert directory.is_dir(), f"{directory.relative_to(ROOT)} does not exist"
    found: list[float] = []
    for path in directory.rglob("*"):
        if path.suffix == ".json":
            found += _json_numbers(json.loads(path.read_text()))
        elif path.suffix in (".log", ".txt"):
            found += [float(x) for x in _NUMBER.findall(path.read_text(errors="replace"))]
    return found


def _json_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _json_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _json_numbers(v)]
    return [float(value)] if isinstance(value, float) else []


def _assert_sourced(value: float, decimals: int, directory: pathlib.Path) -> None:
    numbers = _raw_numbers(directory)
    assert any(round(x, decimals) == round(value, decimals) for x in numbers), (
        f"{value} is in no raw file of {directory.relative_to(ROOT)}"
    )


def _where(text: str) -> pathlib.Path:
    """The results directory a table row names ('h200-...-flash-probe, one call' -> that directory)."""
    return RESULTS / text.split(",")[0].strip()


def test_every_step_time_is_in_the_raw_files_of_the_run_it_names(bound) -> None:
    for _name, _pairs, steps, ceiling, where in bound.MEASURED:
        for ms in (*steps.values(), ceiling):
            _assert_sourced(ms, 1, _where(where))
    for where, steps, ceiling in bound.PI0_STEPS:
        for ms in (*steps.values(), ceiling):
            _assert_sourced(ms, 1, _where(where))


def test_every_standalone_time_is_in_the_raw_files_of_the_run_it_names(bound) -> None:
    for _variant, where, fwd, fwd_bwd, _pairs in bound.STANDALONE:
        _assert_sourced(fwd, 3, _where(where))
        _assert_sourced(fwd_bwd, 3, _where(where))
    for with_fill, without in bound.FILL.values():
        for ms in (*with_fill, *without):
            _assert_sourced(ms, 4, RESULTS / "h200-2026-12-03-eve-chain-profile")


def test_every_run_named_says_which_code_it_measured(bound) -> None:
    for *_, where in bound.MEASURED:
        assert bound.code_of(where) != "not recorded here", where


def test_targets_are_judged_in_the_step_not_against_a_kernel_timed_alone(bound) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bound.targets()
    text = out.getvalue()
    assert "FA3" not in text and "standalone" not in text.lower(), text
    rows = [line for line in text.splitlines() if line.startswith("| pi0")]
    assert rows and all("->" in row for row in rows)
    # each row's "needed" comes from its own process: the pi0 B=32 rows differ as their ceilings do
    needed = {row.split("|")[2]: row.rsplit("->", 1)[1] for row in rows if row.startswith("| pi0, B=32")}
    assert len(set(needed.values())) == len(needed) > 1, needed
