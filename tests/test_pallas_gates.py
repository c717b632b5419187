"""The pallas backend's gates on every GPU of the support matrix, simulated on CPU: what `unsupported` says and
which tiling the kernels get, per GPU and JAX release (openpi's jax 0.5.3, the current 0.12, and 0.11.0 / 0.11.1
whose Pallas Triton lowering knows GPUs by name). Each gate mirrors an upstream check (`pallas/gates.py`).
"""

from __future__ import annotations

import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

from flashpatch import backends
from flashpatch.backends import machine
from flashpatch.backends.base import Problem
from flashpatch.backends.pallas import PallasBackend, gates, kernel, tiling
from flashpatch.core import selection

#: The tiling each GPU of the matrix gets at openpi's head_dim 256 in bf16, by its compute capability and shared
#: memory; sm100's own because sm90's does not fit a B200 (tiling.py's docstring, .ci/generations).
TILING = {
    "A100": "sm80-128x32",
    "A6000": "sm86-64x32",
    "RTX 3090": "sm86-64x32",
    "RTX 4090": "sm86-64x32",
    "L40S": "sm86-64x32",
    "H100": "sm90-128x64",
    "H200": "sm90-128x64",
    "B200": "sm100-64x64",
    "RTX 5090": "sm86-64x32",
    "RTX PRO 6000": "sm86-64x32",
}
#: Device kinds jax 0.11.0 and 0.11.1 do not know ("NVIDIA RTX A6000" and "NVIDIA L40S" by the word boundary).
NOT_NAMED_IN_0_11 = {"A6000", "RTX 3090", "L40S", "RTX 5090"}
JAX_RELEASES = ("0.5.3", "0.11.0", "0.11.1", "0.11.2", "0.12.0")


def _problem(dtype: str = "bfloat16", head_dim: int = 256) -> Problem:
    return Problem(32, 867, 867, 8, 1, head_dim, dtype, dtype, dtype, dtype, "gpu", causal_runs=False)


@pytest.fixture(autouse=True)
def _fresh_backend_check():
    gates._triton_backend_error.cache_clear()
    yield
    gates._triton_backend_error.cache_clear()


def test_the_matrix_is_machines_list() -> None:
    assert set(TILING) == set(machine.KNOWN)


@pytest.mark.parametrize("jax_version", JAX_RELEASES)
@pytest.mark.parametrize("gpu", list(TILING))
def test_every_cell(gpu: str, jax_version: str) -> None:
    with machine.simulated(gpu, versions_={"jax": jax_version, "jaxlib": jax_version}) as found:
        reason = PallasBackend().unsupported(_problem())
        config = tiling.for_gpu(machine.gpu(), 256, "bfloat16")
    assert config is not None and config.name == TILING[gpu]
    assert tiling.fits(config, f"{found.capability[0]}.{found.capability[1]}", 256, "bfloat16", found.shared_memory)
    if jax_version in ("0.11.0", "0.11.1") and gpu in NOT_NAMED_IN_0_11:
        assert reason is not None
        assert f"jax {jax_version}'s Pallas Triton lowering knows GPUs by name and not the {found.kind}" in reason
        assert "jax 0.11.2 or newer accepts any NVIDIA GPU" in reason
    else:
        assert reason is None, reason


def test_a_refused_gpu_moves_a_named_backend_to_openpis_attention() -> None:
    with machine.simulated("RTX 5090", versions_={"jax": "0.11.1"}):
        choice = selection.choose("pallas", _problem())
    assert choice.fallback and choice.backend == backends.REFERENCE
    assert "knows GPUs by name and not the NVIDIA GeForce RTX 5090" in choice.reason


@pytest.mark.parametrize(
    ("kind", "refused"),
    [
        ("NVIDIA A100-SXM4-80GB", False),
        ("NVIDIA A100 80GB PCIe", False),
        ("NVIDIA H100 80GB HBM3", False),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", False),
        ("NVIDIA A10", False),
        ("NVIDIA A10G", True),  # no word boundary after "A10"
        ("NVIDIA L40S", True),
        ("NVIDIA RTX A6000", True),
        ("vGPU NVIDIA H100", True),  # 0.11.0 and 0.11.1 match at the start of the kind (re.match), 0.11.2 anywhere
        ("NVIDIA GeForce RTX 3090", True),
        ("NVIDIA GeForce RTX 5090", True),
    ],
)
def test_the_0_11_name_match(kind: str, refused: bool) -> None:
    assert gates.named_gpu_refused(kind) is refused


