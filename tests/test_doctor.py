"""The command lines: `python -m flashpatch doctor|bench` say what they should, and a usage error is one
line naming the argument and what is allowed, exit 2, never a traceback; --help exits 0."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import flashpatch

SRC = pathlib.Path(flashpatch.__file__).resolve().parents[1]


def _run(*args: str, module: str = "flashpatch", **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPATCH")}
    environ.update(PYTHONPATH=str(SRC), JAX_PLATFORMS="cpu", **env)
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=environ, capture_output=True, text=True, timeout=120
    )


def test_doctor_reports_versions_targets_and_the_choice() -> None:
    done = _run("doctor", "--q-len", "64", "--kv-len", "64")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in (
        "jax ",
        "flax ",
        "openpi.models.gemma.Attention",
        "T=64 S=64",
        "kvax: cannot run it here: kvax runs on gpu",
        "cudnn_split: cannot run it here: cudnn_split runs on gpu",  # it said "cudnn runs on gpu"
    ):
        assert expected in out, out
    assert "auto picks: reference" in out and "openpi's own attention is faster" in out, out


def test_doctor_for_a_long_sequence_picks_the_blockwise_path_on_cpu() -> None:
    done = _run("doctor", "--q-len", "4096", "--kv-len", "4096")
    assert done.returncode == 0 and "auto picks: xla" in done.stdout, done.stdout + done.stderr


def test_every_doctor_option_has_help_text() -> None:
    done = _run("doctor", "--help")
    for option in ("--batch", "--q-len", "--kv-len", "--heads", "--kv-heads", "--head-dim", "--dtype", "--backend"):
        described = [line for line in done.stdout.splitlines() if line.strip().startswith(option)]
        text = " ".join(done.stdout.split(option, 1)[1].split("\n  -", 1)[0].split()[1:]) if described else ""
        assert len(text) > 8, f"{option} has no help text:\n{done.stdout}"


def test_backend_names_are_read_alike_on_the_command_line() -> None:
    done = _run("doctor", "--backend", " XLA ", "--q-len", "16", "--kv-len", "16")
    assert done.returncode == 0 and "xla picks: xla" in done.stdout, done.stdout + done.stderr


def test_help_exits_zero() -> None:
    for args, module in [
        (("--help",), "flashpatch"),
        (("doctor", "--help"), "flashpatch"),
        (("--help",), "flashpatch.bench"),
    ]:
        done = _run(*args, module=module)
        assert done.returncode == 0 and "usage" in done.stdout.lower(), (args, done.stdout, done.stderr)


@pytest.mark.parametrize(
    ("args", "module", "named"),
    [
        ((), "flashpatch", "usage: python -m flashpatch COMMAND"),
        (("nonsense",), "flashpatch", "unknown command 'nonsense'"),
        (("doctor", "--dtype", "banana"), "flashpatch", "--dtype: must be one of bfloat16, float16, float32"),
        (("doctor", "--backend", "nonsense"), "flashpatch", "--backend: must be one of auto, reference"),
        (("doctor", "--batch", "0"), "flashpatch", "--batch: expected a positive integer"),
        (("doctor", "--heads", "8", "--kv-heads", "3"), "flashpatch", "--heads (8) must be a multiple of --kv-heads"),
        (("--scenarios", "nonsense"), "flashpatch.bench", "--scenarios: must be a comma list of core, gemma"),
        (("--backends", "nonsense"), "flashpatch.bench", "--backends: must be a comma list of xla"),
        (("--render", "/missing"), "flashpatch.bench", "--render needs a directory with a results.json"),
        (("--core-sizes", "8,x"), "flashpatch.bench", "--core-sizes: expected comma-separated positive integers"),
        (("--openpi-src", "/missing"), "flashpatch.bench", "--openpi-src must be openpi's src/ folder"),
        (("--core-sizes", "16"), "flashpatch.bench", "--core-sizes must each be at least"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], module: str, named: str) -> None:
    done = _run(*args, module=module)
    assert done.returncode == 2, (args, done.returncode, done.stderr)
    assert named in done.stdout + done.stderr, (args, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    if args:
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_doctor_reports_a_bad_environment_and_fails_in_one_sentence() -> None:
    """doctor is where a user goes when FLASHPATCH_BACKEND is wrong: the report, then one sentence naming the
    variable and the fix, and a non-zero exit, never a traceback nor a clean exit."""
    done = _run("doctor", "--q-len", "64", "--kv-len", "64", FLASHPATCH="1", FLASHPATCH_BACKEND="nonsense")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "environment: INVALID" in done.stdout and "'nonsense'" in done.stdout, done.stdout
    # The interpreter-start hook, where installed, has warned already; doctor's own verdict is one line.
    [line] = [line for line in done.stderr.strip().splitlines() if "FlashpatchWarning" not in line]
    assert line.startswith("python -m flashpatch doctor: error: "), line
    assert "FLASHPATCH_BACKEND must be one of" in line and "'nonsense'" in line and "fix" in line.lower(), line
    assert "Traceback" not in done.stderr, done.stderr


def test_doctor_resolves_the_backend_the_environment_names() -> None:
    """With FLASHPATCH=1 FLASHPATCH_BACKEND=xla what runs is xla, not auto's choice: doctor says so."""
    done = _run("doctor", "--q-len", "64", "--kv-len", "64", FLASHPATCH="1", FLASHPATCH_BACKEND="xla")
    assert done.returncode == 0, done.stderr
    assert "FLASHPATCH_BACKEND=xla picks: xla" in done.stdout and "auto picks" not in done.stdout, done.stdout
    asked = _run(
        "doctor", "--backend", "auto", "--q-len", "64", "--kv-len", "64", FLASHPATCH="1", FLASHPATCH_BACKEND="xla"
    )
    assert "auto picks: reference" in asked.stdout, asked.stdout  # --backend still asks about another


def test_doctor_says_when_the_backend_variable_is_ignored() -> None:
    done = _run("doctor", "--q-len", "64", "--kv-len", "64", FLASHPATCH_BACKEND="xla")
    assert done.returncode == 0, done.stderr
    assert "FLASHPATCH_BACKEND=xla is ignored" in done.stdout and "auto picks: reference" in done.stdout, done.stdout


def test_doctor_and_the_benchmark_read_versions_through_one_helper(monkeypatch, capsys) -> None:
    """One place reads installed versions (flashpatch.versions.installed); tokamax, which flashpatch never uses,
    is not listed."""
    from flashpatch import versions
    from flashpatch.bench import records
    from flashpatch.tools import doctor

    monkeypatch.setattr(versions, "installed", lambda name, lookup=None: versions.parse("9.9.9"))
    assert doctor.main(["--q-len", "64", "--kv-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "  flax 9.9.9" in out and "  jax 9.9.9" in out, out
    assert "tokamax" not in out, out
    found = records.versions()
    assert found["jax"] == "9.9.9" and "tokamax" not in found, found
