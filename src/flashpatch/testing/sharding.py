"""openpi keeps its training mesh in a global of its own; so do these modules (same API)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

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
