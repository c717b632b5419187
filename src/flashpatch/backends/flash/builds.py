"""What a FlashAttention wheel holds, read from its files: GPU code per compute capability, the library's own
checks, and what it asks of JAX. Read without importing the library (importing needs a CUDA runtime).

A CUDA library carries its GPU code in the ELF section `.nv_fatbin`: per kernel, a cubin built for one compute
capability (it runs on that major version at that minor or above: sm80 code runs on 8.6 and 8.9) and optionally
PTX for a virtual architecture, which the driver compiles for any newer GPU at first use. FlashAttention-2's API
(flash_attn_jax's `mha_fwd.cpp` / `mha_bwd.cpp`, built into both libraries flashpatch calls) refuses GPUs by
conditions on the compute capability, and `FFI_CHECK` stores each condition's text in the library: those texts are
read here too, so the gates evaluate the checks the installed build holds.

`RECORDED` holds what this reader found in the released wheels; under `machine.simulated` the gates use it (the
simulated package is not on disk), on a real install they read the installed files. CI re-reads the wheels and
compares (`python -m flashpatch.backends.flash.builds --check WHEEL...`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import mmap
import re
import struct
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from flashpatch import versions
from flashpatch.backends import machine

_FATBIN_MAGIC = 0xBA55ED50
_ENTRY_PTX, _ENTRY_CUBIN = 1, 2
#: An FFI_CHECK condition on the compute capability, as the library stores its text.
_CHECK = re.compile(rb"is_sm\w+(?: \|\| is_sm\w+)*")
#: The terms of those conditions, as flash_attn_jax's mha_fwd.cpp / mha_bwd.cpp define them from
#: cudaDevAttrComputeCapabilityMajor / Minor.
_TERMS = {
    "is_sm8x": lambda major, minor: major == 8,
    "is_sm80": lambda major, minor: (major, minor) == (8, 0),
    "is_sm90": lambda major, minor: (major, minor) == (9, 0),
    "is_sm1xx": lambda major, minor: major >= 10,
}


@dataclasses.dataclass(frozen=True)
class Library:
    """One shared library of a wheel."""

    name: str  # file name, e.g. "libdew_flash_attn.so"
    cubins: tuple[int, ...]  # compute capabilities with built code, e.g. (80, 120)
    ptx: tuple[int, ...]  # virtual architectures with PTX, e.g. (80,)
    #: FlashAttention-2's `FlashAttention only supports Ampere GPUs or newer` condition; None: not an FA2 build.
    device_check: str | None = None
    #: FlashAttention-2's `FlashAttention backward for head dim > 192 requires A100/A800 or H100/H800` condition.
    wide_backward_check: str | None = None
    #: Its FFI handlers bind `ffi::DeviceOrdinal` (XLA_FFI_DeviceOrdinal_Get, which JAX's FFI API gained in 0.6.0).
    device_ordinal: bool = False

    def code_for(self, capability: tuple[int, int]) -> str | None:
        """'cubin' or 'ptx' for what a GPU of `capability` would run, or None (CUDA's compatibility rules)."""
        major, minor = capability
        if any(c // 10 == major and c % 10 <= minor for c in self.cubins):
            return "cubin"
        if any((p // 10, p % 10) <= (major, minor) for p in self.ptx):
            return "ptx"
        return None

    def refuses(self, capability: tuple[int, int], head_dim: int, who: str) -> str | None:
        """Why this FlashAttention-2 build cannot train at `head_dim` on a GPU of `capability`, or None.

        PTX alone is refused: the driver would compile it at first use, which no one has run with flashpatch.
        """
        cc = f"{capability[0]}.{capability[1]}"
        code = self.code_for(capability)
        if code is None:
            held = ", ".join(f"sm{c}" for c in self.cubins) or "none"
            return f"{who} has no code for compute capability {cc} (its {self.name} holds code for {held})"
        if code == "ptx":
            held = ", ".join(f"sm{c}" for c in self.cubins)
            return (
                f"{who} holds no code built for compute capability {cc} (only {held}), just compute_"
                f"{max(self.ptx)} PTX that the driver would compile at first use, untried with flashpatch"
            )
        # FlashAttention-2's API, mha_fwd.cpp / mha_bwd.cpp: FFI_CHECK(<this condition>) << "FlashAttention only
        # supports Ampere GPUs or newer."
        if not admits(self.device_check, capability):
            return f"{who} refuses compute capability {cc} (its check: {self.device_check})"
        # mha_bwd.cpp: if (head_size > 192) FFI_CHECK(<this condition>) << "FlashAttention backward for head dim >
        # 192 requires A100/A800 or H100/H800". It fails when the backward runs, after compilation: refused here.
        if head_dim > 192 and not admits(self.wide_backward_check, capability):
            return (
                f"{who}'s backward refuses head dim {head_dim} (> 192) on compute capability {cc} "
                f"(its check: {self.wide_backward_check}), which would fail the training step when it runs"
            )
        return None


@dataclasses.dataclass(frozen=True)
class Release:
    """One release of a wheel: its declared JAX range and its libraries."""

    distribution: str
    version: str
    requires_jax: str  # the wheel's Requires-Dist on jax, e.g. ">=0.11.2"
    libraries: tuple[Library, ...]

    @property
    def who(self) -> str:
        """How messages name it: the library and its version."""
        return f"{self.distribution.removesuffix('-cu12').removesuffix('-cu13')} {self.version}"

    def library(self, name: str) -> Library | None:
        return next((lib for lib in self.libraries if lib.name.startswith(name)), None)

    def jax_refusal(self, jax_version) -> str | None:
        """Why the installed JAX is outside the wheel's Requires-Dist (pip enforces it at install; a JAX changed
        later is not), or None."""
        if self.requires_jax and jax_version and not versions.satisfies(jax_version, self.requires_jax):
            return f"{self.who} needs jax{self.requires_jax}; JAX here is {jax_version}"
        return None


def admits(check: str | None, capability: tuple[int, int]) -> bool:
    """Whether a stored FFI_CHECK condition passes on `capability`; a term this module does not know fails it."""
    if check is None:
        return True
    return any(_TERMS.get(term.strip(), lambda *_: False)(*capability) for term in check.split("||"))


# --- reading a library --------------------------------------------------------------------------------------------


def _sections(data: mmap.mmap) -> dict[str, tuple[int, int]]:
    """ELF64 little-endian section name -> (offset, size)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    found = {}
    for header in headers:
        start = names_offset + header[0]
        name = data[start : data.find(b"\0", start)].decode()
        found[name] = (header[4], header[5])
    return found


def _fatbin(data: mmap.mmap, offset: int, size: int) -> tuple[set[int], set[int]]:
    """(cubin targets, PTX targets) of a `.nv_fatbin` section: fatbin headers, each followed by its entries."""
    cubins: set[int] = set()
    ptx: set[int] = set()
    pos, end = offset, offset + size
    while pos + 16 <= end:
        magic, _, header_size, body_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != _FATBIN_MAGIC:
            pos += 8  # headers are 8-byte aligned; padding between them
            continue
        entry, body_end = pos + header_size, pos + header_size + body_size
        while entry < body_end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            (cubins if kind == _ENTRY_CUBIN else ptx if kind == _ENTRY_PTX else set()).add(arch)
            entry += entry_header + payload
        pos = body_end
    return cubins, ptx


def _checks(data: mmap.mmap) -> set[str]:
    """Every stored condition text made only of is_sm terms (NUL-terminated strings of the library)."""
    found = set()
    at = data.find(b"is_sm")
    while at != -1:
        start = data.rfind(b"\0", 0, at) + 1
        stop = data.find(b"\0", at)
        if _CHECK.fullmatch(data[start:stop]):
            found.add(data[start:stop].decode())
        at = data.find(b"is_sm", stop)
    return found


def read_library(path: Path) -> Library:
    """What one shared library holds (cubins, PTX, FA2's checks, whether it binds the FFI device ordinal)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        sections = _sections(data)
        cubins, ptx = _fatbin(data, *sections[".nv_fatbin"]) if ".nv_fatbin" in sections else (set(), set())
        checks = _checks(data)
        device_ordinal = data.find(b"DeviceOrdinal") != -1
    return Library(
        name=path.name,
        cubins=tuple(sorted(cubins)),
        ptx=tuple(sorted(ptx)),
        device_check=next((c for c in sorted(checks) if "is_sm8x" in c), None),
        wide_backward_check=next((c for c in sorted(checks) if "is_sm80" in c), None),
        device_ordinal=device_ordinal,
    )


def _jax_spec(requirements: Iterable[str]) -> str:
    for requirement in requirements:
        match = re.fullmatch(r"jax\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;.*)?", requirement.strip())
        if match:
            return ",".join(sorted(part.strip() for part in match.group(1).split(",") if part.strip()))
    return ""


def _is_library(name: str) -> bool:
    return name.endswith(".so") or ".so." in name or re.search(r"\.cpython-[^/]*\.so$", name) is not None


def read_wheel(wheel: Path) -> Release:
    """A release read from its wheel file (CI's check of `RECORDED`)."""
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as scratch:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
        name = re.search(r"^Name: (.+)$", metadata, re.M).group(1).strip()
        version = re.search(r"^Version: (.+)$", metadata, re.M).group(1).strip()
        requires = re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)
        libraries = []
        for member in sorted(n for n in archive.namelist() if _is_library(n)):
            path = Path(archive.extract(member, scratch))
            libraries.append(read_library(path))
            path.unlink()
    return Release(_normal(name), version, _jax_spec(requires), tuple(libraries))


@functools.cache
def read_installed(distribution: str) -> Release | None:
    """The installed release of `distribution`, read from its files; None where it is not installed."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    libraries = tuple(
        read_library(Path(found.locate_file(file)))
        for file in sorted(found.files or (), key=str)
        if _is_library(str(file)) and Path(found.locate_file(file)).is_file()
    )
    return Release(_normal(distribution), found.version, _jax_spec(found.requires or ()), libraries)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- what the released wheels hold ----------------------------------------------------------------------------------

_FA2_DEVICE_CHECK = "is_sm90 || is_sm8x || is_sm1xx"
_FA2_WIDE_BACKWARD_CHECK = "is_sm80 || is_sm90 || is_sm1xx"


def _dew(distribution: str) -> Release:
    # dew-flash-attn 0.3.6 (both CUDA majors alike): FA2 built for sm80 and sm120, FA3 for sm90a, no PTX.
    return Release(
        distribution,
        "0.3.6",
        ">=0.11.2",
        (
            Library("libdew_flash_attn.so", (80, 120), (), _FA2_DEVICE_CHECK, _FA2_WIDE_BACKWARD_CHECK, True),
            Library("libdew_flash_attn3.so", (90,), (), None, None, True),
        ),
    )


#: (distribution, version) -> what `read_wheel` found in that wheel (manylinux x86_64).
RECORDED: dict[tuple[str, str], Release] = {
    ("dew-flash-attn-cu12", "0.3.6"): _dew("dew-flash-attn-cu12"),
    ("dew-flash-attn-cu13", "0.3.6"): _dew("dew-flash-attn-cu13"),
    # flash-attn-jax 0.6.2 (cp311, cp312 and cp313 wheels alike): FA2 built for sm80 with compute_80 PTX.
    ("flash-attn-jax", "0.6.2"): Release(
        "flash-attn-jax",
        "0.6.2",
        "<0.9.0,>=0.5.0",
        (
            Library(
                "flash_api.cpython-311-x86_64-linux-gnu.so",
                (80,),
                (80,),
                _FA2_DEVICE_CHECK,
                _FA2_WIDE_BACKWARD_CHECK,
                True,
            ),
        ),
    ),
}


def installed(distribution: str) -> Release | str | None:
    """The release of `distribution` the gates see: None where it is not installed; a sentence where it is
    simulated at a version with no record here. Simulated (`machine.simulated`): `RECORDED`; else the files."""
    if not machine.is_simulated():
        return read_installed(distribution)
    version = versions.installed(distribution)
    if version is None:
        return None
    record = RECORDED.get((_normal(distribution), str(version)))
    if record is None:
        known = ", ".join(v for d, v in RECORDED if d == _normal(distribution)) or "none"
        return f"no record of what {distribution} {version} holds (recorded: {known})"
    return record


# --- CI: the record against the wheels ------------------------------------------------------------------------------


def _same(found: Release, recorded: Release) -> bool:
    """Equal but for the library file's Python tag (cp311 / cp312 / cp313 build the same code)."""

    def strip(release: Release) -> Release:
        libraries = tuple(
            dataclasses.replace(lib, name=re.sub(r"\.cpython-[^.]*", "", lib.name)) for lib in release.libraries
        )
        return dataclasses.replace(release, libraries=libraries)

    return strip(found) == strip(recorded)


def main(argv: list[str] | None = None) -> int:
    """`--check WHEEL...`: each wheel's release against `RECORDED` (exit 1 on a difference); WHEEL...: print
    each; `--recorded`: the recorded releases as requirements (name==version)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--recorded"]:  # what CI downloads to check
        print(" ".join(f"{name}=={version}" for name, version in RECORDED))
        return 0
    check = "--check" in args
    wheels = [Path(a) for a in args if a != "--check"]
    if not wheels:
        print("usage: python -m flashpatch.backends.flash.builds [--check] WHEEL... | --recorded", file=sys.stderr)
        return 2
    status = 0
    for wheel in wheels:
        found = read_wheel(wheel)
        recorded = RECORDED.get((found.distribution, found.version))
        if not check:
            print(found)
        elif recorded is None:
            print(f"builds: {wheel.name}: {found.distribution} {found.version} has no record in RECORDED: {found}")
            status = 1
        elif not _same(found, recorded):
            print(f"builds: {wheel.name}: differs from RECORDED\n  read:     {found}\n  recorded: {recorded}")
            status = 1
        else:
            print(f"builds: {wheel.name}: as recorded")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
