"""Where the benchmark's openpi mode gets its models: openpi itself, or the openpi-compatible fixtures.

openpi is not on PyPI. `load(src)` imports it from an installed openpi or from `src` (a checkout's
`src/` folder). `openpi.models.model` imports openpi's PyTorch port (`openpi.models_pytorch`) at module
level, although its JAX models never use it; where that import fails (a transformers release openpi's
port does not work with, no torch), this loader, and only this loader, puts an empty stand-in module in
its place and says so in the run's notes. Where openpi cannot be imported at all, `load(None)` gives
`flashpatch.testing.models`: the same model API on flashpatch's openpi-compatible Gemma, small enough
for a CPU (CI runs the benchmark's openpi mode on it).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

PYTORCH_PORT = "openpi.models_pytorch"


@dataclasses.dataclass
class Models:
    """Model configs by name, as the benchmark builds them."""

    source: str  # "openpi" or "fixtures"
    description: str
    pi0: Callable[..., Any]  # (pi05=..., max_token_len=..., dtype=...) -> a Pi0Config
    pi0_fast: Callable[..., Any]  # (max_token_len=..., dtype=...) -> a Pi0FASTConfig
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def real(self) -> bool:
        return self.source == "openpi"


class OpenpiNotFound(ImportError):
    """openpi could not be imported from where the user pointed."""


def load(src: Path | None, *, size: str = "full", require_openpi: bool = False) -> Models:
    """openpi's models if importable (from `src` first), else the fixtures (or OpenpiNotFound if required).

    size "full": openpi's defaults (Gemma 2B + 300M expert); "dummy": openpi's "dummy" Gemma variants
    (SigLIP stays full size), for a quick look at the code path.
    """
    if src is not None:
        if not (src / "openpi" / "models" / "pi0.py").is_file():
            raise OpenpiNotFound(f"--openpi-src must be openpi's src/ folder (with openpi/models/pi0.py); got {src}")
        sys.path.insert(0, str(src))
    try:
        return _openpi(size)
    except ImportError as err:
        if src is not None or require_openpi:
            raise OpenpiNotFound(f"openpi is not importable: {type(err).__name__}: {err}") from err
        return _fixtures(f"openpi is not importable here ({err}); these are flashpatch's openpi-compatible fixtures")


def _openpi(size: str) -> Models:
    notes: list[str] = []
    gemma = {} if size == "full" else {"paligemma_variant": "dummy", "action_expert_variant": "dummy"}
    try:
        importlib.import_module("openpi.models.model")
    except ImportError as err:
        if PYTORCH_PORT not in repr(err) and "torch" not in repr(err) and "transformers" not in repr(err):
            raise
        _drop_partial_imports()
        _stub_pytorch_port()
        notes.append(
            f"openpi's PyTorch port did not import ({type(err).__name__}: {err}); the benchmark put an empty "
            f"{PYTORCH_PORT} in its place (openpi's JAX models do not use it)"
        )
        importlib.import_module("openpi.models.model")
    pi0_config = importlib.import_module("openpi.models.pi0_config")
    pi0_fast = importlib.import_module("openpi.models.pi0_fast")
    location = Path(pi0_config.__file__).resolve().parents[2]
    return Models(
        source="openpi",
        description=f"openpi from {location}{_commit(location)}, {size} size",
        pi0=lambda **kw: pi0_config.Pi0Config(**gemma, **kw),
        pi0_fast=lambda **kw: pi0_fast.Pi0FASTConfig(
            **({} if size == "full" else {"paligemma_variant": "dummy"}), **kw
        ),
        notes=notes,
    )


def _fixtures(why: str) -> Models:
    from flashpatch.testing import models, register

    register()  # patch the fixtures' Gemma as openpi's

    def pi0(**kw):
        return models.Pi0Config(paligemma_variant="dummy", action_expert_variant="dummy", **kw)

    def pi0_fast(**kw):
        return models.Pi0FASTConfig(paligemma_variant="dummy", **kw)

    return Models(source="fixtures", description=why, pi0=pi0, pi0_fast=pi0_fast)


def _drop_partial_imports() -> None:
    for name in [m for m in sys.modules if m == "openpi.models.model" or m.startswith(PYTORCH_PORT)]:
        del sys.modules[name]


def _stub_pytorch_port() -> None:
    """Empty `openpi.models_pytorch` modules: what openpi.models.model imports of them, and nothing else."""
    package = types.ModuleType(PYTORCH_PORT)
    package.__path__ = []
    port = types.ModuleType(f"{PYTORCH_PORT}.pi0_pytorch")
    package.pi0_pytorch = port
    sys.modules[PYTORCH_PORT] = package
    sys.modules[f"{PYTORCH_PORT}.pi0_pytorch"] = port


def _commit(location: Path) -> str:
    """openpi's git commit, where `location` is the top of an openpi checkout."""
    import subprocess

    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
            cwd=location,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = top.stdout.split()
    if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != location.resolve():
        return ""  # not a checkout of openpi itself (a copy of its src/ inside another repository, say)
    return f" (git {lines[1]})"
