"""Hugging Face `save_pretrained` directory → our orbax parameter checkpoint, streamed (behemoth-convert
from-hf): leaf by leaf in batches of orbax partial saves, reading and saving overlapped, host memory
bounded by 2 × the largest tensor + 1 GiB whatever the model. Split from convert/hf.py, which reads a
directory into an in-memory model and owns the checks both share.
"""

from __future__ import annotations

import contextvars
import ctypes
import glob
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orbax.checkpoint.experimental.v1 as ocp1
from flax import nnx

from behemoth_jax.config import ModelConfig
from behemoth_jax.convert.hf import (
  AUTO,
  SafetensorsDir,
  _abstract_leaves,
  _check_all_consumed,
  _check_dtype,
  _config_of,
  _entries_by_leaf,
  _leaf_value,
  _progress,
  _with_dtypes,
)
from behemoth_jax.convert.hostcopy import copy_tiled, drop_cached, host_buffer
from behemoth_jax.convert.keymap import same
from behemoth_jax.train.checkpoint import CHUNK_BYTES, HF_CONFIG, HF_GENERATION_CONFIG

DATA_FILE_BYTES = 32 << 20  # orbax's target size of an OCDBT data file


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


def _scatter_unit(source, leaves: list, i: int, flat: dict, leaf_dtypes: dict) -> list | None:
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


def _plan_steps(source, by_leaf: dict, flat: dict, leaf_dtypes: dict, order: list, buffer_bytes: int):
  """([(scatter?, [(leaf, entries)])], names of tensors read whole into the read buffer, slab bytes).
  A fused tensor's halves are scattered into their two leaves together, which needs slabs of the whole
  tensor; where that with the read buffer (the largest tensor still read whole) would exceed the
  memory bound, 2 × the largest tensor + 1 GiB, fused tensors are read whole and split (the read
  buffer then holds them; each half's slab half as large)."""
  leaves, largest = list(by_leaf.items()), max(source.nbytes(n) for n in order)
  for fused in (True, False):
    steps, i = [], 0
    while i < len(leaves):
      unit = _scatter_unit(source, leaves, i, flat, leaf_dtypes)
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
    steps, buffered, slab_bytes = _plan_steps(source, by_leaf, flat, leaf_dtypes, order, buffer_bytes)
    reads = _ReadsInto(source, order, ahead_bytes=2 * buffer_bytes, buffered=buffered)
    slabs = _Slabs(buffer_bytes, slab_bytes)
    # Reading and saving overlap: one batch is saved on a second thread while the next is read into the
    # other slab (each orbax partial save is synchronous). Memory: the two slabs and the read buffer.
    saver = ThreadPoolExecutor(1, thread_name_prefix="from-hf-save")
    saving = None
    pending: dict = {}

    dropped: set[Path] = set()

    def save(batch):
      ocp1.partial.save(out, {"params": nnx.from_flat_state(batch)})
      _release_freed_memory()  # orbax's and tensorstore's own buffers
      # The files just written (orbax writes a partial save beside `out`, in `<out>.partial_save`, until
      # finalize), synced and dropped from the page cache: their pages are reused by the next save. Each
      # file once (data files are immutable once written): a real model writes ~100k of them.
      for written in out.parent.glob(f"{glob.escape(out.name)}.partial_save*/**/*"):
        if written not in dropped and written.is_file():
          drop_cached(written)
          dropped.add(written)

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
