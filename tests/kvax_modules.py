"""kvax's own spec and shard_map modules, loaded on CPU for tests.

`import kvax` imports its Triton kernels, which refuse to load without a GPU; its sharding code is
plain Python and JAX. This loads `kvax.utils.specs` and `kvax.utils.sharding` by file, under stand-in
parent packages, and takes those names out of `sys.modules` again, so a later real `import kvax`
(on a GPU) is unaffected. Fresh copies each call: fixes applied to them stay local.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import jax

from flashpatch.backends.kvax import compat as kvax_compat


def load() -> tuple[types.ModuleType, types.ModuleType] | None:
    """(kvax.utils.specs, kvax.utils.sharding), or None where kvax is not installed."""
    found = importlib.util.find_spec("kvax")
    if found is None or not found.submodule_search_locations:
        return None
    root = Path(next(iter(found.submodule_search_locations)))
    before = set(sys.modules)
    for name, path in (("kvax", root), ("kvax.utils", root / "utils")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    try:
        with kvax_compat._module_replaced("jax.experimental.shard_map", kvax_compat.shard_map_stand_in(jax)):
            specs = importlib.import_module("kvax.utils.specs")
            sharding = importlib.import_module("kvax.utils.sharding")
    finally:
        for name in set(sys.modules) - before:
            if name == "kvax" or name.startswith("kvax."):
                del sys.modules[name]
    return specs, sharding