def test_before_ampere_is_refused() -> None:
    t4 = machine.Gpu.of("Tesla T4", (7, 5))
    with machine.simulated(t4, versions_={"jax": "0.12.0"}):
        reason = PallasBackend().unsupported(_problem())
    assert reason is not None and "compute capability 8.0 or newer" in reason and "7.5" in reason


def test_the_drivers_shared_memory_decides() -> None:
    """The GPU's own figure, not the table's: less than the table gives smaller tiles, too little refuses."""
    table = machine.KNOWN["A6000"]
    tight = machine.Gpu(table.kind, table.capability, 72 * 1024)
    assert tiling.for_gpu(tight, 256, "bfloat16").name == "sm86-64x32"
    smaller = machine.Gpu(table.kind, table.capability, 70 * 1024)
    config = tiling.for_gpu(smaller, 256, "bfloat16")
    assert config is not None and config.name != "sm86-64x32"
    assert tiling.fits(config, "8.6", 256, "bfloat16", smaller.shared_memory)
    starved = machine.Gpu(table.kind, table.capability, 32 * 1024)
    assert tiling.for_gpu(starved, 256, "bfloat16") is None
    with machine.simulated(starved, versions_={"jax": "0.12.0"}):
        reason = PallasBackend().unsupported(_problem())
    assert reason is not None and "shared memory" in reason and str(32 * 1024) in reason


def test_one_shared_memory_table() -> None:
    assert not hasattr(tiling, "SHARED_MEMORY")
    for capability, limit in machine.SHARED_MEMORY.items():
        assert tiling.shared_memory_limit(f"{capability[0]}.{capability[1]}") == limit


def test_an_explicit_tiling_is_not_second_guessed_but_the_gpu_still_is() -> None:
    starved = machine.Gpu("NVIDIA RTX A6000", (8, 6), 32 * 1024)
    with machine.simulated(starved, versions_={"jax": "0.12.0"}):
        assert PallasBackend(config=tiling.SMALLEST).unsupported(_problem()) is None
    with machine.simulated("RTX 5090", versions_={"jax": "0.11.0"}):
        assert "knows GPUs by name" in PallasBackend(config=tiling.SMALLEST).unsupported(_problem())


# --- a JAX without Pallas Triton ---


def test_a_jax_without_pallas_triton(monkeypatch) -> None:
    """A future JAX that removed `jax.experimental.pallas.triton`: one clear sentence, and auto moves on."""
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # import raises ImportError
    with machine.simulated("A100", versions_={"jax": "0.14.0"}):
        reason = PallasBackend().unsupported(_problem())
        choice = selection.choose("auto", _problem())
    assert reason is not None and reason.startswith("pallas is written in Pallas for Triton, which jax 0.14.0")
    assert "deprecated its Pallas Triton backend in 0.11.0" in reason
    assert choice.backend != "pallas" and "pallas (pallas is written in Pallas for Triton" in choice.reason


def test_an_accelerated_deprecation(monkeypatch) -> None:
    """JAX makes a deprecation an error before removing it: then lowering raises, so pallas steps aside."""
    from jax._src import deprecations

    real = deprecations.is_accelerated
    monkeypatch.setattr(deprecations, "is_accelerated", lambda name: name == gates.DEPRECATION_ID or real(name))
    reason = PallasBackend().unsupported(Problem(2, 40, 40, 8, 1, 256, *["float32"] * 4, "cpu"))
    assert reason is not None and "raises instead of warning" in reason


def test_lowering_warns_from_jax_0_11_2() -> None:
    """jax 0.11.2 and later warn at every Pallas Triton lowering; openpi's 0.5.3 does not."""
    from jax import export

    try:
        from jax._src.pallas.triton import gpu_info, pallas_call_registration
    except ImportError:
        pretend = None
    else:
        h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
        pretend = (pallas_call_registration.gpu_info_lib, h100)
    q = jax.ShapeDtypeStruct((1, 32, 2, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 32, 1, 64), jnp.bfloat16)
    rank = jax.ShapeDtypeStruct((1, 32), jnp.int32)
    call = jax.jit(lambda q, k, v, r: kernel.flash_attention(q, k, v, r, config=tiling.SMALLEST, interpret=False))
    with warnings.catch_warnings(record=True) as seen, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        if pretend is not None:
            patch.setattr(pretend[0], "get_gpu_info", lambda: pretend[1])
        export.export(
            call, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        )(q, kv, kv, rank)
    deprecation = [w for w in seen if "Pallas Triton backend is deprecated" in str(w.message)]
    jax_version = tuple(int(part) for part in jax.__version__.split(".")[:3])
    if jax_version >= (0, 11, 2):
        assert deprecation and all(w.category is DeprecationWarning for w in deprecation)
    else:
        assert not deprecation
