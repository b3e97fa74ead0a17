"""Orbax checkpoints of the train state and the grain iterator, restorable onto any mesh.

A checkpoint step holds two items: `state` (parameters, optimizer state, step; sharded arrays) and
`data` (one JSON iterator state per process, grain's handler). Restoring takes an abstract state
whose shardings are the *current* mesh's, so a run can resume on a different mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


class _JsonState:
  """Our DataIterator as grain's handler wants a non-grain iterator: state as JSON bytes."""

  def __init__(self, it):
    self.it = it

  def get_state(self) -> bytes:
    return json.dumps(self.it.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.it.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:  # grain calls this after a restore; our iterator prefetches itself
    pass


class Checkpointer:
  def __init__(self, directory: str | Path, *, every: int, keep: int, use_async: bool):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           enable_async_checkpointing=use_async, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); async saves return after the device→host copy."""
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_JsonState(data_iter))), force=force)

  def restore(self, step: int, abstract_state, data_iter):
    """The state at `step`, placed by `abstract_state`'s shardings; `data_iter` is set in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(_JsonState(data_iter))))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def params_dir(path: str | Path, what: str = "train.init_from") -> Path:
  """The orbax item holding `params`: from a run directory or its checkpoints directory (latest step),
  a step directory, or the item itself."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{what}: {path} not found")
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []
  if steps:
    path = path / str(steps[-1])
  if (path / "state").is_dir():
    path = path / "state"
  return path.absolute()


def restore_params(path: str | Path, abstract_params, what: str = "train.init_from"):
  """Parameters only, from a checkpoint written by train.py or behemoth-convert (see `params_dir`),
  placed by `abstract_params` (an nnx.State of ShapeDtypeStructs with shardings). A checkpoint saved
  with one leaf per layer (behemoth-convert from-hf) is re-stacked for a scanned model, leaf by leaf."""
  path = params_dir(path, what)
  meta = ocp.PyTreeCheckpointer().metadata(path)
  saved = getattr(meta, "item_metadata", meta).tree.get("params", {})  # StepMetadata or TreeMetadata
  flat = dict(nnx.to_flat_state(abstract_params))
  if any(k[:2] == ("decoder", "cycles") for k in flat) and "cycles" not in saved.get("decoder", {}):
    return _restore_restacked(path, flat)
  target = {"params": abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  return restored["params"]


def restore_leaf(path: Path, leaf: tuple, shape: tuple[int, ...], dtype) -> np.ndarray:
  """One parameter leaf of the params item at `path` (a `params_dir`), as a host array."""
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  var = nnx.Param(jax.ShapeDtypeStruct(shape, dtype, sharding=cpu))
  sub = {"params": nnx.from_flat_state({leaf: var})}
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=sub, restore_args=ocp.checkpoint_utils.construct_restore_args(sub), partial_restore=True))
  return np.asarray(dict(nnx.to_flat_state(restored["params"]))[leaf].get_value())


def _restore_restacked(path: Path, flat: dict):
  """Scanned target ← per-layer checkpoint: stacked leaf (cycles, blocks, j, …)[c] = tail leaf c·P + j."""
  blocks = sorted({k[3] for k in flat if k[:3] == ("decoder", "cycles", "blocks")})
  n_cycles = next(v.get_value().shape[0] for k, v in flat.items() if k[:2] == ("decoder", "cycles"))
  first_tail = n_cycles * len(blocks)
  out = {}
  for key, var in flat.items():
    sds = var.get_value()
    if key[:3] == ("decoder", "cycles", "blocks"):
      j, rest = key[3], key[4:]
      value = np.stack([restore_leaf(path, ("decoder", "tail", c * len(blocks) + j, *rest), sds.shape[1:], sds.dtype)
                        for c in range(n_cycles)])
    elif key[:2] == ("decoder", "tail"):
      value = restore_leaf(path, ("decoder", "tail", first_tail + key[2], *key[3:]), sds.shape, sds.dtype)
    else:
      value = restore_leaf(path, key, sds.shape, sds.dtype)
    out[key] = var.replace(jax.device_put(value, sds.sharding))
  return nnx.from_flat_state(out)


CONFIG_NAME = "config.yaml"


def save_params(path: str | Path, params) -> None:
  """Parameters alone as a checkpoint `restore_params` (and train.init_from) reads: PATH/state."""
  ocp.PyTreeCheckpointer().save(Path(path).absolute() / "state", {"params": params})


def find_config(path: str | Path) -> Path | None:
  """The config.yaml written beside a checkpoint (behemoth-convert) or in its run directory (train.py):
  PATH or up to three levels above it."""
  path = Path(path).absolute()
  for p in [path, *list(path.parents)[:3]]:
    if (p / CONFIG_NAME).is_file():
      return p / CONFIG_NAME
  return None
