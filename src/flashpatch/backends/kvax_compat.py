"""Make kvax 0.1.0 (Feb 2025) import and run on today's JAX and Triton, without editing kvax.

What breaks, and the fix applied here (each one checked by feature, not by version number, so a
kvax or JAX release that fixes it upstream simply skips it):

1. `jax.experimental.shard_map.Specs` is gone (JAX >= 0.8; the module itself is deprecated):
   while kvax is being imported, a stand-in module provides `Specs` and a `shard_map` that
   forwards to `jax.shard_map` (`check_rep` -> `check_vma`). JAX's own module is put back after.
2. Triton >= 3.6 refuses non-constexpr module globals in jitted kernels, and kvax's
   `LOG2_CONST: tl.constexpr = 1.44...` is only annotated, not wrapped: the globals of kvax's
   kernel module that are annotated constexpr are rewrapped as `tl.constexpr` values.
3. `jax.make_mesh` makes Explicit axes on new JAX, which kvax's shard_map rejects:
   `auto_axes_mesh` rebuilds a mesh with the same devices and axis names and Auto axes.

Applied once, on first use, on GPU only (jax-triton refuses to import without a GPU JAX).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import jax

from flashpatch import versions

_SHARD_MAP_MODULE = "jax.experimental.shard_map"
_KERNEL_MODULE = "kvax.ops.flash_attention_triton"
_CONSTEXPR_GLOBALS = ("LOG2_CONST", "NEG_INF")


@dataclasses.dataclass(frozen=True)
class Kvax:
    """The pieces of kvax flashpatch uses, after the compat fixes."""

    flash_attention: Callable[..., Any]
    create_attention_mask: Callable[..., Any]
    attention_specs: Callable[..., Any]
    params: type
    version: str
    fixes: tuple[str, ...]


_lock = threading.Lock()
_loaded: Kvax | None = None
_error: str | None = None


def load() -> Kvax:
    """Import kvax with the fixes applied (once). Raises ImportError with the reason if it cannot."""
    global _loaded, _error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _error is not None:
            raise ImportError(_error)
        try:
            _loaded = _import_fixed()
        except Exception as err:  # any failure to import kvax means: kvax cannot run here
            _error = f"kvax cannot be imported: {type(err).__name__}: {err}"
            raise ImportError(_error) from err
        return _loaded


#: Stacks on which kvax 0.1.0 is known not to work, with the evidence: (jax spec, jax-triton spec,
#: triton spec, why). Ran on the H100: jax 0.11.2 + jax-triton 0.3.1 + triton 3.6.0. The other rows
#: come from compiling kvax's kernels to PTX on CPU (tools/kvax_lowering_probe.py, 2026-11-25,
#: docs/supported-versions.md).
KNOWN_BAD = (
    ("<0.6", "!=0.2.0", "", "on JAX < 0.6 only jax-triton 0.2.0 installs (0.3 wants JAX >= 0.6)"),
    ("<0.6", "==0.2.0", ">=3.2", "jax-triton 0.2.0 breaks with triton >= 3.2; it needs triton 3.1"),
    (">=0.6,<0.12", "", ">=3.8", "kvax 0.1.0's kernels do not compile with triton >= 3.8"),
    (">=0.12", "", "", "jax-triton fails inside its own lowering on JAX 0.12"),
)


def stack_problem(lookup=None) -> str | None:
    """Why the installed jax / jax-triton / triton cannot run kvax, from their versions alone; or None."""
    found = versions.stack(("jax", "jax-triton", "triton"), lookup)
    missing = [name for name, version in found.items() if version is None]
    if missing:
        return f"kvax needs {' and '.join(missing)} installed"
    for jax_spec, jt_spec, triton_spec, why in KNOWN_BAD:
        specs = zip(("jax", "jax-triton", "triton"), (jax_spec, jt_spec, triton_spec), strict=True)
        if all(not spec or versions.satisfies(found[name], spec) for name, spec in specs):
            stack = ", ".join(f"{name} {version}" for name, version in found.items())
            return f"no working kvax stack here ({stack}): {why}"
    return None


def load_error() -> str | None:
    """Why kvax cannot be used here, or None (imports kvax if not done yet)."""
    problem = stack_problem()
    if problem is not None:
        return problem
    try:
        load()
    except ImportError as err:
        return str(err)
    return None


def _import_fixed() -> Kvax:
    fixes = []
    shim = shard_map_stand_in(jax)
    with _module_replaced(_SHARD_MAP_MODULE, shim):
        if shim is not None:
            fixes.append("shard_map stand-in during import")
        kvax = importlib.import_module("kvax")
        ops = importlib.import_module("kvax.ops")
        kernels = importlib.import_module(_KERNEL_MODULE)
    import triton.language as tl

    wrapped = wrap_constexpr_globals(kernels, tl.constexpr, _CONSTEXPR_GLOBALS)
    if wrapped:
        fixes.append(f"constexpr globals: {', '.join(wrapped)}")
    return Kvax(
        flash_attention=ops.flash_attention,
        create_attention_mask=ops.create_attention_mask,
        attention_specs=kvax.utils.attention_specs,
        params=kvax.utils.FlashAttentionParamsConfig,
        version=getattr(kvax, "__version__", "unknown"),
        fixes=tuple(fixes),
    )


def shard_map_stand_in(jax_module: Any) -> types.ModuleType | None:
    """A module with kvax's expected `Specs` and `shard_map(f, mesh, in_specs, out_specs, check_rep)`.

    None when JAX's own `jax.experimental.shard_map` still has both.
    """
    try:
        current = importlib.import_module(_SHARD_MAP_MODULE)
    except ImportError:
        current = None
    if current is not None and hasattr(current, "Specs"):
        return None
    if not hasattr(jax_module, "shard_map"):
        raise ImportError("this JAX has neither jax.experimental.shard_map.Specs nor jax.shard_map")

    def shard_map(f, mesh, in_specs, out_specs, check_rep: bool = True, **kwargs):
        return jax_module.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_rep, **kwargs)

    stand_in = types.ModuleType(_SHARD_MAP_MODULE, "flashpatch's stand-in for kvax's import of shard_map")
    stand_in.Specs = typing.Any
    stand_in.shard_map = shard_map
    return stand_in


@contextlib.contextmanager
def _module_replaced(name: str, module: types.ModuleType | None) -> Iterator[None]:
    """Let `import name` see `module` for the duration of the block (None: change nothing)."""
    if module is None:
        yield
        return
    parent_name, _, child = name.rpartition(".")
    parent = importlib.import_module(parent_name)
    missing = object()
    saved_module = sys.modules.get(name, missing)
    saved_attr = parent.__dict__.get(child, missing)
    sys.modules[name] = module
    setattr(parent, child, module)
    try:
        yield
    finally:
        if saved_module is missing:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved_module
        if saved_attr is missing:
            parent.__dict__.pop(child, None)
        else:
            setattr(parent, child, saved_attr)


def wrap_constexpr_globals(module: types.ModuleType, constexpr: type, names: tuple[str, ...]) -> list[str]:
    """Rewrap plain values annotated `tl.constexpr` as real constexpr objects; return those changed."""
    changed = []
    for name in names:
        value = getattr(module, name, None)
        if value is None or isinstance(value, constexpr):
            continue
        setattr(module, name, constexpr(value))
        changed.append(name)
    return changed


def auto_axes_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """The same devices and axis names with Auto axes (kvax's shard_map rejects Explicit ones)."""
    axis_types = getattr(mesh, "axis_types", None)
    auto = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
    if axis_types is None or auto is None or all(t == auto for t in axis_types):
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names)
