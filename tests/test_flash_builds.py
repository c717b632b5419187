"""Reading what a FlashAttention wheel holds (`flash.builds`): GPU code, FA2's checks, the FFI device ordinal.

A small ELF file made here stands in for a kernel library; where a real one is installed (not in CI), what is read
from it is compared with the record the simulated tests use. CI compares the record with the released wheels
(`.ci/run`, `python -m flashpatch.backends.flash.builds --check`).
"""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path

import pytest

from flashpatch import versions
from flashpatch.backends import machine
from flashpatch.backends.flash import builds, flash_attn_jax, kernel


def _fatbin(entries: list[tuple[int, int]]) -> bytes:
    """One fatbin blob: (kind, arch) entries with a few payload bytes each."""
    body = b""
    for kind, arch in entries:
        header = bytearray(64)
        struct.pack_into("<HHIQ", header, 0, kind, 1, 64, 8)
        struct.pack_into("<I", header, 28, arch)
        body += bytes(header) + b"\xab" * 8
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def _elf(path: Path, fatbin: bytes, rodata: bytes) -> Path:
    """A 64-bit little-endian ELF file with .shstrtab, .nv_fatbin and .rodata sections."""
    names = b"\0.shstrtab\0.nv_fatbin\0.rodata\0"
    blobs = [names, fatbin, rodata]
    offsets, data = [], b""
    for blob in blobs:
        offsets.append(64 + len(data))
        data += blob + b"\0" * (-len(blob) % 8)
    shoff = 64 + len(data)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 4, 1)
    sections = struct.pack("<IIQQQQIIQQ", *[0] * 10)
    for name, offset, blob in zip((b".shstrtab", b".nv_fatbin", b".rodata"), offsets, blobs, strict=True):
        sections += struct.pack("<IIQQQQIIQQ", names.index(name), 1, 0, 0, offset, len(blob), 0, 0, 8, 0)
    path.write_bytes(bytes(header) + data + sections)
    return path


def test_reads_targets_checks_and_the_device_ordinal(tmp_path) -> None:
    fatbin = _fatbin([(2, 80), (1, 80)]) + b"\0" * 8 + _fatbin([(2, 120), (2, 80)])
    rodata = b"\0is_sm90 || is_sm8x || is_sm1xx\0is_sm80 || is_sm90\0bf16 needs is_sm80\0N3xla3ffi13DeviceOrdinalE\0"
    library = builds.read_library(_elf(tmp_path / "libfa2.so", fatbin, rodata))
    assert library.cubins == (80, 120) and library.ptx == (80,)
    assert library.device_check == "is_sm90 || is_sm8x || is_sm1xx"
    assert library.wide_backward_check == "is_sm80 || is_sm90"
    assert library.device_ordinal


def test_a_library_without_gpu_code_or_checks(tmp_path) -> None:
    library = builds.read_library(_elf(tmp_path / "libcpu.so", b"\0" * 16, b"\0plain text\0"))
    assert (library.cubins, library.ptx, library.device_check, library.device_ordinal) == ((), (), None, False)
    assert "no code for compute capability 8.0" in library.refuses((8, 0), 64, "lib")


@pytest.mark.parametrize(
    ("capability", "code"),
    [((8, 0), "cubin"), ((8, 6), "cubin"), ((8, 9), "cubin"), ((9, 0), "ptx"), ((12, 0), "ptx"), ((7, 5), None)],
)
def test_cuda_compatibility_rules(capability, code) -> None:
    """A cubin runs on its major at its minor or above; PTX on any later GPU, compiled by the driver."""
    assert builds.Library("lib", (80,), (80,)).code_for(capability) == code
    assert builds.Library("lib", (80, 120), ()).code_for((12, 1)) == "cubin"
    assert builds.Library("lib", (90,), ()).code_for((10, 0)) is None


@pytest.mark.parametrize(
    ("check", "capability", "passes"),
    [
        ("is_sm90 || is_sm8x || is_sm1xx", (8, 6), True),
        ("is_sm90 || is_sm8x || is_sm1xx", (7, 5), False),
        ("is_sm90 || is_sm8x", (12, 0), False),
        ("is_sm80 || is_sm90 || is_sm1xx", (8, 9), False),
        ("is_sm80 || is_sm90 || is_sm1xx", (12, 0), True),
        ("is_sm80 || is_sm90 || is_sm1xx", (10, 0), True),
        ("is_sm80 || is_sm_new", (9, 0), False),  # an unknown term fails
        (None, (7, 0), True),
    ],
)
def test_the_checks_evaluate_as_the_library_defines_them(check, capability, passes) -> None:
    assert builds.admits(check, capability) is passes


def test_simulation_reads_the_record_and_a_real_stack_its_files(monkeypatch) -> None:
    with machine.simulated("A100", versions_={"flash-attn-jax": "0.6.2"}):
        assert builds.installed("flash-attn-jax") is builds.RECORDED["flash-attn-jax", "0.6.2"]
    with machine.simulated("A100", versions_={"flash-attn-jax": None}):
        assert builds.installed("flash-attn-jax") is None
    seen = []
    monkeypatch.setattr(builds, "read_installed", lambda name: seen.append(name))
    builds.installed("dew-flash-attn-cu12")
    assert seen == ["dew-flash-attn-cu12"]


def test_the_jaxlib_ffi_floor_matches_this_jaxlib_s_own_header() -> None:
    """flash-attn-jax's gate says jaxlib gained XLA_FFI_DeviceOrdinal_Get in 0.6.0; the installed jaxlib's FFI
    header must agree (openpi's 0.5.3 lacks it, the current stack has it)."""
    spec = importlib.util.find_spec("jaxlib")
    header = Path(next(iter(spec.submodule_search_locations))) / "include" / "xla" / "ffi" / "api" / "c_api.h"
    if not header.exists():
        pytest.skip(f"this jaxlib ships no FFI header at {header}")
    has = re.search(r"_XLA_FFI_API_STRUCT_FIELD\(XLA_FFI_DeviceOrdinal_Get\)", header.read_text()) is not None
    jaxlib = versions.installed("jaxlib")
    assert has == versions.satisfies(jaxlib, f">={flash_attn_jax.FFI_DEVICE_ORDINAL_JAXLIB}"), (jaxlib, has)


@pytest.mark.parametrize("distribution", ["flash-attn-jax", *kernel.WHEELS.values()])
def test_an_installed_release_is_as_recorded(distribution: str) -> None:
    found = builds.read_installed(distribution)
    if found is None:
        pytest.skip(f"{distribution} is not installed")
    recorded = builds.RECORDED.get((found.distribution, found.version))
    if recorded is None:
        pytest.skip(f"{distribution} {found.version} has no record")
    assert builds._same(found, recorded), (found, recorded)
