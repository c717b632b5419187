"""`python -m flashpatch tune` and the table `auto` reads first, on CPU.

The GPUs are simulated (`machine.simulated`) and their timings injected (`tune.main(measure=...)`); one small real
run times `reference`, `xla` and `pallas` (interpreted) on the CPU. What is checked: openpi's shapes, the table's
identity (device, versions) and format, that auto follows the measurement and never takes a backend measured
slower than the einsum, that a table of other versions or another GPU is ignored with a note, doctor's section,
and that failures are one line each.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import subprocess
import sys
import types
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import flashpatch
from flashpatch.backends import machine, masks, meshes
from flashpatch.backends.base import DenseBackend, Problem
from flashpatch.bench import tune
from flashpatch.core import selection, tuning
from flashpatch.diagnostics import FlashpatchWarning
from flashpatch.tools import doctor, openpi_shapes

PINS = {"jax": "0.5.3", "jaxlib": "0.5.3"}
NEWER = {"jax": "0.6.0", "jaxlib": "0.6.0"}
SIMULATED = ("xla", "pallas", "cudnn", "cudnn_split")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test with an empty cache of its own, and no table named by the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(tuning.ENV, raising=False)


class Planted(DenseBackend):
    """A backend that declares it runs every call on the simulated GPU (what it computes is never asked)."""

    platforms = ("gpu", "cpu")

    def __init__(self, name: str, declines: str | None = None):
        self.name, self.declines = name, declines

    def unsupported(self, problem):
        return self.declines or super().unsupported(problem)


@pytest.fixture
def planted(use_backend):
    """The backends the simulated runs time, planted so that they run on any simulated GPU."""
    for name in SIMULATED:
        use_backend(name, Planted(name))


def simulated(times: dict):
    """A measurement that returns `times[backend][mode]` ms (median; p10/p90 5% around it), or raises it."""
    seen = []

    def measure(name, call, mode):
        seen.append((name, call.label, mode))
        found = times[name]
        if isinstance(found, Exception):
            raise found
        ms = found[mode] if isinstance(found, dict) else found
        return {"median_ms": ms, "p10_ms": ms * 0.95, "p90_ms": ms * 1.05, "repeats": 30, "calls_per_repeat": 1}

    measure.seen = seen
    return measure


def run_tune(argv, measure, gpu="RTX 4090", versions_=PINS):
    out, err = io.StringIO(), io.StringIO()
    with machine.simulated(gpu, versions_=versions_):
        code = tune.main(argv, measure=measure, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def pi0_train(batch: int = 32, platform: str = "gpu") -> Problem:
    dtypes = ["bfloat16"] * 4
    return Problem(batch, 867, 867, 8, 1, 256, *dtypes, platform, causal_runs=False)


#: pi0's training call: pallas fastest, cudnn_split next, xla slower than the einsum, cudnn failing to compile.
TIMES = {
    "reference": {"forward": 2.0, "forward_backward": 6.0},
    "pallas": {"forward": 1.0, "forward_backward": 4.0},
    "cudnn_split": {"forward": 1.5, "forward_backward": 5.0},
    "xla": {"forward": 3.0, "forward_backward": 9.0},
    "cudnn": RuntimeError("XlaRuntimeError: INTERNAL: no cuDNN engine\nfor this shape\n  at line 3"),
}
TRAIN = ["pi0", "--calls", "train", "--backends", ",".join(SIMULATED)]


# ----------------------------------------------------------------------------------------------- openpi's shapes


def _calls(model: str, batch: int = 4):
    return {
        c.label.split(" ", 1)[1]: c
        for c in openpi_shapes.model_calls(openpi_shapes.MODELS[model], batch, 1, "bfloat16", "gpu")
    }


def test_openpi_shapes_are_openpis() -> None:
    """3 images of 256 tokens; pi0: prompt 48 + state + 50 actions; pi0.5: prompt 200 + 50 actions; pi0-FAST:
    prompt 250 and a cache of 256 decoding steps (numbers read from openpi's code, see openpi_shapes)."""
    expected = {
        "pi0": {"train": (4, 867, 867), "sample prefill": (1, 816, 816), "sample denoise step": (1, 51, 867)},
        "pi05": {"train": (4, 1018, 1018), "sample prefill": (1, 968, 968), "sample denoise step": (1, 50, 1018)},
        "pi0_fast": {"train": (4, 1018, 1018), "sample prefill": (1, 1018, 1274), "sample decode step": (1, 1, 1274)},
    }
    for model, shapes in expected.items():
        calls = _calls(model)
        assert set(calls) == set(shapes), model
        for label, (b, t, s) in shapes.items():
            call = calls[label]
            p = call.problem
            assert (p.batch, p.q_len, p.kv_len, p.num_heads, p.num_kv_heads, p.head_dim) == (b, t, s, 8, 1, 256)
            assert p.causal_runs == (model == "pi0_fast"), (model, label)  # what the Gemma targets pass
            assert call.modes == (tuning.MODES if label == "train" else (tuning.FORWARD,))
            mask = call.mask(np.random.default_rng(0))
            assert mask.shape == (b, t, s) and mask.dtype == bool
            assert mask.any(axis=-1).any(), (model, label)


def test_openpi_masks_have_openpis_structure() -> None:
    rng = np.random.default_rng(0)
    pi0 = _calls("pi0")["train"].mask(rng)
    prefix = 816
    assert not pi0[:, :prefix, prefix:].any()  # the prefix sees no state or action token
    assert pi0[:, prefix, prefix].all() and not pi0[:, prefix, prefix + 1 :].any()  # state: not the actions
    assert pi0[:, prefix + 1 :, prefix:].all()  # the action block attends itself bidirectionally
    assert not pi0[2, :, 256:512].any()  # the second camera is missing in every third row
    assert not pi0.any(axis=-1).all()  # padding rows attend nothing
    fast = _calls("pi0_fast")["train"].mask(rng)
    plans = masks.analyze(jnp.asarray(fast))
    assert bool(plans.exact)  # openpi's chain form
    assert any(
        fast[b, i, i] and not fast[b, i, i + 1] and fast[b, i + 1, i] for b in range(4) for i in range(800, 1017)
    )
    decode = _calls("pi0_fast")["sample decode step"].mask(rng)
    assert decode[:, 0, 1018].all() and not decode[:, 0, 1019:].any()


def test_an_openpi_train_config_is_read_from_openpi(monkeypatch) -> None:
    """openpi installed: its train config names give the model's fields, and its batch over the devices here."""
    Pi0FASTConfig = type("Pi0FASTConfig", (), {"max_token_len": 180, "action_horizon": 10, "dtype": "bfloat16"})
    Pi0FASTConfig.paligemma_variant = "gemma_2b"
    train = types.SimpleNamespace(model=Pi0FASTConfig(), batch_size=32)

    def get_config(name):
        if name != "pi0_fast_libero":
            raise ValueError(f"Config '{name}' not found.")
        return train

    gemma = types.SimpleNamespace(num_heads=8, num_kv_heads=1, head_dim=256)
    monkeypatch.setitem(sys.modules, "openpi.training.config", types.SimpleNamespace(get_config=get_config))
    monkeypatch.setitem(sys.modules, "openpi.models.gemma", types.SimpleNamespace(get_config=lambda v: gemma))
    model, batch, dtype = openpi_shapes.from_openpi("pi0_fast_libero")
    assert (model.kind, model.max_token_len, batch, dtype) == ("pi0_fast", 180, 32, "bfloat16")
    code, out, _ = run_tune(["pi0_fast_libero", "--dry-run"], simulated({}))
    assert code == 0 and "pi0_fast_libero train: B=32 T=948 S=948" in out, out
    with pytest.raises(openpi_shapes.UnknownModel, match="not found"):
        openpi_shapes.from_openpi("pi9")


# ---------------------------------------------------------------------------------------------- the table written


def test_tune_writes_a_table_for_this_device_and_these_versions(planted) -> None:
    measure = simulated(TIMES)
    code, out, err = run_tune(TRAIN, measure)
    assert code == 0, err
    files = list(tuning.cache_dir().iterdir())
    assert len(files) == 1 and files[0].name.startswith("nvidia-geforce-rtx-4090-jax0.5.3-"), files
    data = json.loads(files[0].read_text())
    assert data["schema"] == tuning.SCHEMA
    assert data["device"] == {
        "platform": "gpu",
        "kind": "NVIDIA GeForce RTX 4090",
        "capability": "8.9",
        "cudnn": "9.5.1",
    }
    assert data["versions"]["jax"] == "0.5.3" and data["versions"]["flashpatch"] == flashpatch.__version__
    (entry,) = data["entries"]
    assert entry["call"] == {field: getattr(pi0_train(), field) for field in tuning.KEY_FIELDS}
    results = entry["results"]
    assert results["pallas"]["forward_backward"]["median_ms"] == 4.0
    assert results["pallas"]["forward"]["p10_ms"] < 1.0 < results["pallas"]["forward"]["p90_ms"]
    assert results["cudnn"] == {"status": "failed", "reason": results["cudnn"]["reason"]}
    # Every backend in one process, the einsum first; each mode of each backend that runs, once.
    assert [s[0] for s in measure.seen][:2] == ["reference", "reference"]
    assert len(measure.seen) == 2 * 4 + 1  # cudnn fails on its first mode
    assert "auto takes, in order, the first that runs: pallas > cudnn_split > reference" in out, out
    assert f"wrote {files[0]}" in out


def test_a_failure_is_one_line_never_a_traceback(planted) -> None:
    _, out, err = run_tune(TRAIN, simulated(TIMES))
    failed = [line for line in err.splitlines() if "cudnn failed" in line]
    assert failed == [
        "pi0 train: cudnn failed (forward: RuntimeError: XlaRuntimeError: INTERNAL: no cuDNN engine for this shape "
        "at line 3)"
    ], err
    assert "Traceback" not in out + err
    assert "cudnn        failed: forward: RuntimeError" in out


def test_a_backend_that_cannot_run_is_recorded_as_such(use_backend) -> None:
    use_backend("xla", Planted("xla", declines="xla takes float32 inputs here"))
    use_backend("pallas", Planted("pallas"))
    code, _, _ = run_tune(["pi0", "--calls", "train", "--backends", "xla,pallas"], simulated(TIMES))
    entry = tuning.read(next(tuning.cache_dir().iterdir())).entries[0]
    assert code == 0 and entry.results["xla"] == {"status": "cannot run", "reason": "xla takes float32 inputs here"}
    assert entry.ranking() == ("pallas", "reference")


def test_tuning_again_adds_calls_and_a_new_stack_gets_a_table_of_its_own(planted) -> None:
    run_tune(TRAIN, simulated(TIMES))
    run_tune(["pi0_fast", "--calls", "train", "--backends", "xla"], simulated(TIMES))
    (path,) = tuning.cache_dir().iterdir()
    assert [e.label for e in tuning.read(path).entries] == ["pi0 train", "pi0_fast train"]
    run_tune(TRAIN, simulated(TIMES), versions_=NEWER)
    assert len(list(tuning.cache_dir().iterdir())) == 2  # the pinned stack's table stays for the pinned stack


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = Terminal()
    progress = tune.Progress(4, bar, width=8)
    progress.step("pi0 train: xla forward")
    progress.advance(2)
    progress.say("pi0 train: cudnn failed (boom)")
    progress.close()
    text = bar.getvalue()
    assert "\r\x1b[K[####....] 2/4 pi0 train: xla forward" in text and "pi0 train: cudnn failed (boom)\n" in text
    log = io.StringIO()
    progress = tune.Progress(4, log)
    progress.step("pi0 train: xla forward")
    assert log.getvalue() == "[1/4] pi0 train: xla forward\n"


# --------------------------------------------------------------------------------------------- auto reads it first


def test_auto_takes_the_fastest_measured_backend_that_runs(planted) -> None:
    run_tune(TRAIN, simulated(TIMES))
    with machine.simulated("RTX 4090", versions_=PINS):
        choice = selection.choose("auto", pi0_train())
        path = tuning.find().path
    assert choice.backend == "pallas", choice
    assert "your own measurement" in choice.reason and str(path) in choice.reason, choice.reason
    assert "4 ms forward+backward against openpi's own attention's 6 ms" in choice.reason, choice.reason
    with machine.simulated("RTX 4090", versions_=PINS):  # a shape nobody measured: the rules, as before
        other = selection.choose("auto", pi0_train(batch=8))
    assert "your own measurement" not in other.reason


def test_auto_never_takes_a_backend_measured_slower_than_the_einsum(planted, use_backend) -> None:
    run_tune(TRAIN, simulated(TIMES))
    use_backend("pallas", Planted("pallas", declines="pallas: no Triton for this GPU"))
    calls = []

    def compiles(name, problem):
        calls.append(name)
        return "ValueError: Unsupported GPU device kind" if name == "cudnn_split" else None

    with machine.simulated("RTX 4090", versions_=PINS):
        choice = selection.choose("auto", pi0_train(), compiles)
    # pallas cannot run, cudnn_split fails the compile guard: xla, measured slower, is never asked.
    assert choice.backend == "reference", choice
    assert calls == ["cudnn_split"] and choice.failed == (("cudnn_split", "ValueError: Unsupported GPU device kind"),)
    assert "no backend measured faster than openpi's own attention runs here" in choice.reason
    assert "pallas (pallas: no Triton for this GPU)" in choice.reason


def test_the_ranking_needs_every_mode_faster() -> None:
    def entry(results):
        return tuning.Entry(
            dict(zip(tuning.KEY_FIELDS, tuning.key_of(pi0_train()), strict=True)), "pi0 train", tuning.MODES, results
        )

    def ok(forward, both):
        return {"status": "ok", "forward": {"median_ms": forward}, "forward_backward": {"median_ms": both}}

    found = entry(
        {
            "reference": ok(2.0, 6.0),
            "a": ok(2.5, 3.0),  # faster in training, slower forward: out
            "b": ok(1.9, 5.9),
            "c": ok(1.0, 5.0),
            "d": {"status": "failed", "reason": "boom"},
            "e": ok(2.0, 5.0),  # as fast as the einsum forward: not faster, out
        }
    )
    assert found.ranking() == ("c", "b", "reference")
    without_einsum = entry({"reference": {"status": "failed", "reason": "out of memory"}, "c": ok(1.0, 5.0)})
    assert without_einsum.ranking() == ()  # nothing to compare with: the rules decide


def test_a_call_matches_an_entry_by_the_batch_one_device_sees(planted, monkeypatch) -> None:
    run_tune(TRAIN, simulated(TIMES))
    mesh = types.SimpleNamespace(axis_names=("batch", "model"), shape={"batch": 4, "model": 2})
    monkeypatch.setattr(meshes, "active_mesh", lambda: mesh)
    with machine.simulated("RTX 4090", versions_=PINS):
        assert selection.choose("auto", pi0_train(batch=128)).backend == "pallas"
        assert "your own" not in selection.choose("auto", pi0_train(batch=32)).reason  # 8 per device: not measured
        assert tuning.lookup(dataclasses_replace(pi0_train(), causal_runs=True)) is None  # pi0-FAST's kind of mask


def dataclasses_replace(problem, **changes):
    import dataclasses

    return dataclasses.replace(problem, **changes)


# ------------------------------------------------------------------------------------ tables measured elsewhere


def test_a_table_of_other_versions_is_ignored_with_a_note(planted) -> None:
    run_tune(TRAIN, simulated(TIMES))
    with machine.simulated("RTX 4090", versions_=NEWER):
        with pytest.warns(FlashpatchWarning, match=r"jax 0\.5\.3 in the table, 0\.6\.0 here"):
            choice = selection.choose("auto", pi0_train())
        lines = tuning.report()
    assert "your own" not in choice.reason
    assert lines[1].startswith("  none applies: no table for NVIDIA GeForce RTX 4090") and "0.6.0 here" in lines[1]


def test_a_table_of_another_gpu_is_ignored(planted, monkeypatch) -> None:
    run_tune(TRAIN, simulated(TIMES))
    (path,) = tuning.cache_dir().iterdir()
    with machine.simulated("A6000", versions_=PINS), warnings.catch_warnings():
        warnings.simplefilter("error")  # another GPU's table in a shared cache is no one's mistake: no warning
        assert "your own" not in selection.choose("auto", pi0_train()).reason
        assert "1 table(s) there are for other devices" in tuning.report()[1]
    monkeypatch.setenv(tuning.ENV, str(path))  # named on purpose: then a warning says why it is not used
    named = "kind NVIDIA GeForce RTX 4090 in the table, NVIDIA RTX A6000 here"
    with machine.simulated("A6000", versions_=PINS), pytest.warns(FlashpatchWarning, match=named):
        assert "your own" not in selection.choose("auto", pi0_train()).reason


def test_the_environment_names_the_table_or_turns_tables_off(planted, monkeypatch, tmp_path) -> None:
    named = tmp_path / "mine.json"
    monkeypatch.setenv(tuning.ENV, str(named))
    run_tune(TRAIN, simulated(TIMES))
    assert named.exists() and not tuning.cache_dir().exists()
    with machine.simulated("RTX 4090", versions_=PINS):
        assert selection.choose("auto", pi0_train()).backend == "pallas"
        monkeypatch.setenv(tuning.ENV, "off")
        assert "your own" not in selection.choose("auto", pi0_train()).reason
        assert "FLASHPATCH_TUNE_TABLE=off" in tuning.report()[1]


@pytest.mark.parametrize(
    ("content", "why"),
    [("{not json", "cannot be read (JSONDecodeError"), ('{"schema": "flashpatch-tune/0"}', "not a flashpatch-tune/1")],
)
def test_a_broken_table_is_ignored_in_one_sentence(planted, monkeypatch, tmp_path, content, why) -> None:
    named = tmp_path / "broken.json"
    named.write_text(content)
    monkeypatch.setenv(tuning.ENV, str(named))
    with machine.simulated("RTX 4090", versions_=PINS):
        with pytest.warns(FlashpatchWarning, match=re.escape(why)):
            assert "your own" not in selection.choose("auto", pi0_train()).reason
        assert why in tuning.report()[1]
    code, out, _ = run_tune(TRAIN, simulated(TIMES))
    assert code == 0 and "replacing a table that could not be used" in out


# ------------------------------------------------------------------------------------------------------ doctor


def test_doctor_shows_the_table_that_applies(planted, capsys) -> None:
    run_tune(TRAIN, simulated(TIMES))
    with machine.simulated("RTX 4090", versions_=PINS):
        doctor.main(["--no-causal-runs", "--batch", "32"])
    out = capsys.readouterr().out
    assert "tuning table (python -m flashpatch tune):\n  applies: " in out, out
    assert "NVIDIA GeForce RTX 4090 (compute capability 8.9, cuDNN 9.5.1)" in out and "jax 0.5.3" in out
    assert "pi0 train (B=32 T=867 S=867 heads=8/1 head_dim=256 bfloat16): pallas > cudnn_split > reference" in out


def test_doctor_says_when_there_is_no_table(capsys) -> None:
    doctor.main(["--q-len", "16", "--kv-len", "16"])
    assert "none applies: no table:" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["pi9"], "model must be pi0, pi05, pi0_fast"),
        (["pi0", "--q-len", "8"], "--q-len: for a shape of your own"),
        (["--q-len", "8", "--kv-len", "4"], "--q-len (8) must not exceed --kv-len (4)"),
        (["--q-len", "8", "--heads", "3", "--kv-heads", "2"], "--heads (3) must be a multiple of --kv-heads (2)"),
        (["--q-len", "8", "--max-token-len", "9"], "--max-token-len shapes a model's calls"),
        ([], "give a model"),
        (["pi0", "--calls", "decode"], "must be a comma list of train, sample"),
        (["pi0", "--backends", "nope"], "must be a comma list of"),
    ],
)
def test_usage_errors_are_one_line(argv, named, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        tune.main(argv, measure=simulated({}))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and named in err and len(err.strip().splitlines()) == 1, err


def test_tune_is_a_command() -> None:
    src = pathlib.Path(flashpatch.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHPATCH")}
    env.update(PYTHONPATH=str(src), JAX_PLATFORMS="cpu")
    usage = subprocess.run([sys.executable, "-m", "flashpatch", "--help"], env=env, capture_output=True, text=True)
    assert "  tune " in usage.stdout
    done = subprocess.run(
        [sys.executable, "-m", "flashpatch", "tune", "pi05", "--dry-run"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "pi05 train: B=32 T=1018 S=1018" in done.stdout, done.stdout + done.stderr
    assert f"would write {env.get('XDG_CACHE_HOME')}" in done.stdout


# ------------------------------------------------------------------------------------------- a small real run


class Wrong(DenseBackend):
    name = "xla"

    def attend(self, q, k, v, mask, problem):
        return jnp.zeros(q.shape, problem.out_dtype)


class NotFinite(DenseBackend):
    name = "pallas"

    def attend(self, q, k, v, mask, problem):
        return jnp.full(q.shape, jnp.nan, problem.out_dtype)


def test_a_small_real_run_on_the_cpu(use_backend) -> None:
    """reference, xla and pallas (interpreted) really timed here; auto then follows the table on the CPU."""
    shape = ["--q-len", "16", "--heads", "2", "--head-dim", "16", "--batch", "2", "--dtype", "float32"]
    quick = ["--repeats", "3", "--warmup", "1", "--max-seconds", "0.05"]
    out, err = io.StringIO(), io.StringIO()
    assert tune.main([*shape, *quick, "--backends", "xla,pallas"], stdout=out, stderr=err) == 0, err.getvalue()
    (path,) = tuning.cache_dir().iterdir()
    table = tuning.read(path)
    assert table.identity.platform == "cpu" and table.settings["repeats"] == 3
    (entry,) = table.entries
    for name in ("reference", "xla", "pallas"):
        result = entry.results[name]
        assert result["status"] == "ok", result
        for mode in tuning.MODES:
            t = result[mode]
            assert 0 < t["p10_ms"] <= t["median_ms"] <= t["p90_ms"] and t["repeats"] >= 3
        assert "relative error" in result["forward"]["check"], result
    problem = Problem(2, 16, 16, 2, 1, 16, *["float32"] * 4, "cpu", causal_runs=True)
    choice = selection.choose("auto", problem)
    assert "your own measurement" in choice.reason and choice.backend == entry.ranking()[0], choice

    use_backend("xla", Wrong())  # a backend with a wrong answer, or NaN, is recorded as failed, never timed
    use_backend("pallas", NotFinite())
    assert tune.main([*shape, *quick, "--backends", "xla,pallas"], stdout=out, stderr=err) == 0
    (entry,) = tuning.read(path).entries
    assert entry.results["xla"]["status"] == "failed" and "from float32 attention" in entry.results["xla"]["reason"]
    assert entry.results["pallas"] == {
        "status": "failed",
        "reason": "forward: WrongResult: its forward gave NaN or inf",
    }
    assert entry.ranking() == ("reference",)
