"""Find the device mesh a patched call runs under, wherever the caller keeps it.

openpi keeps its training mesh in a global of its own (`openpi.training.sharding.set_mesh`), not
in JAX's mesh context; other code uses `jax.set_mesh` / `with mesh:`; inference uses none.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:
    from flashpatch.backends.base import Problem

#: Modules that keep a mesh like openpi does: `<module>._MeshState.active_mesh` (others add theirs with
#: `register_holder`).
MESH_HOLDERS = ["openpi.training.sharding"]


def register_holder(module_name: str) -> None:
    """Also read the mesh that `module_name._MeshState.active_mesh` holds (a stand-in for openpi's, say)."""
    if module_name not in MESH_HOLDERS:
        MESH_HOLDERS.append(module_name)


#: The axes openpi shards the batch over; used when the mesh has all of them.
DATA_AXES = ("batch", "fsdp")


def active_mesh() -> jax.sharding.Mesh | None:
    """The mesh in force: openpi's global, then JAX's context; None when there is none."""
    for name in MESH_HOLDERS:
        state = getattr(sys.modules.get(name), "_MeshState", None)
        mesh = getattr(state, "active_mesh", None)
        if mesh is not None:
            return mesh
    from jax._src import mesh as mesh_lib  # JAX has no public getter that works inside jit

    concrete = getattr(mesh_lib, "get_concrete_mesh", None)  # jax.set_mesh / use_mesh
    if concrete is not None and _has_devices(mesh := concrete()):
        return mesh
    mesh = mesh_lib.thread_resources.env.physical_mesh  # `with mesh:`
    return mesh if _has_devices(mesh) else None


def single_device_mesh(axis: str = "batch") -> jax.sharding.Mesh:
    """A one-device mesh on the default device, for code that needs a mesh when the caller has none."""
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), (axis,))


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over: openpi's data axes where present, else all."""
    names = tuple(mesh.axis_names)
    chosen = tuple(a for a in DATA_AXES if a in names)
    return chosen or names


def per_device(problem: Problem) -> Problem:
    """`problem` as one device sees it under the mesh in force: the batch split over the mesh's data axes (what a
    kernel meets when XLA partitions the call along the batch)."""
    mesh = active_mesh()
    if mesh is None:
        return problem
    split = 1
    for axis in batch_axes(mesh):
        split *= mesh.shape[axis]
    if split <= 1 or problem.batch % split:
        return problem
    return dataclasses.replace(problem, batch=problem.batch // split)


def _has_devices(mesh) -> bool:
    return mesh is not None and not getattr(mesh, "empty", True) and getattr(mesh, "devices", None) is not None
