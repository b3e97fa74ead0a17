"""Device meshes from `ParallelConfig`: one slice (ICI) or several slices joined over DCN."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sharding.rules import MESH_AXES

if TYPE_CHECKING:  # the parallel section of the config; read by attribute, never imported at run time
  from behemoth_jax.config import ParallelConfig


class ShardingError(ValueError):
  """A size does not fit the mesh; the message names the tensor or field, dimension and axes."""


def axis_sizes(parallel: ParallelConfig, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with -1 filled from the device count; the product must equal it."""
  sizes = {name: getattr(parallel, name) for name in MESH_AXES}
  known = math.prod(s for s in sizes.values() if s != -1)
  for name, size in sizes.items():
    if size == -1:
      if num_devices % known:
        raise ShardingError(
          f"parallel.{name}: -1 cannot fill {num_devices} devices (the other axes multiply to {known})"
        )
      sizes[name] = num_devices // known
  total = math.prod(sizes.values())
  if total != num_devices:
    shape = " x ".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "all 1"
    raise ShardingError(f"parallel: mesh {shape} needs {total} devices, but there are {num_devices}")
  return sizes


def make_mesh(parallel: ParallelConfig, devices: list | None = None) -> Mesh:
  """A mesh with axes `MESH_AXES`. With `parallel.num_slices` > 1, `parallel.dcn_axis` spans slices
  (each slice a TPU slice, or a process/host where devices carry no slice index)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = axis_sizes(parallel, len(devices))
  shape = [sizes[a] for a in MESH_AXES]
  types = (AxisType.Auto,) * len(MESH_AXES)
  if parallel.num_slices == 1:
    try:
      return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError:  # e.g. expert=16 on an 8x8x8 torus: split a physical axis between mesh axes
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return Mesh(np.asarray(grid), MESH_AXES, axis_types=types)
  i = MESH_AXES.index(parallel.dcn_axis)
  if shape[i] % parallel.num_slices:
    raise ShardingError(
      f"parallel.{parallel.dcn_axis}: size {shape[i]} not divisible by num_slices {parallel.num_slices}"
    )
  ici, dcn = list(shape), [1] * len(shape)
  ici[i] //= parallel.num_slices
  dcn[i] = parallel.num_slices
  # TPU slices carry distinct slice indices; elsewhere (GPU hosts, CPU processes) a process is a granule.
  slices = {getattr(d, "slice_index", None) for d in devices}
  by_process = None in slices or len(slices) == 1
  granules = len({d.process_index for d in devices}) if by_process else len(slices)
  if granules != parallel.num_slices:
    raise ShardingError(
      f"parallel.num_slices: {parallel.num_slices} requested, but the devices form "
      f"{granules} {'processes' if by_process else 'slices'}"
    )
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
  return Mesh(np.asarray(grid), MESH_AXES, axis_types=types)
