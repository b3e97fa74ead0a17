"""Turning logical annotations into placements: partition specs, parameter shardings, constraints, reports.

Depends on jax and flax only: a parameter's logical axes are its `out_sharding` metadata.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding import axes as ax
from sharding.expert import expert_parallel
from sharding.mesh import ShardingError
from sharding.rules import BEST_EFFORT, RULES, shard_count


def logical_to_spec(
  logical: ax.Axes, mesh: Mesh, shape: tuple[int, ...] | None = None, name: str | None = None
) -> PartitionSpec:
  """Maps logical axis names through RULES. A mesh axis is used once per tensor (first dim wins).

  With `name` (a parameter): a dimension that its mesh axes do not divide raises ShardingError.
  Without it (an activation, a hint): such mesh axes are dropped.
  """
  used: set[str] = set()
  out = []
  for dim, logical_name in enumerate(logical):
    if logical_name is None:
      out.append(None)
      continue
    if logical_name not in RULES:
      raise ShardingError(f"{name or 'activation'}: logical axis {logical_name!r} has no sharding rule")
    mesh_axes = [a for a in RULES[logical_name] if a not in used and mesh.shape[a] > 1]
    if shape is not None:
      size = math.prod(mesh.shape[a] for a in mesh_axes)
      if shape[dim] % size:
        if name is not None and logical_name not in BEST_EFFORT:
          axes_txt = " x ".join(f"{a}={mesh.shape[a]}" for a in mesh_axes)
          raise ShardingError(
            f"{name}: dim {dim} ({logical_name}) of size {shape[dim]} is not divisible "
            f"by mesh axes {axes_txt} (= {size})"
          )
        while mesh_axes and shape[dim] % math.prod(mesh.shape[a] for a in mesh_axes):
          mesh_axes.pop()
    used.update(mesh_axes)
    out.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
  return PartitionSpec(*out)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """A State of NamedShardings mirroring parameter state `state` (Variables keep their structure), from
  each Variable's logical axes (`out_sharding` metadata) through the rules table."""

  def f(path, var):
    logical = var.get_metadata("out_sharding", None) or (None,) * len(var.shape)
    spec = logical_to_spec(logical, mesh, tuple(var.shape), name=_path_name(path))
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(state: nnx.State, mesh: Mesh) -> nnx.State:
  """Moves an existing state onto its shardings."""
  return jax.device_put(state, param_shardings(state, mesh))


def per_device_bytes(abstract) -> int:
  """Bytes one device holds of an abstract sharded tree (ShapeDtypeStructs with shardings)."""
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def replication_report(state: nnx.State, mesh: Mesh) -> dict[str, float]:
  """How parameter bytes are spread over the mesh (works on abstract states; no allocation).

  replicated_fraction: share of parameter bytes held whole by every device (no dimension sharded).
  per_device_bytes vs ideal_per_device_bytes (= total / devices): the cost of partial replication.
  """
  shardings = param_shardings(state, mesh)
  total = replicated = per_device = 0
  for var, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
    nbytes = math.prod(var.shape) * np.dtype(var.dtype).itemsize
    parts = math.prod(mesh.shape[a] for dim in sh.spec if dim for a in ((dim,) if isinstance(dim, str) else dim))
    total += nbytes
    per_device += nbytes / parts
    replicated += nbytes if parts == 1 else 0
  return {
    "total_bytes": total,
    "replicated_bytes": replicated,
    "replicated_fraction": replicated / total,
    "per_device_bytes": per_device,
    "ideal_per_device_bytes": total / mesh.size,
  }


def constrainer(mesh: Mesh):
  def constrain(x: jax.Array, logical: ax.Axes) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, mesh, x.shape)))

  return constrain


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
  """Within this context the model places activation constraints and runs its MoE on `mesh`."""
  sizes = dict(mesh.shape)
  with (
    ax.use_resolver(constrainer(mesh)),
    ax.use_expert_parallel(expert_parallel(mesh)),
    ax.use_shard_count(lambda logical: shard_count(logical, sizes)),
  ):
    yield mesh
