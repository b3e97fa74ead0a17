"""Hugging Face `save_pretrained` directories (safetensors) → our model.

Tensors are read one at a time from memory-mapped safetensors files and assembled leaf by leaf (a
stacked leaf gathers its layers), each checked against the abstract model's shape. Every tensor in
the checkpoint must be consumed; missing, unexpected and misshapen tensors raise `ConversionError`
with one line naming the tensor. No pickle is ever loaded.
"""

from __future__ import annotations

import contextvars
import ctypes
import dataclasses
import glob
import json
import shutil
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp1
from flax import nnx
from tqdm import tqdm

from behemoth_jax.config import ConfigError, ModelConfig
from behemoth_jax.convert.hf_config import from_hf_config
from behemoth_jax.convert.hostcopy import copy_tiled, drop_cached, host_buffer
from behemoth_jax.convert.keymap import entries, same
from behemoth_jax.convert.safetensors_io import SafetensorsError, SafetensorsFile
from behemoth_jax.model.transformer import Llama4, abstract_model
from behemoth_jax.train.checkpoint import CHUNK_BYTES, HF_CONFIG, HF_GENERATION_CONFIG
from sharding.api import place

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
DATA_FILE_BYTES = 32 << 20  # orbax's target size of an OCDBT data file, for from-hf
AUTO = "auto"  # keep each tensor's dtype as the checkpoint stores it (transformers' dtype="auto")


class ConversionError(ValueError):
  """A checkpoint does not match the model; the message names the tensor or field."""


