"""Orbax checkpoints of the train state and the grain iterator, restorable onto any mesh.

A checkpoint step holds two items: `state` (parameters, optimizer state, step; sharded arrays) and
`data` (one JSON iterator state per process, grain's handler). Restoring takes an abstract state
whose shardings are the *current* mesh's, so a run can resume on a different mesh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax.experimental import multihost_utils

from behemoth_jax.data.errors import DataError


class _JsonState:
  """Our DataIterator as grain's save handler wants a non-grain iterator: state as JSON bytes."""

  def __init__(self, it):
    self.it = it

  def get_state(self) -> bytes:
    return json.dumps(self.it.get_state()).encode()


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written, or none of the saved ones can be read; the message names the step."""


MANIFEST = "checksums.json"  # beside orbax's files in each step directory: {relative path: [size, sha256]}


def _hash_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def _step_files(step_dir: Path) -> list[Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"))


def write_manifest(step_dir: Path) -> None:
  """Size and sha256 of every file of a committed step. Orbax's files carry no checksum of the array
  bytes: a flipped byte in a compressed chunk restores silently to wrong values (measured), so we keep
  our own. Written to a temporary name and renamed, so a manifest is complete or absent."""
  entries = {str(f.relative_to(step_dir)): [f.stat().st_size, _hash_file(f)] for f in _step_files(step_dir)}
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(entries, indent=0))
  os.replace(tmp, step_dir / MANIFEST)


def verify_manifest(step_dir: Path) -> None:
  """Raises CheckpointError naming the first file whose size or checksum differs from the manifest.
  A step without a manifest (killed after orbax's commit, before the manifest) is trusted to orbax."""
  manifest = step_dir / MANIFEST
  if not manifest.is_file():
    return
  try:
    entries = json.loads(manifest.read_text())
  except ValueError:
    raise CheckpointError(f"{manifest}: unreadable manifest") from None
  for rel, (size, digest) in entries.items():
    f = step_dir / rel
    if not f.is_file():
      raise CheckpointError(f"{f}: missing")
    if f.stat().st_size != size:
      raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the manifest says {size} (truncated?)")
    if _hash_file(f) != digest:
      raise CheckpointError(f"{f}: checksum differs from the manifest (corrupted)")


class Checkpointer:
  """Orbax CheckpointManager for (state, data iterator) plus integrity: each committed step gets a
  checksum manifest (written in a background thread, off the training loop), and `restore_latest`
  falls back to the newest step that verifies and restores, moving broken ones aside."""

  def __init__(self, directory: str | Path, *, every: int, keep: int, use_async: bool):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      save_interval_steps=every,
      enable_async_checkpointing=use_async,
      create=True,
      cleanup_tmp_directories=True,
    )  # a save killed half-way
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    self.lead = jax.process_index() == 0
    self._hasher = ThreadPoolExecutor(1, thread_name_prefix="ckpt-manifest")
    self._sealed = {s for s in self.manager.all_steps() if (self.directory / str(s) / MANIFEST).is_file()}
    self._in_flight: int | None = None
    self._manifests: list = []
    self._closed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); async saves return after the device→host copy.
    A failed write raises CheckpointError naming the step and the steps still intact."""
    if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
      return False
    self._finish_in_flight()
    try:
      saved = self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state, save_args=save_args(state)),
          data=grain.checkpoint.CheckpointSave(_JsonState(data_iter)),
        ),
        force=force,
      )
    except Exception as e:
      raise self._write_error(step, e) from e
    self._in_flight = step if saved else None
    return saved

  def _finish_in_flight(self) -> None:
    """Waits for the previous async write; its failure is raised as CheckpointError naming its step."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(self._in_flight, e) from e
    self._in_flight = None
    self._seal()

  def _write_error(self, step: int | None, e: Exception) -> CheckpointError:
    intact = [s for s in self.manager.all_steps() if s != step]
    return CheckpointError(
      f"writing checkpoint step {step} to {self.directory} failed ({_one_line(e)}); "
      f"intact checkpoints: steps {intact or 'none'}"
    )

  def _seal(self) -> None:
    """Manifests for committed steps that lack one (lead process; background thread)."""
    if not self.lead:
      return
    for s in self.manager.all_steps():
      if s not in self._sealed:
        self._sealed.add(s)
        self._manifests.append(self._hasher.submit(self._write_manifest, s))

  def _write_manifest(self, step: int) -> None:
    try:
      write_manifest(self.directory / str(step))
    except FileNotFoundError:  # deleted meanwhile by max_to_keep
      pass

  def restore(self, step: int, abstract_state, data_iter):
    """The state at `step`, placed by `abstract_state`'s shardings; `data_iter` is set in place from
    every process's saved data state (not grain's restore, which reads only the file of this process
    index and count): a run saved by N processes resumes on M (data/pipeline.py: streams)."""
    files = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
    if not files:
      raise CheckpointError(f"{self.directory / str(step)}: no data iterator state (data/process_*.json)")
    data_iter.set_state([json.loads(f.read_text()) for f in files])
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    meta = _tree_metadata(self.directory / str(step) / "state")
    return _shapes_by_key(meta)

  def _check_shapes(self, step: int, saved: dict, abstract_state) -> None:
    """A checkpoint of another model (a changed config) is a configuration error, not corruption."""
    for key, want in sorted(_shapes_by_key(abstract_state).items(), key=lambda kv: kv[0][0] != "params"):
      got = saved.get(key)
      if got is not None and got != want:
        raise CheckpointError(
          f"{self.directory / str(step)}: {'/'.join(key)} has shape {got} but "
          f"the config needs {want} (another model's checkpoint? use another "
          f"train.out_dir)"
        )

  def restore_latest(self, abstract_state, data_iter, warn=print):
    """(state, step) of the newest step that verifies and restores, or (None, None) with no steps.
    Skipped unreadable newer steps are reported through `warn` and renamed `corrupt-STEP-TIME` (kept
    for inspection, out of orbax's sight). When every step is unreadable nothing is moved and
    CheckpointError names each step's problem; a checkpoint of another shape is an error at once."""
    broken = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        verify_manifest(self.directory / str(step))
        saved = self._saved_shapes(step)
      except Exception as e:
        broken.append((step, e))
        continue
      self._check_shapes(step, saved, abstract_state)
      try:
        state = self.restore(step, abstract_state, data_iter)
      except DataError:  # another data config (not a damaged step): the one-line error, nothing moved
        raise
      except Exception as e:
        broken.append((step, e))
        continue
      for s, e in broken:
        warn(f"warning: checkpoint step {s} is unreadable ({_one_line(e)}); using step {step}")
      self._move_aside([s for s, _ in broken])
      return state, step
    if broken:
      raise CheckpointError(
        f"no readable checkpoint in {self.directory}: " + "; ".join(f"step {s}: {_one_line(e)}" for s, e in broken)
      )
    return None, None

  def _move_aside(self, steps: list[int]) -> None:
    if not steps:
      return
    if self.lead:
      for s in steps:
        os.replace(self.directory / str(s), self.directory / f"corrupt-{s}-{int(time.time())}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint-move-aside")
    self.manager.reload()
    self._sealed -= set(steps)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the last write (raising CheckpointError if it failed) and the manifests. Idempotent."""
    if self._closed:
      return
    self._closed = True
    self._finish_in_flight()
    for f in self._manifests:
      f.result()
    self._hasher.shutdown()
    self.manager.close()


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _key_part(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def _shapes_by_key(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Leaf shapes by path as strings, the same for saved metadata ({..., 'value': ArrayMetadata}) and an
  in-memory state (nnx Variables, ShapeDtypeStructs)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    key = tuple(_key_part(k) for k in path)
    out[key[:-1] if key and key[-1] == "value" else key] = tuple(leaf.shape)
  return out


def _tree_metadata(item_dir: Path) -> dict:
  """The saved tree of ArrayMetadata (shapes, dtypes) of one item; the handler's reader, which unlike
  the checkpointer's does not warn about the step-level metadata file of from-hf output."""
  meta = ocp.PyTreeCheckpointHandler().metadata(Path(item_dir))
  return getattr(meta, "tree", meta)


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


