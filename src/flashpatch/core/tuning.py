"""The user's own measurements (`python -m flashpatch tune`): where the table lives, what it holds, which entry
a call matches, and the ranking `auto` takes from it.

`auto`'s rules were measured on one GPU; a table measured on the user's GPU says what is fastest there. One
table holds one device under one set of versions: the GPU's kind, compute capability and cuDNN (or the
platform and device kind off the GPU), and the versions of flashpatch and of every library that decides how a
kernel lowers and runs (`VERSIONED`). It is read only where all of these are what runs now; a table measured
on another GPU, or under other versions, is ignored with one note saying what differs (a new jax, a new
flashpatch or a new kernel library can change every figure).

Where: `$XDG_CACHE_HOME/flashpatch/tune/` (else `~/.cache/flashpatch/tune/`), one file per device and versions
(named by the device, the jax version and a hash of the rest), so that several environments that share a home
folder keep their own tables. `FLASHPATCH_TUNE_TABLE=PATH` reads (and `tune` writes) that one file instead;
`FLASHPATCH_TUNE_TABLE=off` ignores every table (auto's rules alone decide).

Matching: a call uses an entry only where everything that shapes the call is equal: the batch one device
sees (under a mesh, the batch split over its data axes, as the compile guard counts it), T, S, query and
key/value heads, head dim, the four dtypes and `causal_runs`. There is no nearest rule: which path is fastest
changes with the size of the call (auto's rules cross over at 2**25 pairs on the H200), so a ranking is not
carried to a shape nobody measured; there the rules decide, as without a table.

Ranking: the backends measured faster than openpi's einsum (`reference`) in every mode the entry timed
(forward, and forward with backward for training calls), by their median, ordered by the time that matters
for the call (forward with backward where it was timed, else forward), then `reference`. A backend that failed,
could not run, or was slower in any mode is not in it. `auto` takes the first that can run the call here
(declarations, then the compile guard), so it never takes one measured slower than the einsum.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flashpatch import backends, diagnostics, versions
from flashpatch.backends import machine
from flashpatch.backends.base import Problem

#: The format; a table of another schema is ignored with a note (rerun tune).
SCHEMA = "flashpatch-tune/1"
ENV = "FLASHPATCH_TUNE_TABLE"
_OFF = ("0", "off", "false", "no", "none")
#: flashpatch and the distributions whose versions decide how a kernel lowers and runs.
VERSIONED = ("flashpatch", *versions.KERNEL_STACK)
FORWARD = "forward"
FORWARD_BACKWARD = "forward_backward"
MODES = (FORWARD, FORWARD_BACKWARD)
MODE_TEXT = {FORWARD: "forward", FORWARD_BACKWARD: "forward+backward"}
#: What must be equal for a call to use an entry (Problem's fields but the platform, which the table's device fixes).
KEY_FIELDS = (
    "batch",
    "q_len",
    "kv_len",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "q_dtype",
    "k_dtype",
    "v_dtype",
    "probs_dtype",
    "causal_runs",
)
RERUN = "rerun `python -m flashpatch tune`"
OK = "ok"
FAILED = "failed"
CANNOT = "cannot run"


class TableError(ValueError):
    """A table file that cannot be used, in one sentence."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """The device and versions a table was measured on."""

    platform: str
    kind: str
    capability: str | None
    cudnn: str | None
    versions: tuple[tuple[str, str | None], ...]

    def as_json(self) -> dict[str, Any]:
        device = {"platform": self.platform, "kind": self.kind, "capability": self.capability, "cudnn": self.cudnn}
        return {"device": device, "versions": dict(self.versions)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Identity:
        device, found = data["device"], data["versions"]
        return cls(
            str(device["platform"]),
            str(device["kind"]),
            device.get("capability"),
            device.get("cudnn"),
            tuple((str(name), None if v is None else str(v)) for name, v in found.items()),
        )

    @property
    def device_text(self) -> str:
        if self.capability is None:
            return self.kind if self.kind == self.platform else f"{self.kind} ({self.platform})"
        cudnn = "no cuDNN" if self.cudnn is None else f"cuDNN {self.cudnn}"
        return f"{self.kind} (compute capability {self.capability}, {cudnn})"

    @property
    def versions_text(self) -> str:
        return ", ".join(f"{name} {v}" for name, v in self.versions if v is not None)

    def differences(self, now: Identity) -> list[str]:
        """What differs between this table's identity and `now`, in words ('jax 0.5.3 in the table, 0.6.0 here')."""
        found = []
        for field in ("platform", "kind", "capability", "cudnn"):
            mine, theirs = getattr(self, field), getattr(now, field)
            if mine != theirs:
                found.append(f"{field} {mine or 'none'} in the table, {theirs or 'none'} here")
        mine_v, now_v = dict(self.versions), dict(now.versions)
        for name in dict.fromkeys([*mine_v, *now_v]):
            there, here = mine_v.get(name) or "not installed", now_v.get(name) or "not installed"
            if there != here:
                found.append(f"{name} {there} in the table, {here} here")
        return found

    @property
    def file_name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.kind.lower()).strip("-") or self.platform
        digest = hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:10]
        jax_version = dict(self.versions).get("jax") or "nojax"
        return f"{slug}-jax{jax_version}-{digest}.json"

    @property
    def device_prefix(self) -> str:
        """The start of every file name of this device's tables (whatever the versions)."""
        return self.file_name.rsplit("-jax", 1)[0] + "-jax"