class SafetensorsDir:
  """Name → tensor view over a directory of (possibly sharded) safetensors files."""

  def __init__(self, path: Path):
    self.path = path
    index = path / "model.safetensors.index.json"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in path.glob("*.safetensors"))
      if not files:
        bad = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        hint = f" (found {bad[0]}: pickled checkpoints are never loaded; re-save with safetensors)" if bad else ""
        raise ConversionError(f"{path}: no .safetensors files{hint}")
      weight_map = None
    self._files = {}
    self.file_of: dict[str, str] = {}
    for name in files:
      fp = path / name
      if not fp.is_file():
        raise ConversionError(f"{fp}: listed in model.safetensors.index.json but missing")
      try:
        handle = SafetensorsFile(fp)
      except SafetensorsError as e:
        raise ConversionError(str(e)) from None
      self._files[name] = handle
      for key in handle.keys():
        self.file_of[key] = name
    if weight_map is not None:
      missing = sorted(k for k in weight_map if k not in self.file_of)
      if missing:
        raise ConversionError(f"{missing[0]}: in the index but not in {weight_map[missing[0]]}")

  def keys(self) -> set[str]:
    return set(self.file_of)

  def get(self, name: str, buffer: np.ndarray | None = None, drop: bool = False) -> np.ndarray:
    """The tensor (a new array, or read into the front of the uint8 `buffer`; `drop`: its bytes then
    dropped from the page cache)."""
    if name not in self.file_of:
      raise ConversionError(f"{name}: missing from checkpoint {self.path}")
    return self._files[self.file_of[name]].get(name, buffer, drop)

  def nbytes(self, name: str) -> int:
    return self._files[self.file_of[name]].nbytes(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._files[self.file_of[name]].shape(name)

  def read_scatter(self, name: str, pieces, drop: bool = False) -> None:
    self._files[self.file_of[name]].read_scatter(name, pieces, drop)

  def prefetch(self, name: str) -> None:
    self._files[self.file_of[name]].prefetch(name)

  def dtype(self, name: str) -> np.dtype:
    """The stored dtype, from the header (no data read)."""
    if name not in self.file_of:
      raise ConversionError(f"{name}: missing from checkpoint {self.path}")
    return self._files[self.file_of[name]].dtype(name)

  def close(self) -> None:
    for handle in self._files.values():
      handle.close()


def read_config(path: Path) -> dict:
  cfg_path = path / "config.json"
  if not cfg_path.is_file():
    raise ConversionError(f"{cfg_path}: not found (expected a Hugging Face save_pretrained directory)")
  return json.loads(cfg_path.read_text())


def _text_prefix(hf_cfg: dict) -> str:
  archs = hf_cfg.get("architectures") or []
  if hf_cfg.get("model_type") == "llama4" or "Llama4ForConditionalGeneration" in archs:
    return "language_model."
  return ""


def _config_of(path: Path, overrides: dict) -> tuple[ModelConfig, str]:
  """(our config, HF text-tensor prefix) of a Hugging Face directory; dtypes are set by `_with_dtypes`."""
  hf_cfg = read_config(path)
  arch = (hf_cfg.get("architectures") or ["Llama4ForCausalLM"])[0]
  if not arch.startswith("Llama4"):
    raise ConversionError(f"{path / 'config.json'}: architecture {arch!r} is not a Llama 4 model")
  try:
    cfg = from_hf_config(hf_cfg, **overrides)
  except ConfigError as e:
    raise ConversionError(f"{path / 'config.json'}: {e}") from None
  return cfg, _text_prefix(hf_cfg)


def _check_dtype(dtype: str) -> None:
  if dtype != AUTO and dtype not in SUPPORTED_DTYPES:
    raise ConversionError(f"dtype: unsupported {dtype!r} (valid: {AUTO}, {', '.join(SUPPORTED_DTYPES)})")


def _with_dtypes(cfg: ModelConfig, source, by_leaf, dtype: str, compute_dtype: str | None):
  """(config with param/compute dtypes, {leaf: dtype it is stored in}). `dtype` "auto" keeps each
  leaf in its source tensors' dtype (read from the headers) and makes the dtype holding the most
  bytes the config's `param_dtype`; otherwise every leaf is converted to `dtype`."""
  leaf_dtypes = {}
  for leaf, ents in by_leaf.items():
    if dtype != AUTO:
      leaf_dtypes[leaf] = np.dtype(jnp.dtype(dtype))
      continue
    found = []
    for e in ents:
      d = source.dtype(e.hf_name)
      if d.name not in SUPPORTED_DTYPES:
        raise ConversionError(f"{e.hf_name}: unsupported dtype {d.name}")
      found.append(d)
    leaf_dtypes[leaf] = found[0] if len(set(found)) == 1 else np.result_type(*found)  # promote, never lose bits
  if dtype == AUTO:
    weight = defaultdict(int)
    for leaf, d in leaf_dtypes.items():
      weight[d.name] += len(by_leaf[leaf]) * d.itemsize  # a proxy for bytes that needs no shapes
    dtype = max(weight, key=weight.get) if weight else "float32"
  cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=compute_dtype or dtype)
  return cfg, leaf_dtypes


def load_hf(
  path: str | Path,
  dtype: str = AUTO,
  compute_dtype: str | None = None,
  progress: bool = False,
  mesh=None,
  **config_overrides,
) -> Llama4:
  """Loads a `Llama4ForCausalLM` / `Llama4ForConditionalGeneration` save_pretrained directory as our model.

  Args:
    path: directory with config.json and model*.safetensors (+ index when sharded).
    dtype: "auto" (default: every parameter keeps the dtype the checkpoint stores it in), or
      "float32", "bfloat16", "float16" to convert.
    compute_dtype: activation dtype; defaults to the parameters' (with "auto": the dtype holding
      most of the checkpoint).
    progress: show a progress bar (bytes read, bytes/s).
    mesh: place every parameter on this `jax.sharding.Mesh` by the sharding rules (run the model
      inside `sharding.api.use_mesh(mesh)`).
    config_overrides: ModelConfig fields to set (e.g. scan_layers=False, moe_impl="dense").
  Returns:
    The model; `model(input_ids_BT)` gives float32 logits [B, T, V].
  """
  path = Path(path)
  _check_dtype(dtype)
  cfg, prefix = _config_of(path, config_overrides)
  source = SafetensorsDir(path)
  try:
    model = _assemble(cfg, source, prefix, dtype, compute_dtype, progress)
  finally:
    source.close()
  if mesh is not None:
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, place(state, mesh))
  return model