def shape_mismatch(what: str, path: Path, key: tuple, got, want) -> CheckpointError:
  """The one-line error for a parameter whose saved shape is not the config's."""
  return CheckpointError(
    f"{what}: {path}: parameter {'/'.join(map(str, key))} has shape {tuple(got)} in the "
    f"checkpoint but the config needs {tuple(want)} (a checkpoint of another model?)"
  )


def restore_params(path: str | Path, abstract_params, what: str = "train.init_from", keys=None):
  """Parameters only, from a checkpoint written by train.py or behemoth-convert (see `params_dir`),
  placed by `abstract_params` (an nnx.State of ShapeDtypeStructs with shardings). A checkpoint saved
  with one leaf per layer (behemoth-convert from-hf) is re-stacked for a scanned model, leaf by leaf.
  `keys`: restore only these flat paths (a state of them alone), e.g. one weight at a time."""
  path = params_dir(path, what)
  saved = _tree_metadata(path).get("params", {})
  flat = dict(nnx.to_flat_state(abstract_params))
  shapes = _shapes_by_key(saved)
  restack = any(k[:2] == ("decoder", "cycles") for k in flat) and "cycles" not in saved.get("decoder", {})
  for key, var in flat.items():  # one line naming the parameter, not orbax's restore-args trace
    got = shapes.get(tuple(map(str, _saved_key(key, flat) if restack else key)))
    want = var.get_value().shape[1:] if restack and key[:2] == ("decoder", "cycles") else var.get_value().shape
    if got is not None and got != tuple(want):
      raise shape_mismatch(what, path, key, got, want)
  if restack:
    return _restore_restacked(path, flat, keys)
  if keys is not None:
    abstract_params = nnx.from_flat_state({k: v for k, v in flat.items() if k in keys})
  target = {"params": abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(
    path,
    args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    ),
  )
  return restored["params"]


