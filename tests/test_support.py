"""The support matrix: computed per GPU generation and stack through the backends' own gates (simulated), the same
table in docs/user-guide.md, and doctor's row for the user's own GPU."""

from __future__ import annotations

import argparse
import pathlib

import pytest

from flashpatch.backends import cudnn, machine
from flashpatch.tools import doctor, support

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "user-guide.md"
OPENPI, CURRENT = support.STACKS


def test_the_user_guide_holds_the_computed_matrix() -> None:
    """Regenerate with `python -m flashpatch.tools.support` when a gate or rule changes."""
    assert support.markdown() in GUIDE.read_text(), "docs/user-guide.md's support matrix differs from the gates'"


@pytest.mark.parametrize(
    ("gpu", "stack", "model", "backend"),
    [
        ("H200", OPENPI, "pi0", "cudnn_split"),  # no FlashAttention on jax 0.5.3; cuDNN 9.5.1 on Hopper
        ("H200", OPENPI, "pi0_fast", "cudnn"),  # a causal suffix up to T=1024
        ("H200", CURRENT, "pi0", "flash"),  # FA3 through dew-flash-attn
        ("RTX 4090", CURRENT, "pi0", "pallas"),  # FA2's backward refuses head_dim 256 on 8.9; cuDNN too
        ("A100", CURRENT, "pi0", "flash"),  # FA2, built for sm80
        ("B200", CURRENT, "pi0", "pallas"),  # no sm100 FlashAttention; cuDNN's needs 9.23, the plugin's floor is 9.10
        ("RTX 5090", OPENPI, "pi0", "pallas"),
    ],
)
def test_cells_follow_the_gates(gpu: str, stack, model: str, backend: str) -> None:
    assert support.cell(gpu, stack, support.training_calls()[model])[0] == backend


def test_a_newer_cudnn_moves_the_b200_to_cudnn() -> None:
    newer = support.Stack("newer", CURRENT.versions, 92300, "current JAX with cuDNN 9.23")
    assert support.cell("B200", newer, support.training_calls()["pi0"])[0] == "cudnn_split"


@pytest.mark.parametrize(
    ("gpu", "jax", "refused"),
    [("H200", "0.5.3", False), ("B200", "0.5.3", True), ("B200", "0.8.2", False), ("RTX 4090", "0.12.0", True)],
)
def test_jaxs_own_head_dim_rule_by_version(gpu: str, jax: str, refused: bool) -> None:
    """Before jax 0.8.2 cuDNN took head_dim 256 only at compute capability exactly 9.0; from 0.8.2 at 9.0 and up."""
    with machine.simulated(gpu, cudnn=92300, versions_={"jax": jax}):
        reason = cudnn.simulated_jax_rule(support.training_calls()["pi0"])
    assert (reason is not None) == refused, reason


def _doctor_args(**changes) -> argparse.Namespace:
    values = dict(backend=None, batch=1, q_len=867, kv_len=867, heads=8, kv_heads=1, head_dim=256, dtype="bfloat16")
    values["no_causal_runs"] = False
    values.update(changes)
    return argparse.Namespace(**values)


def test_doctor_prints_the_users_own_row() -> None:
    with machine.simulated("RTX 4090", cudnn=OPENPI.cudnn, versions_=OPENPI.versions):
        text = doctor.report(_doctor_args())
    assert "NVIDIA GeForce RTX 4090 (sm89, Ampere / Ada):" in text, text
    assert "pi0 training (B=32, T=867): pallas; CI compile check" in text, text
    assert "python -m flashpatch tune pi0" in text, text