def _entries_by_leaf(cfg: ModelConfig, prefix: str) -> dict:
  """{our leaf: its HF entries} of `cfg`'s model (the layer layout, not dtypes, decides them)."""
  by_leaf = defaultdict(list)
  for entry in entries(cfg, cfg.num_cycles, prefix):
    by_leaf[entry.leaf].append(entry)
  return by_leaf


def _abstract_leaves(cfg: ModelConfig, by_leaf: dict):
  """(graphdef, flat abstract leaves) of `cfg`'s model, checked against the key table."""
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  flat = dict(nnx.to_flat_state(abs_state))
  unknown_leaves = set(by_leaf) - set(flat)
  assert not unknown_leaves, f"key table names leaves the model lacks: {sorted(unknown_leaves)[:3]}"
  unfilled = sorted(set(flat) - set(by_leaf))
  assert not unfilled, f"model leaves with no HF source: {unfilled[:3]}"
  return graphdef, flat


def _progress(progress: bool, what: str):
  if not progress:
    return None
  return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=f"reading {what}")


class _ReadsInto:
  """`source.get` into one reused buffer of the largest tensor's size: a tensor is valid until the next
  read. The tensor last read is kept, so a fused HF tensor (gate_up_proj, split between two of our
  leaves that come one after the other) is read once. Why one buffer: a fresh buffer's pages are zeroed
  by the kernel as the read first touches them (perf: ~10% of from-hf's CPU time in clear_page)."""

  def __init__(self, source, order: list[str], ahead_bytes: int, buffered: set[str] | None = None):
    self.source = source
    # Sized for the tensors read through it (`buffered`; those read straight into their leaves need none).
    self._buffer = host_buffer(max((source.nbytes(n) for n in order if buffered is None or n in buffered), default=0))
    self._last: tuple[str, np.ndarray] | None = None
    # Readahead: the tensors to be read next, up to `ahead_bytes`, are being read by the kernel while
    # this one is converted and saved (from-hf reads at the disk's pace instead of waiting on each read).
    self._order, self._next, self._ahead = order, 0, ahead_bytes
    self._queued: dict[str, int] = {}  # prefetched, not read yet: bytes

  def get(self, name: str) -> np.ndarray:
    if self._last is None or self._last[0] != name:
      self._last = None  # the buffer is overwritten: drop the old view first
      self._read_ahead(name)
      self._last = (name, self.source.get(name, self._buffer, drop=True))
    return self._last[1]

  def read_scatter(self, name: str, pieces) -> None:
    """The tensor's bytes straight into `pieces` (see `SafetensorsFile.read_scatter`), read ahead alike."""
    self._read_ahead(name)
    self.source.read_scatter(name, pieces, drop=True)

  def _read_ahead(self, name: str) -> None:
    self._queued.pop(name, None)
    while self._next < len(self._order) and sum(self._queued.values()) < self._ahead:
      ahead = self._order[self._next]
      self.source.prefetch(ahead)
      self._queued[ahead] = self.source.nbytes(ahead)
      self._next += 1


