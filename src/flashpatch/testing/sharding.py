"""openpi keeps its training mesh in a global of its own; so do these modules (same API).

`make_mesh` and `fsdp_sharding` follow openpi's `openpi.training.sharding` (same rules), for tests
and GPU scripts that train the fixture models as openpi does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from flashpatch.backends import meshes

BATCH_AXIS = "batch"
FSDP_AXIS = "fsdp"
DATA_AXIS = (BATCH_AXIS, FSDP_AXIS)


class _MeshState:
    active_mesh: jax.sharding.Mesh | None = None


@contextlib.contextmanager
def set_mesh(mesh: jax.sharding.Mesh) -> Iterator[None]:
    if _MeshState.active_mesh is not None:
        raise ValueError("set_mesh does not nest")
    _MeshState.active_mesh = mesh
    try:
        yield
    finally:
        _MeshState.active_mesh = None


def activation_sharding_constraint(tree):
    mesh = _MeshState.active_mesh
    if mesh is None:
        return tree
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
    return jax.lax.with_sharding_constraint(tree, spec)


def make_mesh(num_fsdp_devices: int) -> jax.sharding.Mesh:
    """openpi's ("batch", "fsdp") mesh of shape (devices // fsdp, fsdp), with Auto axes.

    openpi's pinned JAX (0.5.3) makes Auto axes; newer `jax.make_mesh` makes Explicit ones, under
    which `activation_sharding_constraint` is refused (with_sharding_constraint wants Auto axes).
    """
    devices = jax.device_count()
    if num_fsdp_devices < 1 or devices % num_fsdp_devices:
        raise ValueError(f"num_fsdp_devices must divide the device count {devices}; got {num_fsdp_devices}")
    axis_type = getattr(jax.sharding, "AxisType", None)
    kwargs = {"axis_types": (axis_type.Auto,) * 2} if axis_type is not None else {}
    return jax.make_mesh((devices // num_fsdp_devices, num_fsdp_devices), DATA_AXIS, **kwargs)


def fsdp_sharding(tree: Any, mesh: jax.sharding.Mesh, *, min_size_mbytes: float = 4) -> Any:
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs), by openpi's FSDP rule.

    Arrays of two or more dimensions and at least `min_size_mbytes` MiB are split over "fsdp" along
    their largest dimension that the fsdp size divides; everything else is replicated.
    """
    size = mesh.shape[FSDP_AXIS]
    min_bytes = min_size_mbytes * 2**20

    def one(leaf) -> jax.sharding.NamedSharding:
        spec: list[str | None] = [None] * len(leaf.shape)
        big = len(leaf.shape) >= 2 and np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize >= min_bytes
        if size > 1 and big:
            for axis in np.argsort(leaf.shape)[::-1]:
                if leaf.shape[axis] % size == 0:
                    spec[axis] = FSDP_AXIS
                    break
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    return jax.tree.map(one, tree)


meshes.register_holder(__name__)  # flashpatch reads this stand-in as it reads openpi's