class ParamReader:
  """Parameters of a params item (a `params_dir`) read straight from its tensorstore arrays, whole or one
  slice of the leading (layers) axis at a time, into a caller's buffer, which may be a strided view
  (a transposed or split HF tensor): tensorstore copies chunk by chunk with the layout change and any
  dtype conversion on its own threads, so no intermediate copy of a slice exists. A slice costs the
  chunks it touches: train.py and behemoth-convert store stacked leaves one layer per chunk
  (`save_args`); an older checkpoint whose chunks span layers is read correctly, chunk by chunk.
  Why not orbax's restore: each call re-reads the item's metadata and builds restore arguments
  (~0.1 s), and it returns whole arrays only."""

  def __init__(self, path: Path):
    self.path = Path(path)
    try:
      meta = json.loads((self.path / "_METADATA").read_text())
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{self.path}: not an orbax checkpoint item ({_one_line(e)})") from None
    self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    self._ocdbt = meta.get("use_ocdbt", True)
    self.names: dict[tuple, str] = {}
    for info in meta["tree_metadata"].values():
      keys = [k["key"] for k in info["key_metadata"]]
      if keys[0] != "params":
        continue
      leaf = keys[1:-1] if keys[-1] == "value" else keys[1:]
      self.names[tuple(int(k) if k.isdigit() else k for k in leaf)] = ".".join(keys)
    # No chunk cache: every byte is read once; a cache would only hold memory. And no page cache
    # (O_DIRECT reads): pages cached by a read-once job are memory the kernel must find afresh for the
    # next read, which on a machine handing free memory back to its host faults each page there. to-hf of
    # benchmarks/convert.py's checkpoint, alternating runs: 12.0-13.2 s through the page cache, 8.4-8.8 s
    # direct (8.1-9.4 s dropping the files' pages after each tensor, which walks every data file).
    self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "file_io_mode": {"mode": "direct"}})
    self._open: dict[tuple, ts.TensorStore] = {}

  def _store(self, leaf: tuple) -> ts.TensorStore:
    if leaf not in self._open:
      if leaf not in self.names:
        raise CheckpointError(f"{self.path}: parameter {'/'.join(map(str, leaf))} not in the checkpoint")
      base = {"driver": "file", "path": str(self.path) + "/"}
      name = self.names[leaf]
      kvstore = (
        {"driver": "ocdbt", "base": base, "path": name} if self._ocdbt else {**base, "path": f"{base['path']}{name}/"}
      )
      spec = {"driver": self._driver, "kvstore": kvstore, "recheck_cached_data": False}
      self._open[leaf] = ts.open(spec, open=True, read=True, context=self._context).result()
    return self._open[leaf]

  def shape(self, leaf: tuple) -> tuple[int, ...]:
    return tuple(self._store(leaf).shape)

  def dtype(self, leaf: tuple) -> np.dtype:
    return np.dtype(self._store(leaf).dtype.numpy_dtype)

  def read_into(self, leaf: tuple, index: int | None, out: np.ndarray, rows=None) -> None:
    """out[...] = leaf[index] (or the whole leaf; `rows`: then only that region of it, a slice of its
    first axis or a tuple of slices), converting to out's dtype."""
    self.start_read(leaf, index, out, rows).result()

  def start_read(self, leaf: tuple, index: int | None, out: np.ndarray, rows=None) -> ts.Future:
    """`read_into` started: its future, done when `out` is filled (several reads then share the disk)."""
    src = self._store(leaf)
    if index is not None:
      src = src[index]
    if rows is not None:
      src = src[rows]
    return ts.array(out, copy=False, write=True).write(src)


def save_args(tree):
  """orbax SaveArgs for a tree of arrays: every array of rank ≥ 3 (stacked layers, experts) is stored
  one index of its leading axis per chunk, so that a layer (or an expert) reads alone (`ParamReader`,
  behemoth-convert to-hf); chunks are at most `CHUNK_BYTES`."""
  return jax.tree.map(
    lambda a: ocp.SaveArgs(shard_axes=(0,) if np.ndim(a) >= 3 else (), chunk_byte_size=CHUNK_BYTES), tree
  )


