"""`auto`'s table on simulated GPUs: which backend each measured shape class gets, and never a slower one.

The GPUs are simulated on CPU (compute capability, cuDNN version, dew-flash-attn installed or not,
device memory); nothing here needs a GPU.
"""

from __future__ import annotations

import contextlib

import pytest

from flashpatch import backends
from flashpatch.backends import cudnn, machine
from flashpatch.backends.base import Problem
from flashpatch.core import selection

GIB = 2**30


def _gpu_problem(batch: int, q_len: int, kv_len: int | None = None, *, causal_runs: bool = False) -> Problem:
    kv_len = q_len if kv_len is None else kv_len
    dtypes = ["bfloat16"] * 4
    return Problem(batch, q_len, kv_len, 8, 1, 256, *dtypes, "gpu", causal_runs=causal_runs)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be a GPU: set_gpu(capability, cudnn version, dew-flash-attn installed, memory). The flash backend
    reads the GPU and the installed versions through `machine` (current JAX; dew-flash-attn's builds from its
    record, `flash.builds`)."""
    with contextlib.ExitStack() as stack:

        def set_gpu(capability=(9, 0), cudnn_version=90800, flash=False, memory=140 * GIB):
            stack.close()
            monkeypatch.setattr(cudnn, "compute_capability", lambda: capability)
            monkeypatch.setattr(cudnn, "cudnn_version", lambda: cudnn_version)
            monkeypatch.setattr(cudnn, "jax_rejects", lambda problem, use_seq_lengths=True: None)
            monkeypatch.setattr(selection, "device_memory", lambda: memory)
            installed = {"jax": "0.12.0", "jaxlib": "0.12.0", "flash-attn-jax": None, "dew-flash-attn-cu13": None}
            installed["dew-flash-attn-cu12"] = "0.3.6" if flash else None
            simulated = machine.Gpu.of("simulated GPU", capability)
            stack.enter_context(machine.simulated(simulated, cudnn=cudnn_version, versions_=installed))

        set_gpu()
        yield set_gpu


PI0_B32 = (32, 867)
PI0_B8 = (8, 867)
PI0_LONG = (4, 4147)
PI0_HUGE = (4, 16435)
FAST_B32 = (32, 1018)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((8, 1, 4096), "reference"),  # pi0-FAST decode
        ((1, 51, 1075), "reference"),  # pi0 sample_actions: 51 queries over the cache
        ((1, 1024, 1024), "reference"),  # pi0 prefix prefill at inference
        ((2, 1024, 1024), "reference"),  # 2**24 pairs
        ((4, 1024, 1024), "cudnn"),  # 2**25 pairs: training at T=1024
        (PI0_B8, "cudnn"),  # openpi's pi0 training at batch 8
        ((16, 870), "cudnn"),  # just under 3 * 2**25
        ((8, 1280), "cudnn_split"),  # just over 3 * 2**25
        (PI0_B32, "cudnn_split"),  # openpi's training batch
        ((2, 4096), "cudnn_split"),
    ],
)
def test_hopper_without_flash(gpu, shape, expected: str) -> None:
    choice = selection.choose("auto", _gpu_problem(*shape))
    assert choice.backend == expected, choice
    assert choice.reason.startswith("auto: ") and "docs/benchmarks.md" in choice.reason


@pytest.mark.parametrize("shape", [PI0_B32, PI0_LONG, PI0_HUGE, (2, 4096)])
@pytest.mark.parametrize("causal_runs", [False, True], ids=["pi0", "pi0_fast"])
def test_flash_first_where_installed(gpu, shape, causal_runs: bool) -> None:
    gpu(flash=True)
    choice = selection.choose("auto", _gpu_problem(*shape, causal_runs=causal_runs))
    assert choice.backend == "flash", choice


@pytest.mark.parametrize("shape", [(8, 1, 4096), (1, 51, 1075), (2, 1024, 1024)])
def test_flash_not_where_the_einsum_is_faster(gpu, shape) -> None:
    gpu(flash=True)
    assert selection.choose("auto", _gpu_problem(*shape)).backend == "reference"


def test_flash_not_in_the_band_where_it_was_not_measured(gpu) -> None:
    """Between 2**25 and 3 * 2**25 pairs flash was not measured: cuDNN on Hopper, else openpi's own attention."""
    gpu(flash=True)
    assert selection.choose("auto", _gpu_problem(*PI0_B8)).backend == "cudnn"
    gpu(capability=(8, 0), flash=True)
    assert selection.choose("auto", _gpu_problem(*PI0_B8)).backend == "reference"


