"""Which FlashAttention library serves openpi's attention (head_dim 256, bf16) on each GPU openpi's users train on,
under openpi's pins and under the current JAX: what `flash.unsupported` says and which provider it would use.

Every GPU and package version is simulated (`machine.simulated`); the libraries' builds and checks come from the
record `builds.RECORDED`, which CI compares with the released wheels.
"""

from __future__ import annotations

import pytest

from flashpatch import backends
from flashpatch.backends import machine
from flashpatch.backends.flash import builds, providers
from flashpatch.testing import conformance

NONE = {"dew-flash-attn-cu12": None, "dew-flash-attn-cu13": None, "flash-attn-jax": None}
STACKS = {
    # openpi's pins with `flashpatch[flash-attn-jax]` installed (it resolves there) and without.
    "openpi": {**NONE, "jax": "0.5.3", "jaxlib": "0.5.3", "flash-attn-jax": "0.6.2"},
    "openpi_bare": {**NONE, "jax": "0.5.3", "jaxlib": "0.5.3"},
    # The current JAX with `flashpatch[flash]`.
    "current": {**NONE, "jax": "0.12.0", "jaxlib": "0.12.0", "dew-flash-attn-cu12": "0.3.6"},
    # JAX 0.8, the newest flash-attn-jax takes, with `flashpatch[flash-attn-jax]`.
    "jax08": {**NONE, "jax": "0.8.1", "jaxlib": "0.8.1", "flash-attn-jax": "0.6.2"},
}
GPUS = ("A100", "A6000", "RTX 3090", "RTX 4090", "L40S", "H100", "H200", "B200", "RTX 5090", "RTX PRO 6000")

DEW_TOO_OLD = "dew-flash-attn needs JAX 0.11.2 or newer (JAX here is 0.5.3)"
NO_ORDINAL = "flash-attn-jax 0.6.2's kernels read the device through XLA's FFI call XLA_FFI_DeviceOrdinal_Get"
WIDE = "backward refuses head dim 256 (> 192) on compute capability"
PTX_ONLY = "holds no code built for compute capability"
#: (stack, GPU) -> (provider, a phrase of the reason where none serves). Unlisted pairs: see `_expected`.
EXPECTED = {
    ("current", "A100"): ("dew-flash-attn", None),
    ("current", "H100"): ("dew-flash-attn", None),
    ("current", "H200"): ("dew-flash-attn", None),
    ("current", "B200"): (None, "dew-flash-attn 0.3.6 has no code for compute capability 10.0"),
    ("current", "RTX 5090"): ("dew-flash-attn", None),
    ("current", "RTX PRO 6000"): ("dew-flash-attn", None),
    ("jax08", "A100"): ("flash-attn-jax", None),
}


def _expected(stack: str, gpu: str) -> tuple[str | None, str]:
    if (stack, gpu) in EXPECTED:
        return EXPECTED[stack, gpu]
    if stack == "openpi":
        return None, NO_ORDINAL
    if stack == "openpi_bare":
        return None, "flash-attn-jax runs on JAX 0.6 to 0.8 (JAX here is 0.5.3)"
    if gpu in ("A6000", "RTX 3090", "RTX 4090", "L40S"):
        return None, WIDE
    assert stack == "jax08"
    return None, PTX_ONLY  # Hopper and Blackwell: only compute_80 PTX


def _problem(head_dim: int = 256):
    import dataclasses

    problem = conformance.problem_of(conformance.CASES["pi0_fast"], "bfloat16", "gpu")
    return dataclasses.replace(problem, num_heads=8, num_kv_heads=1, head_dim=head_dim)


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("stack", list(STACKS))
def test_cell(stack: str, gpu: str) -> None:
    provider, phrase = _expected(stack, gpu)
    with machine.simulated(gpu, versions_=STACKS[stack]) as found:
        choice = providers.choose(found, 256)
        reason = backends.get("flash").unsupported(_problem())
    assert choice.name == provider, (choice.name, choice.refusals)
    if provider is None:
        assert phrase in reason, reason
        if stack.startswith("openpi"):
            assert DEW_TOO_OLD in reason
    else:
        assert reason is None


@pytest.mark.parametrize("gpu", ["A6000", "RTX 4090", "L40S"])
def test_ada_and_ga10x_take_flash_at_head_dims_up_to_192(gpu: str) -> None:
    """FA2's head_dim > 192 backward check is what refuses 8.6 and 8.9 at openpi's 256; narrower heads pass."""
    with machine.simulated(gpu, versions_=STACKS["current"]):
        assert backends.get("flash").unsupported(_problem(128)) is None
        assert WIDE in backends.get("flash").unsupported(_problem(256))


def test_jax_0_12_refuses_a_forced_flash_attn_jax() -> None:
    """Installed past its Requires-Dist (pip --no-deps), flash-attn-jax is refused by it."""
    with machine.simulated(
        "A100", versions_={**STACKS["current"], "dew-flash-attn-cu12": None, "flash-attn-jax": "0.6.2"}
    ):
        assert (
            "flash-attn-jax 0.6.2 needs jax<0.9.0,>=0.5.0; JAX here is 0.12.0"
            in providers.choose(machine.gpu(), 256).reason
        )


def test_a_dew_wheel_on_a_jax_below_its_floor_is_refused() -> None:
    with machine.simulated("H100", versions_={**STACKS["current"], "jax": "0.11.1", "jaxlib": "0.11.1"}):
        assert (
            "dew-flash-attn 0.3.6 needs jax>=0.11.2; JAX here is 0.11.1" in providers.choose(machine.gpu(), 256).reason
        )


def test_a_release_with_no_record_says_so() -> None:
    with machine.simulated("H100", versions_={**STACKS["current"], "dew-flash-attn-cu12": "0.4.0"}):
        assert "no record of what dew-flash-attn-cu12 0.4.0 holds" in providers.choose(machine.gpu(), 256).reason


def test_cuda_13_jax_refuses_flash_attn_jax() -> None:
    stack = {**STACKS["jax08"], "jax-cuda13-plugin": "0.8.1", "jax-cuda12-plugin": None}
    with machine.simulated("A100", versions_=stack):
        assert "built for CUDA 12 but JAX runs CUDA 13" in providers.choose(machine.gpu(), 256).reason


def test_the_record_holds_the_checks_read_from_the_wheels() -> None:
    """The FA2 conditions each rule evaluates, as both libraries store them (`python -m ...builds --check`)."""
    for release in builds.RECORDED.values():
        fa2 = release.libraries[0]
        assert fa2.device_check == "is_sm90 || is_sm8x || is_sm1xx"
        assert fa2.wide_backward_check == "is_sm80 || is_sm90 || is_sm1xx"


def test_a_provider_that_does_not_import_on_a_real_gpu_is_refused_with_why(monkeypatch) -> None:
    """Past its gates, a provider on a real machine must still import; where it does not, the next one is asked and
    the reason names the import's failure."""
    from flashpatch.backends.flash import kernel

    monkeypatch.setattr(kernel, "limits", lambda gpu, head_dim: None)  # its gates pass
    monkeypatch.setattr(kernel, "load", lambda: "dew-flash-attn is installed but its kernel library failed to load")
    monkeypatch.setattr(machine, "is_simulated", lambda: False)
    choice = providers.choose(machine.KNOWN["H200"], 256)
    assert choice.provider is None, choice
    assert ("dew-flash-attn", "dew-flash-attn is installed but its kernel library failed to load") in choice.refusals