CHUNK_BYTES = 64 << 20  # chunks copy in parallel on tensorstore's threads


def _saved_key(key: tuple, flat: dict) -> tuple:
  """The per-layer checkpoint key holding (the first layer of) scanned parameter `key`."""
  if key[:3] == ("decoder", "cycles", "blocks"):
    return ("decoder", "tail", key[3], *key[4:])
  if key[:2] == ("decoder", "tail"):
    blocks = {k[3] for k in flat if k[:3] == ("decoder", "cycles", "blocks")}
    n_cycles = next(v.get_value().shape[0] for k, v in flat.items() if k[:2] == ("decoder", "cycles"))
    return ("decoder", "tail", n_cycles * len(blocks) + key[2], *key[3:])
  return key


def _restore_restacked(path: Path, flat: dict, keys=None):
  """Scanned target ← per-layer checkpoint: stacked leaf (cycles, blocks, j, …)[c] = tail leaf c·P + j.
  Each leaf is built shard by shard (`jax.make_array_from_callback`): a device's shard reads only its
  region of each layer's leaf, so no host ever holds a whole stacked leaf (hundreds of GB for Behemoth's
  experts), only its own devices' shards (`keys`: only these leaves)."""
  blocks = sorted({k[3] for k in flat if k[:3] == ("decoder", "cycles", "blocks")})
  n_cycles = next(v.get_value().shape[0] for k, v in flat.items() if k[:2] == ("decoder", "cycles"))
  first_tail = n_cycles * len(blocks)
  reader = ParamReader(path)
  out = {}
  for key, var in flat.items():
    if keys is not None and key not in keys:
      continue
    sds = var.get_value()
    if key[:3] == ("decoder", "cycles", "blocks"):
      layers = [("decoder", "tail", c * len(blocks) + key[3], *key[4:]) for c in range(n_cycles)]
    elif key[:2] == ("decoder", "tail"):
      layers = ("decoder", "tail", first_tail + key[2], *key[3:])
    else:
      layers = key
    out[key] = var.replace(jax.make_array_from_callback(sds.shape, sds.sharding, _shard_reader(reader, layers, sds)))
  return nnx.from_flat_state(out)


def _shard_reader(reader: ParamReader, layers, sds):
  """The callback filling one device's shard (its index: a tuple of slices) of leaf `layers` (a saved
  leaf, or the list of saved per-layer leaves stacked on the first axis). Devices holding the same
  region (replicas) share one read."""
  done: dict = {}

  def read(index):
    bounds = tuple(s.indices(n)[:2] for s, n in zip(index, sds.shape, strict=True))  # slices hash from 3.12
    if bounds not in done:
      region = tuple(slice(a, b) for a, b in bounds)
      value = np.empty([b - a for a, b in bounds], sds.dtype)
      if isinstance(layers, list):
        for i, c in enumerate(range(*bounds[0])):
          reader.read_into(layers[c], None, value[i], region[1:])
      else:
        reader.read_into(layers, None, value, region)
      done[bounds] = value
    return done[bounds]

  return read


CONFIG_NAME = "config.yaml"
# The Hugging Face configs a checkpoint was converted from, kept beside it (behemoth-convert from-hf)
# and copied into a run that starts from it, so that to-hf writes them back with only what changed.
HF_CONFIG = "hf_config.json"
HF_GENERATION_CONFIG = "hf_generation_config.json"


def save_params(path: str | Path, params) -> None:
  """Parameters alone as a checkpoint `restore_params` (and train.init_from) reads: PATH/state."""
  item = {"params": params}
  ocp.PyTreeCheckpointer().save(
    Path(path).absolute() / "state", args=ocp.args.PyTreeSave(item, save_args=save_args(item))
  )


def find_config(path: str | Path) -> Path | None:
  """The config.yaml written beside a checkpoint (behemoth-convert) or in its run directory (train.py)."""
  return find_beside(path, CONFIG_NAME)


def find_beside(path: str | Path, name: str) -> Path | None:
  """File `name` in PATH or up to three levels above it (a run directory holds its checkpoints three
  levels down: run/checkpoints/STEP/state)."""
  path = Path(path).absolute()
  for p in [path, *list(path.parents)[:3]]:
    if (p / name).is_file():
      return p / name
  return None


def carry_source_configs(ckpt: str | Path, dst: Path) -> None:
  """Copies the HF configs kept beside checkpoint `ckpt` (if any) into directory `dst`."""
  for name in (HF_CONFIG, HF_GENERATION_CONFIG):
    found = find_beside(ckpt, name)
    if found is not None:
      shutil.copyfile(found, Path(dst) / name)