def test_pi0_fast_training_never_takes_cudnn_split(gpu) -> None:
    """Its causal suffix overflows cudnn_split's tail: 0.98x of the original under the old rules."""
    choice = selection.choose("auto", _gpu_problem(*FAST_B32, causal_runs=True))
    assert choice.backend == "cudnn", choice
    assert "cudnn_split" not in choice.reason.split("auto: ")[1].split(":")[0]


def test_pi0_fast_long_causal_suffix_skips_cudnn(gpu) -> None:
    """cuDNN's dense path lost to the einsum with a 1024-row causal suffix at T=2048; the Pallas kernel won at
    T=4096 with a causal three quarters."""
    choice = selection.choose("auto", _gpu_problem(8, 2048, causal_runs=True))
    assert choice.backend == "pallas", choice
    assert "cudnn" not in choice.reason.split(";")[0]


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9)], ids=["A100", "A6000", "L40S_4090"])
@pytest.mark.parametrize(("shape", "expected"), [(PI0_B8, "reference"), (PI0_B32, "pallas"), (PI0_LONG, "pallas")])
def test_no_slower_path_on_gpus_cudnn_cannot_serve(gpu, capability, shape, expected) -> None:
    """cuDNN takes head_dim 256 only on Hopper; xla (slower than the einsum where it fits) is not picked, and
    the Pallas kernel only where it was measured faster than the einsum."""
    gpu(capability=capability)
    choice = selection.choose("auto", _gpu_problem(*shape))
    assert choice.backend == expected, choice
    assert "only on Hopper or newer" in choice.reason
    assert "xla" not in choice.reason.split(";")[0]


@pytest.mark.parametrize("capability", [(8, 0), (8, 9)])
def test_pi0_fast_without_cudnn_takes_the_pallas_kernel(gpu, capability) -> None:
    gpu(capability=capability)
    assert selection.choose("auto", _gpu_problem(*FAST_B32, causal_runs=True)).backend == "pallas"


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((8, 0), "flash"), ((8, 6), "pallas"), ((8, 9), "pallas")],
    ids=["A100", "A6000", "L40S"],
)
def test_flash_on_ampere_and_ada(gpu, capability, expected) -> None:
    """FA2's backward refuses head_dim 256 on 8.6 and 8.9 (its check: is_sm80 || is_sm90 || is_sm1xx)."""
    gpu(capability=capability, flash=True)
    choice = selection.choose("auto", _gpu_problem(*PI0_B32))
    assert choice.backend == expected, choice
    if expected != "flash":
        assert "backward refuses head dim 256" in choice.reason


def test_flash_library_without_code_for_the_gpu(gpu) -> None:
    gpu(capability=(7, 5), flash=True)
    choice = selection.choose("auto", _gpu_problem(*PI0_B32))
    assert choice.backend == "reference", choice  # Pallas Triton too is Ampere and later (machine sees 7.5 now)
    assert "no code for compute capability 7.5" in choice.reason


@pytest.mark.parametrize("version", [90100, 90400])
def test_hopper_with_old_cudnn(gpu, version) -> None:
    """openpi's pins with a cuDNN before 9.5: no head_dim 256 in cuDNN, so the Pallas kernel or the einsum, not xla."""
    gpu(cudnn_version=version)
    choice = selection.choose("auto", _gpu_problem(*PI0_B32))
    assert choice.backend == "pallas", choice
    assert "only with cuDNN 9.5.0 or newer" in choice.reason
    assert selection.choose("auto", _gpu_problem(*PI0_B8)).backend == "reference"


