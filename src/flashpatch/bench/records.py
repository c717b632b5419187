"""One measured case, and what identifies the run that produced it (device, versions, date, command)."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import jax

from flashpatch import versions as installed_versions
from flashpatch.bench.memory import device_stats

CONVENTIONS = {
    "time": "median over repeats of wall-clock time after warm-up, each call waited on with "
    "jax.block_until_ready; compile time excluded (reported separately as compile_s)",
    "flops": "useful FLOPs only: forward 4*N*H per unmasked (query, key) pair (N query heads, head dim H); "
    "backward counted as 2.5x forward, so forward+backward is 3.5x",
    "speedup": "einsum's median time / this variant's median time, same size, same inputs, same process",
    "speedup_range": "the speedup's spread: einsum's p10 / this variant's p90 to einsum's p90 / this variant's p10 "
    "(p10-p90 over repeats; with fewer than 6 repeats, the fastest and the slowest); 'within noise' where it "
    "reaches across 1.0",
    "rel_err": "||out - ref|| / ||ref|| against float32 attention at highest matmul precision (core only); "
    "for forward+backward the largest over dq, dk, dv",
    "rel_diff_vs_einsum": "models: ||out - einsum's out|| / ||einsum's out|| on the same inputs and parameters "
    "(openpi sample_actions: of what the model adds to the starting noise; the ceiling's own value says how much "
    "the output depends on attention at all)",
    "memory.peak": "compiled memory analysis: arguments + outputs + XLA temp buffer - donated (aliased) bytes "
    "of the measured executable(s) (largest over them)",
    "memory.sampled_mean/sampled_max": "device bytes_in_use polled every ~2 ms during the timed loop "
    "(GPU only; everything live in the process)",
    "ceiling": "openpi mode: the same step with the attention core replaced by O(B*S*H) work that reads every "
    "key and value of every row (flashpatch/bench/ceiling.py): what the step would cost if attention were free",
    "ceiling_share": "(einsum ms - variant ms) / (einsum ms - ceiling ms): the share of the possible gain taken",
    "gflop_per_step": "openpi mode: XLA's cost analysis of the compiled step. It counts no FLOPs for cuDNN's "
    "fused attention, and its count of the other matmuls depends on the kernels XLA's autotuner picked, so it is "
    "compared only between variants of one process (the ceiling's dead-code check)",
    "grad_rel_err_vs_f32": "openpi mode: ||grads - float32 model's grads|| / ||float32 grads|| over all parameters "
    "at step 0, same parameters and batch (the einsum's own bf16 error is the yardstick)",
}


@dataclasses.dataclass
class Record:
    scenario: str
    case: str
    variant: str
    size: int
    batch: int
    #: ok: measured. oom: out of device memory. error: anything else went wrong (reason given).
    #: unsupported: the backend declines this problem (reason given). skipped: not run (time budget,
    #: out of memory at a smaller size, or the prefill it needs did not run).
    status: str = "ok"
    reason: str | None = None
    ms: float | None = None  # the median time this case is compared on
    speedup: float | None = None
    #: (low, high) of the speedup from the p10-p90 of both sides' repeats (flashpatch.bench.spread)
    speedup_range: list[float] | None = None
    #: which of `timings` `ms` comes from (its p10-p90 is the time's spread)
    primary: str | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    timings: dict[str, dict[str, float | int]] = dataclasses.field(default_factory=dict)
    backends_ran: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def group(self) -> tuple[str, str]:
        return self.scenario, self.case

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def versions() -> dict[str, str | None]:
    """Versions of what the numbers depend on, read from package metadata (nothing imported)."""
    names = (
        "flashpatch",
        "jax",
        "jaxlib",
        "flax",
        "numpy",
        "optax",
        "kvax",
        "jax-triton",
        "triton",
        "jax-cuda12-plugin",
        "jax-cuda12-pjrt",
        "jax-cuda13-plugin",
        "jax-cuda13-pjrt",
        "nvidia-cudnn-cu12",
        "nvidia-cudnn-cu13",
    )
    found = {name: str(version) for name in names if (version := installed_versions.installed(name)) is not None}
    found["python"] = platform.python_version()
    return found


def device_info() -> dict[str, Any]:
    devices = jax.devices()
    stats = device_stats(devices[0]) or {}
    return {
        "platform": jax.default_backend(),
        "kind": devices[0].device_kind,
        "count": len(devices),
        "memory_limit_bytes": stats.get("bytes_limit"),
    }


def git_commit(package_dir: Path | None = None, direct_url: dict[str, Any] | None = None) -> str | None:
    """The flashpatch commit measured: from the package's checkout, or the one pip installed it from.

    A non-editable install copies the package out of its checkout; pip's direct_url.json still says which
    folder (or VCS commit) it came from. The arguments stand in for both, for tests.
    """
    for where in _source_dirs(package_dir, direct_url):
        try:
            done = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.stdout.strip():
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True
            )
            return done.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    commit = (direct_url if direct_url is not None else _direct_url()).get("vcs_info", {}).get("commit_id")
    return commit or None


def _source_dirs(package_dir: Path | None, direct_url: dict[str, Any] | None) -> list[Path]:
    """Where flashpatch's source may sit in a git checkout: the package itself, or the folder pip built it from."""
    dirs = [package_dir or Path(__file__).resolve().parent]
    url = direct_url if direct_url is not None else _direct_url()
    if url.get("url", "").startswith("file://"):
        dirs.append(Path(url["url"][len("file://") :]))
    return [d for d in dirs if d.is_dir()]


def _direct_url() -> dict[str, Any]:
    import json

    try:
        text = importlib.metadata.distribution("flashpatch").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return {}
    return json.loads(text) if text else {}


def run_metadata(command: str, options: dict[str, Any]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "FLASHPATCH"))}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": device_info(),
        "versions": versions(),
        "git_commit": git_commit(),
        "environment": env,
        "options": options,
        "conventions": CONVENTIONS,
    }


def openpi_models(meta: dict[str, Any]) -> str | None:
    """Which models the openpi scenario ran: "openpi" (openpi's own), "fixtures" (flashpatch's stand-ins), or
    None (no openpi scenario, or not recorded). From meta["models"], or in older results from the run's notes."""
    found = (meta.get("models") or {}).get("openpi")
    if found:
        return found
    for note in meta.get("notes") or []:
        if note.startswith("openpi mode: "):
            return "openpi" if note.startswith("openpi mode: openpi from") else "fixtures"
    return None


def models_label(meta: dict[str, Any]) -> str:
    """The models of the openpi scenario, in words, for titles and headings."""
    size = (meta.get("options") or {}).get("openpi_size", "full")
    return {
        "openpi": "openpi's own models" + ("" if size == "full" else f" ({size} size)"),
        "fixtures": "flashpatch's stand-in models for openpi's (fixtures; openpi was not importable)",
    }.get(openpi_models(meta) or "", "openpi mode (which models ran was not recorded)")