def _leaf_value(cfg: ModelConfig, source, leaf_entries, target, dtype: np.dtype, bar=None) -> np.ndarray:
  """One of our leaves (host numpy in `dtype`, the target's shape) from its HF tensors, each checked.
  A leaf from one tensor in its dtype is a view of it (transposed, split: the writer copies it once,
  into the checkpoint); a stacked leaf is assembled layer by layer."""
  stacked = leaf_entries[0].stack is not None
  per_layer_shape = target.shape[1:] if stacked else target.shape
  host = np.empty(target.shape, dtype) if stacked else None
  for entry in leaf_entries:
    raw = source.get(entry.hf_name)
    if raw.dtype.name not in SUPPORTED_DTYPES:
      raise ConversionError(f"{entry.hf_name}: unsupported dtype {raw.dtype.name}")
    if entry.rule.part is not None and raw.shape[-1] % entry.rule.part[1]:
      raise ConversionError(f"{entry.hf_name}: last dim {raw.shape[-1]} not divisible into gate/up halves")
    value = entry.rule.to_ours(raw, cfg) if _shape_ok(raw, entry, cfg, per_layer_shape) else None
    if value is None or value.shape != per_layer_shape:
      raise ConversionError(
        f"{entry.hf_name}: shape {tuple(raw.shape)} does not match the config "
        f"(expected {_expected_hf_shape(entry, cfg, per_layer_shape)})"
      )
    if bar is not None:
      bar.update(raw.nbytes // (entry.rule.part[1] if entry.rule.part else 1))
    if not stacked:
      return value if value.dtype == dtype else value.astype(dtype)
    host[entry.stack] = value
  return host


def _scatter_unit(cfg: ModelConfig, source, leaves: list, i: int, flat: dict, leaf_dtypes: dict) -> list | None:
  """The leaves from leaves[i] on that one HF tensor fills by plain byte ranges: the whole tensor as it
  is (a norm, an embedding, the experts' down_proj) or its halves along the last axis (gate_up_proj ->
  gate, up: each row's halves), each leaf unstacked and in the tensor's dtype and shape. from-hf reads
  such a tensor straight into its leaves' places in the slab (`read_scatter`), with no copy of ours.
  None where that does not apply (a transpose, a stacked or converted leaf): the general path."""
  leaf, ents = leaves[i]
  rule = ents[0].rule
  if len(ents) != 1 or ents[0].stack is not None or not (rule.to_ours is same or rule.part is not None):
    return None
  name, count = ents[0].hf_name, rule.part[1] if rule.part else 1
  unit = leaves[i : i + count]
  for k, (lf, es) in enumerate(unit):
    e = es[0]
    if len(es) != 1 or e.hf_name != name or e.stack is not None or (e.rule.part or (0, 1)) != (k, count):
      return None
    if leaf_dtypes[lf] != source.dtype(name):
      return None
  shape = source.shape(name)
  want = (*shape[:-1], shape[-1] // count) if shape else shape
  if len(unit) != count or (count > 1 and shape[-1] % count):
    return None
  if any(tuple(flat[lf].get_value().shape) != want for lf, _ in unit):
    return None  # the general path names the mismatch
  return unit


RUNTIME_BYTES = 512 << 20  # from-hf's memory besides its buffers (Python, jax, orbax, tensorstore): ~0.5 GiB


def _plan_steps(cfg, source, by_leaf: dict, flat: dict, leaf_dtypes: dict, order: list, buffer_bytes: int):
  """([(scatter?, [(leaf, entries)])], names of tensors read whole into the read buffer, slab bytes).
  A fused tensor's halves are scattered into their two leaves together, which needs slabs of the whole
  tensor; where that with the read buffer (the largest tensor still read whole) would exceed the
  memory bound, 2 × the largest tensor + 1 GiB, fused tensors are read whole and split (the read
  buffer then holds them; each half's slab half as large)."""
  leaves, largest = list(by_leaf.items()), max(source.nbytes(n) for n in order)
  for fused in (True, False):
    steps, i = [], 0
    while i < len(leaves):
      unit = _scatter_unit(cfg, source, leaves, i, flat, leaf_dtypes)
      if unit is not None and len(unit) > 1 and not fused:
        unit = None
      steps.append((unit is not None, unit or [leaves[i]]))
      i += len(steps[-1][1])
    buffered = {e.hf_name for scatter, unit in steps if not scatter for _, ents in unit for e in ents}
    slab = max(
      buffer_bytes,
      *(sum(_nbytes(flat[lf].get_value(), leaf_dtypes[lf]) + _Slabs.ALIGN for lf, _ in u) for _, u in steps),
    )
    buffer = max((source.nbytes(n) for n in buffered), default=0)
    if 2 * slab + buffer + RUNTIME_BYTES <= 2 * largest + (1 << 30):
      break
  return steps, buffered, slab


def _scatter_pieces(views: list[np.ndarray]):
  """Memoryviews, in the file's byte order, of `views` holding equal parts of each row of one tensor."""
  if len(views) == 1:
    yield memoryview(views[0].reshape(-1).view(np.uint8))
    return
  rows = [v.reshape(-1, v.shape[-1]).view(np.uint8) for v in views]
  for r in range(rows[0].shape[0]):
    for part in rows:
      yield memoryview(part[r])


def _check_all_consumed(source, by_leaf) -> None:
  consumed = {e.hf_name for ents in by_leaf.values() for e in ents}
  unexpected = sorted(source.keys() - consumed)
  if unexpected:
    raise ConversionError(
      f"{unexpected[0]}: unexpected tensor in checkpoint ({len(unexpected)} unexpected; is the config right?)"
    )


def _assemble(
  cfg: ModelConfig, source, prefix: str, dtype: str, compute_dtype: str | None, progress: bool = False
) -> Llama4:
  by_leaf = _entries_by_leaf(cfg, prefix)
  _check_all_consumed(source, by_leaf)
  cfg, leaf_dtypes = _with_dtypes(cfg, source, by_leaf, dtype, compute_dtype)
  graphdef, flat = _abstract_leaves(cfg, by_leaf)
  bar = _progress(progress, source.path)
  try:
    for leaf, leaf_entries in by_leaf.items():
      value = _leaf_value(cfg, source, leaf_entries, flat[leaf].get_value(), leaf_dtypes[leaf], bar)
      flat[leaf].set_value(jnp.asarray(value))
  finally:
    if bar is not None:
      bar.close()
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _release_freed_memory() -> None:
  """glibc keeps freed large blocks in its arenas; without handing them back, a conversion's resident
  memory creeps up with the number of tensors (measured: +0.35 GiB from 4 to 8 layers)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def _nbytes(target, dtype) -> int:
  return int(np.prod(target.shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class _Slabs:
  """Two reused byte buffers that batches of leaves are copied into, one filled while the other's batch
  is saved. Reused for the same reason as `_ReadsInto`'s buffer (fresh pages are zeroed on first touch)."""

  ALIGN = 64

  def __init__(self, batch_bytes: int, largest: int):
    self.size = max(batch_bytes, largest)
    self._slabs = [host_buffer(self.size), host_buffer(self.size)]
    self._which, self._used = 0, 0

  def fits(self, shape, dtype) -> bool:
    return self.fits_all([shape], [dtype])

  def fits_all(self, shapes, dtypes) -> bool:
    used = self._used
    for shape, dtype in zip(shapes, dtypes, strict=True):
      used += self._aligned(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return used <= self.size

  def _aligned(self, nbytes: int) -> int:
    return -(-nbytes // self.ALIGN) * self.ALIGN

  def take(self, shape, dtype) -> np.ndarray:
    """An uninitialised contiguous array in the current slab (`fits` was checked)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    out = self._slabs[self._which][self._used : self._used + nbytes].view(dtype).reshape(shape)
    self._used += self._aligned(nbytes)
    return out

  def put(self, value: np.ndarray, shape, dtype) -> np.ndarray:
    """A contiguous copy of `value` in `dtype`, in the current slab (`fits` was checked)."""
    dtype = np.dtype(dtype)
    out = self.take(shape, dtype)
    if value.dtype == dtype and dtype.itemsize == 2:
      # As 16-bit integers: numpy copies a strided bfloat16 array element by element through ml_dtypes'
      # generic copy (perf: 6% of from-hf's CPU time), an integer one with its fast strided loops.
      copy_tiled(out.view(np.uint16), value.view(np.uint16))
    else:
      copy_tiled(out, value)
    return out

  def swap(self) -> None:
    self._which, self._used = 1 - self._which, 0


def convert_hf_to_checkpoint(
  path: str | Path,
  out: str | Path,
  dtype: str = AUTO,
  progress: bool = False,
  buffer_bytes: int = 256 << 20,
  compress: bool = False,
) -> ModelConfig:
  """Streams a Hugging Face directory into an orbax parameter checkpoint at `out` (`out/state`),
  one leaf at a time (orbax partial saves), in the unscanned layout (one leaf per layer), so host
  memory stays near one tensor whatever the model size. `dtype` "auto" keeps each tensor's dtype.
  The source's config.json and generation_config.json are kept beside it (`HF_CONFIG`,
  `HF_GENERATION_CONFIG`) for to-hf. Returns the model config (scan_layers False);
  `checkpoint.restore_params` re-stacks the layers for a scanned model. `compress`: zstd, as orbax does
  by default (bf16 weights shrink ~23%; on 2 cores it made from-hf 1.6× slower and to-hf slower too)."""

  path, out = Path(path), Path(out).absolute()
  _check_dtype(dtype)
  cfg, prefix = _config_of(path, {"scan_layers": False})
  source = SafetensorsDir(path)
  try:
    by_leaf = _entries_by_leaf(cfg, prefix)
    _check_all_consumed(source, by_leaf)
    cfg, leaf_dtypes = _with_dtypes(cfg, source, by_leaf, dtype, None)
    _, flat = _abstract_leaves(cfg, by_leaf)
    bar = _progress(progress, path)
    order = list(dict.fromkeys(e.hf_name for ents in by_leaf.values() for e in ents))
    # Steps: units of leaves read straight into the slab (`_scatter_unit`), or one leaf at a time.
    steps, buffered, slab_bytes = _plan_steps(cfg, source, by_leaf, flat, leaf_dtypes, order, buffer_bytes)
    reads = _ReadsInto(source, order, ahead_bytes=2 * buffer_bytes, buffered=buffered)
    slabs = _Slabs(buffer_bytes, slab_bytes)
    # Reading and saving overlap: one batch is saved on a second thread while the next is read into the
    # other slab (each orbax partial save is synchronous). Memory: the two slabs and the read buffer.
    saver = ThreadPoolExecutor(1, thread_name_prefix="from-hf-save")
    saving = None
    pending: dict = {}

    def save(batch):
      ocp1.partial.save(out, {"params": nnx.from_flat_state(batch)})
      _release_freed_memory()  # orbax's and tensorstore's own buffers
      # The files just written (orbax writes a partial save beside `out`, in `<out>.partial_save`, until
      # finalize), synced and dropped from the page cache: their pages are reused by the next save.
      for written in out.parent.glob(f"{glob.escape(out.name)}.partial_save*"):
        drop_cached(written)

    def flush():
      nonlocal saving
      if saving is not None:
        saving.result()  # the other slab is free again
      # In the caller's context: orbax options (an `ocp.Context`) are context variables.
      saving = saver.submit(contextvars.copy_context().run, save, dict(pending)) if pending else None
      pending.clear()
      slabs.swap()

    options = ocp1.Context()
    options.array_options.saving.use_compression = compress
    # Chunks of <= 64 MiB: to-hf's reads (and train.init_from's) copy chunks on several threads; one
    # 256 MiB chunk per half of gate_up made to-hf 7.5-9.7 s instead of 5.9-6.1 s (benchmark, 2 runs each).
    options.array_options.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    # No deep copy of what is saved (orbax's guard against the caller changing an array during an
    # async save): a slab is written again only after its partial save has returned.
    options.memory_options.deepcopy_host_arrays = False
    # Data files of ~32 MiB instead of one per partial save: tensorstore writes (and fsyncs) several
    # files at once, where one file was written and synced by one thread (from-hf 10.6-13.2 s ->
    # 6.9-9.0 s on the benchmark's checkpoint, alternating runs).
    options.array_options.saving.ocdbt_target_data_file_size = DATA_FILE_BYTES
    with options:  # orbax reads its options from the context
      try:
        for scatter, unit in steps:
          if scatter:
            shapes = [flat[lf].get_value().shape for lf, _ in unit]
            if not slabs.fits_all(shapes, [leaf_dtypes[lf] for lf, _ in unit]):
              flush()
            views = [slabs.take(shape, leaf_dtypes[lf]) for shape, (lf, _) in zip(shapes, unit, strict=True)]
            name = unit[0][1][0].hf_name
            reads.read_scatter(name, _scatter_pieces(views))
            if bar is not None:
              bar.update(source.nbytes(name))
            for view, (lf, _) in zip(views, unit, strict=True):
              pending[lf] = flat[lf].replace(view)
            continue
          ((leaf, leaf_entries),) = unit
          var = flat[leaf]
          target = var.get_value()
          value = _leaf_value(cfg, reads, leaf_entries, target, leaf_dtypes[leaf], bar)
          # Leaves are saved in batches of up to `buffer_bytes` (each orbax partial save costs a
          # metadata round trip); one leaf larger than that is saved alone.
          if not slabs.fits(target.shape, leaf_dtypes[leaf]):
            flush()
          # Contiguous in the slab, on the reading thread: tensorstore's copy of a strided view (a
          # transpose, half of gate_up) into its chunks was the slowest part of a save (~1 s per 256 MiB).
          pending[leaf] = var.replace(slabs.put(value, target.shape, leaf_dtypes[leaf]))
          del value
        flush()
        if saving is not None:
          saving.result()  # the last batch
      finally:
        saver.shutdown(wait=True)
        if bar is not None:
          bar.close()
      ocp1.partial.finalize(out)
  finally:
    source.close()
  keep_source_configs(path, out)
  return cfg


def keep_source_configs(hf_dir: Path, dst: Path) -> None:
  """Copies an HF directory's config.json and generation_config.json (if any) into `dst` under our names."""
  for src_name, dst_name in (("config.json", HF_CONFIG), ("generation_config.json", HF_GENERATION_CONFIG)):
    if (Path(hf_dir) / src_name).is_file():
      shutil.copyfile(Path(hf_dir) / src_name, Path(dst) / dst_name)


class _StateDictSource:
  """A torch state dict (name → tensor) read like a checkpoint directory."""

  def __init__(self, state_dict: dict):
    self.sd = state_dict
    self.path = "state_dict"

  def keys(self) -> set[str]:
    return set(self.sd)

  def get(self, name: str) -> np.ndarray:
    if name not in self.sd:
      raise ConversionError(f"{name}: missing from the state dict")
    t = self.sd[name].detach().cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: reinterpret the bits
      import torch

      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_torch_state_dict(state_dict: dict, config: ModelConfig) -> Llama4:
  """Our model from an in-memory HF Llama4 state dict (`hf_model.state_dict()`) and our config
  (e.g. `from_hf_config(hf_model.config.to_dict(), param_dtype=...)`), in the config's dtypes."""
  prefix = "language_model." if config.vision is not None else ""
  return _assemble(config, _StateDictSource(state_dict), prefix, config.param_dtype, config.dtype)


def _expected_hf_shape(entry, cfg, ours_shape) -> tuple[int, ...]:
  """The HF shape that would map to `ours_shape` (the inverse transform traced on shapes only)."""
  shape = jax.eval_shape(lambda a: entry.rule.to_hf(a, cfg), jax.ShapeDtypeStruct(ours_shape, np.float32)).shape
  if entry.rule.part is not None:
    shape = (*shape[:-1], shape[-1] * entry.rule.part[1])
  return tuple(shape)


def _shape_ok(raw: np.ndarray, entry, cfg, ours_shape) -> bool:
  return tuple(raw.shape) == _expected_hf_shape(entry, cfg, ours_shape)
