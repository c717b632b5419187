"""Versions of installed distributions, read from their metadata without importing them.

Why not import and read `__version__`: the stacks flashpatch must tell apart are exactly the ones
where importing fails or is costly (jax-triton raises on a CPU-only jaxlib; triton and kvax pull in
compilers). `importlib.metadata` reads the installed `*.dist-info` instead, and `packaging` (PEP 440)
parses and compares, so the kvax backend and `doctor` decide what fits before touching any of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
from collections.abc import Callable, Iterable, Iterator, Mapping

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

Lookup = Callable[[str], str]


def parse(text: str) -> Version:
    """A PEP 440 version; ValueError naming `text` when it is not one."""
    if not isinstance(text, str):
        raise TypeError(f"version must be a str like '0.5.3'; got {type(text).__name__} {text!r}")
    try:
        return Version(text.strip())
    except InvalidVersion:
        raise ValueError(f"version must look like '0.5.3', '3.2.0rc1' or '2.7.1+cu126'; got {text!r}") from None


_simulated: contextvars.ContextVar[Mapping[str, str | None] | None] = contextvars.ContextVar(
    "flashpatch_versions", default=None
)


@contextlib.contextmanager
def simulated(found: Mapping[str, str | None]) -> Iterator[None]:
    """Within the block (this thread or task), `installed` reports these versions (None: not installed) for the
    names given, and the real ones for the rest: CPU tests of what another stack would decide."""
    token = _simulated.set({**(_simulated.get() or {}), **{name.lower(): value for name, value in found.items()}})
    try:
        yield
    finally:
        _simulated.reset(token)


def installed(distribution: str, lookup: Lookup | None = None) -> Version | None:
    """The installed version of `distribution` (its PyPI name, e.g. 'jax-triton'), or None.

    `lookup` maps a name to a version string and raises PackageNotFoundError for a missing one
    (default: the installed metadata, read once per process, or what `simulated` says); tests pass fake ones.
    """
    pretend = _simulated.get() or {}
    if lookup is None and distribution.lower() in pretend:
        value = pretend[distribution.lower()]
        return None if value is None else parse(value)
    if lookup is None:
        text = _metadata_version(distribution)
        return None if text is None else parse(text)
    try:
        text = lookup(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return parse(text)


@functools.cache
def _metadata_version(distribution: str) -> str | None:
    """The installed metadata's version of `distribution`, read once: the gates, the compile guard's keys and the
    tune table's identity ask on every traced attention call, and what is installed does not change under a
    running process (a package installed meanwhile is seen by the next one)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfies(version: Version | str, spec: str) -> bool:
    """Whether `version` meets `spec`, e.g. '>=0.5.3,<0.6'; a local label ('+cu126') is ignored.

    Pre-releases are matched too, by PEP 440's rules (as pip reads a spec: '<0.7' admits 0.6.1rc1 but
    not 0.7.0rc1).
    """
    version = version if isinstance(version, Version) else parse(version)
    try:
        specifiers = SpecifierSet(spec)
    except InvalidSpecifier:
        raise ValueError(f"spec must hold clauses like '>=0.5.3,<0.6'; got {spec!r}") from None
    if not str(specifiers):
        raise ValueError(f"spec must hold clauses like '>=0.5.3,<0.6'; got {spec!r}")
    return specifiers.contains(Version(version.public), prereleases=True)


#: The releases CI tests flashpatch on: openpi's pins at the old end, the newest on PyPI at the other
#: (docs/user-guide.md, "Supported versions"). A release outside these ranges is untested, not known
#: broken: `outside_tested` names it, so that CI fails in one place (tests/test_versions.py) the first
#: time it resolves one, and `doctor` can say so.
TESTED = {
    "jax": ">=0.5.3,<0.13",
    "jaxlib": ">=0.5.3,<0.13",
    "flax": ">=0.10.2,<0.13",
}


#: The distributions whose versions decide how an attention kernel lowers, compiles and runs: what the compile
#: guard keys its verdicts on, what a `tune` table is valid for (with flashpatch itself), what doctor lists.
KERNEL_STACK = (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "dew-flash-attn-cu12",
    "dew-flash-attn-cu13",
    "flash-attn-jax",
    "kvax",
    "jax-triton",
    "triton",
)


def stack(names: Iterable[str], lookup: Lookup | None = None) -> dict[str, Version | None]:
    """Installed versions of `names`, None where one is missing."""
    return {name: installed(name, lookup) for name in names}


def outside_tested(tested: Mapping[str, str] = TESTED, lookup: Lookup | None = None) -> dict[str, tuple[Version, str]]:
    """Installed distributions whose version falls outside `tested`: name -> (version, tested spec)."""
    found = stack(tested, lookup)
    return {
        name: (version, tested[name])
        for name, version in found.items()
        if version is not None and not satisfies(version, tested[name])
    }
