"""Versions of installed distributions, read from their metadata without importing them.

Why not import and read `__version__`: the stacks flashpatch must tell apart are exactly the ones
where importing fails or is costly (jax-triton raises on a CPU-only jaxlib; triton and kvax pull in
compilers). `importlib.metadata` reads the installed `*.dist-info` instead, so the kvax backend and
`doctor` can decide what fits before touching any of it.

The parser covers the PEP 440 forms the stacks we meet use: `0.5.3`, `0.9.0.1`, `3.2.0rc1`,
`0.4.36.dev20241201`, `2.7.1+cu126`, `3.3.1+gitabc123`. The local part (after `+`) is kept for
display and ignored in comparisons, so `2.7.1+cu126` satisfies `==2.7.1`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
from collections.abc import Callable, Iterable, Mapping

_VERSION = re.compile(
    r"""^v?
    (?P<release>\d+(?:\.\d+)*)
    (?:[-_.]?(?P<pre>a|b|rc|alpha|beta|c)[-_.]?(?P<pre_n>\d*))?
    (?:[-_.]?(?:post|rev|r)[-_.]?(?P<post>\d*))?
    (?:[-_.]?dev[-_.]?(?P<dev>\d*))?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?
    $""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE_ORDER = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2}
_SPEC = re.compile(r"^\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<version>[^<>=!\s]+)\s*$")


@functools.total_ordering
@dataclasses.dataclass(frozen=True, eq=False)
class Version:
    """A parsed version; compares like PEP 440 (dev < pre-release < release < post-release)."""

    text: str
    release: tuple[int, ...]
    pre: tuple[int, int] | None = None  # (0 a | 1 b | 2 rc, number)
    post: int | None = None
    dev: int | None = None

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse `text`; ValueError names it when it is not a version string."""
        if not isinstance(text, str):
            raise TypeError(f"version must be a str like '0.5.3'; got {type(text).__name__} {text!r}")
        match = _VERSION.match(text.strip())
        if match is None:
            raise ValueError(f"version must look like '0.5.3', '3.2.0rc1' or '2.7.1+cu126'; got {text!r}")
        pre = None
        if match["pre"]:
            pre = (_PRE_ORDER[match["pre"].lower()], int(match["pre_n"] or 0))
        post = int(match["post"] or 0) if match["post"] is not None else None
        dev = int(match["dev"] or 0) if match["dev"] is not None else None
        release = tuple(int(part) for part in match["release"].split("."))
        return cls(text.strip(), release, pre, post, dev)

    @property
    def major_minor(self) -> tuple[int, int]:
        padded = (*self.release, 0)
        return padded[0], padded[1]

    def _key(self) -> tuple:
        release = self.release
        while len(release) > 1 and release[-1] == 0:  # 0.5 == 0.5.0
            release = release[:-1]
        # A dev release of a final version sorts before its pre-releases; a final version after them.
        if self.pre is not None:
            pre: tuple[int, ...] = self.pre
        elif self.dev is not None and self.post is None:
            pre = (-1,)
        else:
            pre = (3,)
        post = -1 if self.post is None else self.post
        dev = float("inf") if self.dev is None else self.dev
        return (release, pre, post, dev)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text


def _coerce(value: Version | str) -> Version:
    return value if isinstance(value, Version) else Version.parse(value)


Lookup = Callable[[str], str]


def _metadata_version(distribution: str) -> str:
    return importlib.metadata.version(distribution)


def installed(distribution: str, lookup: Lookup | None = None) -> Version | None:
    """The installed version of `distribution` (its PyPI name, e.g. 'jax-triton'), or None.

    `lookup` maps a name to a version string and raises PackageNotFoundError for a missing one
    (default: importlib.metadata.version); tests pass fake ones.
    """
    try:
        text = (lookup or _metadata_version)(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Version.parse(text)


def satisfies(version: Version | str, spec: str) -> bool:
    """Whether `version` meets every clause of `spec`, e.g. '>=0.5.3,<0.6' (no wildcards)."""
    version = _coerce(version)
    clauses = [clause for clause in spec.split(",") if clause.strip()]
    if not clauses:
        raise ValueError(f"spec must hold clauses like '>=0.5.3,<0.6'; got {spec!r}")
    for clause in clauses:
        match = _SPEC.match(clause)
        if match is None:
            raise ValueError(f"spec clauses must be an operator (>=, <=, ==, !=, >, <) and a version; got {clause!r}")
        try:
            bound = Version.parse(match["version"])
        except ValueError:
            raise ValueError(f"spec clause {clause.strip()!r} does not end in a version like '0.5.3'") from None
        ok = {
            ">=": version >= bound,
            "<=": version <= bound,
            ">": version > bound,
            "<": version < bound,
            "==": version == bound,
            "!=": version != bound,
        }[match["op"]]
        if not ok:
            return False
    return True


def at_least(distribution: str, minimum: Version | str, lookup: Lookup | None = None) -> bool:
    """Whether `distribution` is installed at `minimum` or newer (False when it is missing)."""
    version = installed(distribution, lookup)
    return version is not None and version >= _coerce(minimum)


#: The releases CI tests flashpatch on: openpi's pins at the old end, the newest on PyPI at the other
#: (docs/supported-versions.md). A release outside these ranges is untested, not known broken:
#: `outside_tested` names it, so that CI fails in one place (tests/test_versions.py) the first time it
#: resolves one, and `doctor` can say so.
TESTED = {
    "jax": ">=0.5.3,<0.13",
    "jaxlib": ">=0.5.3,<0.13",
    "flax": ">=0.10.2,<0.13",
}


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
