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
4. kvax's shard_map turns a spec tuple into a PartitionSpec only when its first entry is one axis
   name or None, so a batch split over several axes (openpi's ("batch", "fsdp")) reaches JAX as a
   nested tuple and is refused: kvax's modules get a shard_map that reads such entries
   (`fix_multi_axis_specs`).

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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax

from flashpatch import versions

_SHARD_MAP_MODULE = "jax.experimental.shard_map"
_KERNEL_MODULE = "kvax.ops.flash_attention_triton"
_CONSTEXPR_GLOBALS = ("LOG2_CONST", "NEG_INF")
_SHARDING_MODULE = "kvax.utils.sharding"


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
#: come from compiling kvax's kernels to PTX on CPU (benchmarks/lab/kvax_lowering_probe.py, 2026-11-25;
#: benchmarks/history/supported-versions.md).
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
    kvax_modules = [m for n, m in list(sys.modules.items()) if n.startswith("kvax.") and m is not None]
    if fix_multi_axis_specs(sys.modules[_SHARDING_MODULE], kvax_modules):
        fixes.append("shard_map reads multi-axis spec entries")
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


def fix_multi_axis_specs(sharding: types.ModuleType, modules: Iterable[types.ModuleType]) -> bool:
    """Give `modules` that use kvax's shard_map one that reads multi-axis entries (False: not needed).

    `sharding` is kvax's `kvax.utils.sharding`; the replacement keeps its signature and calls the
    same JAX shard_map with the same mesh, only the specs are converted correctly.
    """
    kvax_shard_map = getattr(sharding, "shard_map", None)
    if kvax_shard_map is None or reads_multi_axis_specs(sharding):
        return False
    find_mesh = getattr(sharding, "_check_mesh_or_get_global", lambda mesh: mesh)

    def shard_map(f, in_specs, out_specs, mesh=None):
        return sharding.jax_shard_map(
            f,
            mesh=find_mesh(mesh),
            in_specs=partition_specs(in_specs),
            out_specs=partition_specs(out_specs),
            check_rep=False,
        )

    for module in (sharding, *modules):
        if getattr(module, "shard_map", None) is kvax_shard_map:
            module.shard_map = shard_map
    return True


def reads_multi_axis_specs(sharding: types.ModuleType) -> bool:
    """Whether kvax's shard_map passes ((a, b), None) on as PartitionSpec((a, b), None).

    Probed with JAX's shard_map swapped for a recorder; a kvax without that hook counts as fine
    (nothing to fix that this fix knows how to).
    """
    if not hasattr(sharding, "jax_shard_map"):
        return True
    seen = {}
    real = sharding.jax_shard_map
    sharding.jax_shard_map = lambda f, **kwargs: seen.update(kwargs)
    try:
        sharding.shard_map(len, in_specs=((("a", "b"), None),), out_specs=(("a", "b"), None), mesh="mesh")
    finally:
        sharding.jax_shard_map = real
    wanted = jax.sharding.PartitionSpec(("a", "b"), None)
    got = [*seen.get("in_specs", [None]), seen.get("out_specs")]
    # isinstance first: PartitionSpec is a tuple on older JAX, equal to the wrong nested tuple
    return all(isinstance(spec, jax.sharding.PartitionSpec) and spec == wanted for spec in got)


def partition_specs(specs: Any) -> Any:
    """kvax's spec tuples, possibly nested in tuples and lists, as PartitionSpecs (None stays None)."""
    return jax.tree.map(lambda spec: jax.sharding.PartitionSpec(*spec), specs, is_leaf=_is_spec)


def _is_spec(node: Any) -> bool:
    """A spec is a tuple whose entries are each None, an axis name or a tuple of axis names."""

    def entry(e: Any) -> bool:
        return (
            e is None or isinstance(e, str) or (isinstance(e, tuple) and bool(e) and all(isinstance(a, str) for a in e))
        )

    return isinstance(node, tuple) and all(entry(e) for e in node)