def current() -> Identity:
    """This process's device and versions (the simulated ones inside `machine.simulated`)."""
    gpu = machine.gpu()
    found = versions.stack(VERSIONED)
    stack = tuple((name, None if v is None else str(v)) for name, v in found.items())
    if gpu is not None:
        cudnn = machine.cudnn_version()
        capability = f"{gpu.capability[0]}.{gpu.capability[1]}"
        return Identity("gpu", gpu.kind, capability, None if cudnn is None else machine.cudnn_text(cudnn), stack)
    import jax

    device = jax.devices()[0]
    return Identity(device.platform, str(device.device_kind), None, None, stack)


def cache_dir() -> Path:
    """Where tune writes its tables: $XDG_CACHE_HOME/flashpatch/tune, else ~/.cache/flashpatch/tune."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base) if base else Path.home() / ".cache"
    return root / "flashpatch" / "tune"


def setting() -> str | None:
    """What FLASHPATCH_TUNE_TABLE asks: None (the cache), 'off', or a path."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    return "off" if value.lower() in _OFF else value


def path_for(identity: Identity) -> Path:
    """The file the table of `identity` lives in (FLASHPATCH_TUNE_TABLE's path where it names one)."""
    named = setting()
    if named not in (None, "off"):
        return Path(named).expanduser()
    return cache_dir() / identity.file_name


def key_of(problem: Problem | Mapping[str, Any]) -> tuple:
    if isinstance(problem, Mapping):
        return tuple(problem[field] for field in KEY_FIELDS)
    return tuple(getattr(problem, field) for field in KEY_FIELDS)


def call_text(call: Mapping[str, Any]) -> str:
    dtypes = {call["q_dtype"], call["k_dtype"], call["v_dtype"], call["probs_dtype"]}
    causal = ", causal runs" if call["causal_runs"] else ""
    return (
        f"B={call['batch']} T={call['q_len']} S={call['kv_len']} heads={call['num_heads']}/{call['num_kv_heads']} "
        f"head_dim={call['head_dim']} {'/'.join(sorted(dtypes))}{causal}"
    )


@dataclasses.dataclass(frozen=True)
class Entry:
    """One measured call: every backend's timings (median, p10, p90, repeats) or why it has none."""

    call: dict[str, Any]  # KEY_FIELDS
    label: str
    modes: tuple[str, ...]
    results: dict[str, dict[str, Any]]  # backend -> {"status": ok|failed|cannot run, "reason"?, mode: timing}

    @property
    def key(self) -> tuple:
        return key_of(self.call)

    @property
    def primary(self) -> str:
        """The mode the ranking orders by: forward with backward where timed (training), else forward."""
        return FORWARD_BACKWARD if FORWARD_BACKWARD in self.modes else FORWARD

    def median(self, backend: str, mode: str) -> float | None:
        result = self.results.get(backend) or {}
        if result.get("status") != OK or mode not in result:
            return None
        return float(result[mode]["median_ms"])

    def ranking(self) -> tuple[str, ...]:
        """The backends measured faster than the einsum in every mode, fastest first, then `reference`; () where
        the einsum itself has no time (nothing to compare with: the rules decide)."""
        base = {mode: self.median(backends.REFERENCE, mode) for mode in self.modes}
        if any(v is None for v in base.values()):
            return ()
        faster = []
        for name in self.results:
            if name == backends.REFERENCE:
                continue
            times = {mode: self.median(name, mode) for mode in self.modes}
            if all(t is not None and t < base[mode] for mode, t in times.items()):
                faster.append((times[self.primary], name))
        return (*(name for _, name in sorted(faster)), backends.REFERENCE)

    def as_json(self) -> dict[str, Any]:
        return {"call": self.call, "label": self.label, "modes": list(self.modes), "results": self.results}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entry:
        call = {field: data["call"][field] for field in KEY_FIELDS}
        modes = tuple(data["modes"])
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise KeyError(f"modes {unknown or modes}")
        return cls(call, str(data.get("label", "")), modes, {str(k): dict(v) for k, v in data["results"].items()})


