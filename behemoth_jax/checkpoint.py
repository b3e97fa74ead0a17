"""Orbax checkpoints of the train state and the grain iterator, restorable onto any mesh.

A checkpoint step holds two items: `state` (parameters, optimizer state, step; sharded arrays) and
`data` (one JSON iterator state per process, grain's handler). Restoring takes an abstract state
whose shardings are the *current* mesh's, so a run can resume on a different mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import orbax.checkpoint as ocp


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


def restore_params(path: str | Path, abstract_params, what: str = "train.init_from"):
  """Parameters only, from a checkpoint written by train.py or behemoth-convert: a run directory or
  its checkpoints directory (latest step), a step directory, or its `state` item. Placed by
  `abstract_params`. `what` names the setting in errors."""
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
  target = {"params": abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(path.absolute(), args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  return restored["params"]


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
