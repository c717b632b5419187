"""`auto`'s table: which backend each measured shape class gets, and what it says when one cannot run."""

from __future__ import annotations

import pytest

from flashpatch import selection
from flashpatch.backends import cudnn
from flashpatch.backends.base import Problem


def _gpu_problem(batch: int, q_len: int, kv_len: int) -> Problem:
    return Problem(batch, q_len, kv_len, 8, 1, 256, "bfloat16", "bfloat16", "bfloat16", "bfloat16", "gpu")


@pytest.fixture
def h100(monkeypatch):
    """Pretend to be an H100 with cuDNN 9.8 whose JAX accepts every shape (kvax stays unavailable on CPU)."""

    def set_gpu(capability=(9, 0)):
        monkeypatch.setattr(cudnn, "compute_capability", lambda: capability)
        monkeypatch.setattr(cudnn, "cudnn_version", lambda: 90800)
        monkeypatch.setattr(cudnn, "jax_rejects", lambda problem, use_seq_lengths=True: None)

    set_gpu()
    return set_gpu


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((8, 1, 4096), "reference"),  # pi0-FAST decode
        ((1, 51, 1075), "reference"),  # pi0 sample_actions: 51 queries over the cache
        ((1, 1024, 1024), "reference"),  # pi0 prefix prefill at inference
        ((2, 1024, 1024), "reference"),  # 2**24 pairs
        ((4, 1024, 1024), "cudnn"),  # 2**25 pairs: training at T=1024
        ((8, 1024, 1024), "cudnn"),  # 2**26
        ((8, 867, 867), "cudnn"),  # openpi's pi0 training at batch 8
        ((16, 870, 870), "cudnn"),  # just under 3 * 2**25
        ((8, 1280, 1280), "cudnn_split"),  # just over 3 * 2**25
        ((32, 870, 870), "cudnn_split"),  # openpi's training batch
        ((2, 4096, 4096), "cudnn_split"),
    ],
)
def test_gpu_rules(h100, shape, expected: str) -> None:
    choice = selection.choose("auto", _gpu_problem(*shape))
    assert choice.backend == expected, choice
    assert choice.reason.startswith("auto: ") and (
        "benchmarks/results/h200" in choice.reason or "H100" in choice.reason
    )


def test_without_cudnn_the_next_backend_runs_and_the_reason_says_why(h100) -> None:
    h100(capability=(8, 9))  # Ada: no head_dim 256 in cuDNN
    choice = selection.choose("auto", _gpu_problem(32, 870, 870))
    assert choice.backend == "xla", choice  # kvax does not import without a GPU JAX either
    assert "passed over: cudnn_split (" in choice.reason and "only on Hopper or newer" in choice.reason


def test_between_the_thresholds_without_cudnn_the_einsum_runs(h100) -> None:
    h100(capability=(8, 9))  # Ada: neither cuDNN path; xla measured slower than the einsum in this band
    choice = selection.choose("auto", _gpu_problem(8, 1024, 1024))
    assert choice.backend == "reference", choice
    assert "passed over: cudnn (" in choice.reason and "cudnn_split (" in choice.reason


def test_the_split_threshold_sits_between_the_measured_shapes() -> None:
    band, split = selection.pairs(_gpu_problem(8, 1024, 1024)), selection.pairs(_gpu_problem(8, 1280, 1280))
    assert selection.GPU_MIN_PAIRS_FOR_FLASH < band < selection.GPU_MIN_PAIRS_FOR_SPLIT <= split


def test_cpu_rules() -> None:
    cpu = lambda t: Problem(1, t, t, 8, 1, 256, *["float32"] * 4, "cpu")  # noqa: E731
    assert selection.choose("auto", cpu(1024)).backend == "reference"
    assert selection.choose("auto", cpu(2048)).backend == "xla"


def test_pairs_counts_batch_heads_queries_and_keys() -> None:
    assert selection.pairs(_gpu_problem(4, 1024, 1024)) == selection.GPU_MIN_PAIRS_FOR_FLASH


def test_recording_collects_choices_in_this_thread_only(h100) -> None:
    import threading

    problem = _gpu_problem(2, 4096, 4096)
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