@dataclasses.dataclass(frozen=True)
class Table:
    identity: Identity
    entries: tuple[Entry, ...]
    written: str = ""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def entry_for(self, problem: Problem) -> Entry | None:
        if problem.platform != self.identity.platform:
            return None
        key = key_of(per_device(problem))
        for entry in self.entries:
            if entry.key == key:
                return entry
        return None

    def merged(self, newer: Table) -> Table:
        """This table's entries with `newer`'s (same identity), `newer` winning where both measured a call."""
        keys = {e.key for e in newer.entries}
        kept = tuple(e for e in self.entries if e.key not in keys)
        return dataclasses.replace(newer, entries=kept + newer.entries)

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "written": self.written,
            **self.identity.as_json(),
            "settings": self.settings,
            "entries": [e.as_json() for e in self.entries],
        }

    @classmethod
    def from_json(cls, data: Any) -> Table:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise TableError(f"it is not a {SCHEMA} table (schema {found!r}); {RERUN}")
        try:
            identity = Identity.from_json(data)
            entries = tuple(Entry.from_json(e) for e in data["entries"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise TableError(f"it is malformed ({type(err).__name__}: {err}); {RERUN}") from None
        return cls(identity, entries, str(data.get("written", "")), dict(data.get("settings") or {}))


def now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


_cache: dict[Path, tuple[tuple[int, int, int], Table | TableError]] = {}
_lock = threading.Lock()


def read(path: Path) -> Table:
    """The table in `path` (re-read when the file changes); TableError in one sentence where it cannot be used,
    FileNotFoundError where there is none."""
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    with _lock:
        cached = _cache.get(path)
    if cached is None or cached[0] != stamp:
        try:
            loaded: Table | TableError = Table.from_json(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            loaded = TableError(f"it cannot be read ({type(err).__name__}: {err}); {RERUN}")
        except TableError as err:
            loaded = err
        with _lock:
            _cache[path] = (stamp, loaded)
    else:
        loaded = cached[1]
    if isinstance(loaded, TableError):
        raise loaded
    return loaded


def write(table: Table, path: Path) -> None:
    """Write `table` to `path` at once (a reader sees the old file or the new one, never half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(table.as_json(), indent=1, sort_keys=False) + "\n")
    os.replace(partial, path)


def per_device(problem: Problem) -> Problem:
    """`problem` as one device sees it under the mesh in force (`meshes.per_device`)."""
    from flashpatch.backends import meshes

    return meshes.per_device(problem)


@dataclasses.dataclass(frozen=True)
class Found:
    """Which table applies here, or why none does (for doctor, and for auto's note)."""

    table: Table | None
    path: Path | None
    why_not: str | None  # None where `table` applies
    others: tuple[str, ...] = ()  # other tables of this device, ignored, with what differs


def find() -> Found:
    """The table for this device and versions, or why there is none."""
    named = setting()
    if named == "off":
        return Found(None, None, f"{ENV}=off: tables are ignored, auto's rules decide")
    if named is not None:
        return _check(Path(named).expanduser(), current(), named=True)
    directory = cache_dir()
    try:
        files = sorted(p for p in directory.iterdir() if p.suffix == ".json")
    except OSError:
        return Found(None, None, f"no table: {directory} does not exist (python -m flashpatch tune writes one)")
    if not files:
        return Found(None, None, f"no table in {directory} (python -m flashpatch tune writes one)")
    now = current()
    path = directory / now.file_name
    mine = [p for p in files if p.name.startswith(now.device_prefix) and p != path]
    others = []
    for other in mine:
        try:
            differs = read(other).identity.differences(now)
            others.append(f"{other}: {'; '.join(differs) or 'the same identity under another name'}")
        except (OSError, TableError) as err:
            others.append(f"{other}: {err}")
    if not path.exists():
        lines = f"; tables for it under other versions are ignored: {' | '.join(others)}" if others else ""
        elsewhere = len(files) - len(mine)
        rest = f"; {elsewhere} table(s) there are for other devices" if elsewhere else ""
        why = f"no table for {now.device_text} under these versions in {directory}{lines}{rest}"
        return Found(None, path, why, tuple(others))
    found = _check(path, now, named=False)
    return dataclasses.replace(found, others=tuple(others))


def _check(path: Path, now: Identity, *, named: bool) -> Found:
    try:
        table = read(path)
    except FileNotFoundError:
        return Found(None, path, f"{ENV} names {path}, which does not exist" if named else f"no table at {path}")
    except (OSError, TableError) as err:
        return Found(None, path, f"the table at {path} is ignored: {err}")
    differs = table.identity.differences(now)
    if differs:
        return Found(
            None,
            path,
            f"the table at {path} is ignored: it was measured elsewhere ({'; '.join(differs)}); rerun "
            "`python -m flashpatch tune` here",
        )
    return Found(table, path, None)


@dataclasses.dataclass(frozen=True)
class Tuned:
    """What auto takes from the table for one call: the ranking, and the words for its reason."""

    entry: Entry
    path: Path
    device: str

    @property
    def ranking(self) -> tuple[str, ...]:
        return self.entry.ranking()

    def reason(self, name: str) -> str:
        mode = self.entry.primary
        base = self.entry.median(backends.REFERENCE, mode)
        where = f"your own measurement at this shape on {self.device} (`python -m flashpatch tune`, {self.path})"
        if name == backends.REFERENCE:
            return f"{where}: no backend measured faster than openpi's own attention runs here"
        return (
            f"{where}: {name} took {self.entry.median(name, mode):.3g} ms {MODE_TEXT[mode]} against openpi's own "
            f"attention's {base:.3g} ms (medians), and was faster in every mode timed"
        )


def lookup(problem: Problem) -> Tuned | None:
    """The user's measurement for `problem` where a table for this device and versions has an entry for it; else
    None (auto's rules decide). A table ignored for other versions or another device says so once per process."""
    named = setting()
    if named == "off":
        return None
    if named is None:
        directory = cache_dir()
        try:  # the quick way out where tune never ran: no version is read
            if not any(p.suffix == ".json" for p in directory.iterdir()):
                return None
        except OSError:
            return None
    found = find()
    if found.table is None:
        if found.others or (found.path is not None and (named is not None or found.path.exists())):
            diagnostics.warn_once(("tune-table", str(found.path)), f"{found.why_not}; auto's rules decide")
        return None
    for text in found.others:
        diagnostics.info_once(("tune-table-other", text), f"ignored a table measured elsewhere: {text}")
    entry = found.table.entry_for(problem)
    if entry is None or not entry.ranking():
        return None
    return Tuned(entry, found.path, found.table.identity.kind)  # type: ignore[arg-type]


def report() -> list[str]:
    """doctor's section: which table applies (path, device, versions, entries) or why none does."""
    found = find()
    lines = ["tuning table (python -m flashpatch tune):"]
    if found.table is None:
        lines.append(f"  none applies: {found.why_not}")
        return lines
    table = found.table
    lines += [
        f"  applies: {found.path}",
        f"  measured on {table.identity.device_text}, {table.written or 'at an unknown time'}",
        f"  versions: {table.identity.versions_text}",
        f"  entries ({len(table.entries)}), what auto takes in order:",
    ]
    for entry in table.entries:
        ranking = entry.ranking()
        order = " > ".join(ranking) if ranking else "openpi's einsum has no time here, auto's rules decide"
        lines.append(f"    {entry.label or 'call'} ({call_text(entry.call)}): {order}")
    lines += [f"  ignored (measured elsewhere): {text}" for text in found.others]
    return lines