def test_hopper_with_cudnn_9_5(gpu) -> None:
    gpu(cudnn_version=90500)
    assert selection.choose("auto", _gpu_problem(*PI0_B32)).backend == "cudnn_split"


def _wide(problem: Problem) -> Problem:
    """The same problem at head_dim 512: beyond cuDNN, FlashAttention and the Pallas kernel."""
    import dataclasses

    return dataclasses.replace(problem, head_dim=512)


def test_xla_only_where_the_einsum_would_not_fit(gpu) -> None:
    gpu(capability=(8, 0), memory=80 * GIB)  # an A100 80GB without flash
    assert selection.choose("auto", _wide(_gpu_problem(*PI0_LONG))).backend == "reference"
    choice = selection.choose("auto", _wide(_gpu_problem(*PI0_HUGE)))
    assert choice.backend == "xla", choice
    assert "memory" in choice.reason


def test_the_memory_threshold_sits_between_the_measured_rungs(gpu) -> None:
    """On the H200 (75% of 141 GiB for JAX) the einsum trained T=8243 at B=4 and ran out at 16435."""
    limit = int(0.75 * 143771 * 2**20)
    gpu(capability=(8, 0), memory=limit)
    assert selection.choose("auto", _wide(_gpu_problem(4, 8243))).backend == "reference"
    assert selection.choose("auto", _wide(_gpu_problem(4, 16435))).backend == "xla"


def test_the_split_threshold_sits_between_the_measured_shapes() -> None:
    band, split = _gpu_problem(8, 1024).pairs, _gpu_problem(8, 1280).pairs
    assert selection.GPU_MIN_PAIRS_FOR_FLASH < band < selection.GPU_MIN_PAIRS_FOR_SPLIT <= split


def test_cpu_rules() -> None:
    cpu = lambda t: Problem(1, t, t, 8, 1, 256, *["float32"] * 4, "cpu")  # noqa: E731
    assert selection.choose("auto", cpu(1024)).backend == "reference"
    assert selection.choose("auto", cpu(2048)).backend == "xla"


def test_pairs_counts_batch_heads_queries_and_keys() -> None:
    assert _gpu_problem(4, 1024).pairs == selection.GPU_MIN_PAIRS_FOR_FLASH


def test_a_backend_that_cannot_run_falls_back_with_the_reason(gpu) -> None:
    gpu(capability=(8, 0))
    choice = selection.choose("cudnn", _gpu_problem(*PI0_B32))
    assert choice.backend == backends.REFERENCE and choice.fallback
    assert "cudnn cannot run this call" in choice.reason and "only on Hopper" in choice.reason


def test_recording_collects_choices_in_this_thread_only(gpu) -> None:
    import threading

    problem = _gpu_problem(2, 4096)
    with selection.recording() as outer:
        selection.choose("auto", problem)
        with selection.recording() as inner:
            selection.choose("xla", problem)
        other = threading.Thread(target=selection.choose, args=("auto", problem))
        other.start()
        other.join()
    selection.choose("auto", problem)  # after the block: not recorded
    assert [c.backend for c in outer] == ["cudnn_split", "xla"]
    assert [c.backend for c in inner] == ["xla"]


def test_every_reason_cites_a_section_that_exists() -> None:
    """Runtime reasons cite docs/benchmarks.md sections by name (the wheel ships no results directories)."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "benchmarks.md").read_text()
    headings = {h.replace("`", "") for h in re.findall(r"^#+ (.+)$", doc, flags=re.M)}
    cited_anywhere = 0
    for rule in selection.RULES:
        assert "benchmarks/results" not in rule.why
        for cited in re.findall(r"docs/benchmarks\.md, '([^']+)'", rule.why):
            cited_anywhere += 1
            assert any(h.startswith(cited) for h in headings), f"{cited!r} is not a section of docs/benchmarks.md"
    assert cited_anywhere >= len([r for r in selection.RULES if r.platform == "gpu"])
