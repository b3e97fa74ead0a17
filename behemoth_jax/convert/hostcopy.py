"""Host buffers, layout-changing copies and page-cache hygiene for the streaming conversions.

Measured on this project's 2-core virtual machine (benchmarks/convert.py, docs/PERFORMANCE.md): memory
the guest has not touched lately is faulted in from the host page by page, which made fresh buffers and
a fresh page cache the largest costs of a conversion, ahead of the copies themselves; and numpy copies
a transposed view element by element a row apart, at a fraction of memory speed.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

BAND = 64  # lines per band of a transposing copy (see copy_tiled)


def host_buffer(nbytes: int) -> np.ndarray:
  """A uint8 host buffer of `nbytes`, page-aligned (as O_DIRECT needs), in ordinary 4 KiB pages. Why not
  np.empty: numpy asks for transparent huge pages on large arrays, and the kernel zeroing (or first
  compacting memory for) 2 MiB pages as they were first touched made a 256 MiB buffer take 0.04-2.2 s
  to fill the first time (perf: 15-23% of from-hf's CPU in clear_page); here 0.1 s. Pages are mapped as
  touched (mapping all at once, MAP_POPULATE, added to-hf's peak memory the parts it never uses)."""
  flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
  return np.frombuffer(mmap.mmap(-1, max(nbytes, 1), flags=flags), np.uint8)[:nbytes]


def drop_cached(path: str | Path) -> None:
  """Syncs a written file (or every file under a directory) and asks the kernel to drop its pages from
  the page cache. Why: a conversion writes each byte once, and pages left cached are memory the kernel
  must find afresh for the next write. Measured here, 2 GiB written in 64 MiB pieces: 0.25 GB/s and 7.4 s
  of CPU left cached, 1.5 GB/s and 0.6 s synced and dropped every 64-256 MiB (pages reused at once)."""
  path = Path(path)
  for f in path.rglob("*") if path.is_dir() else [path]:
    if not f.is_file():
      continue
    try:
      fd = os.open(f, os.O_RDONLY)
    except OSError:  # removed meanwhile (a temporary file renamed away): nothing to drop
      continue
    try:
      os.fdatasync(fd)  # dirty pages are not dropped; written once, they must reach the disk anyway
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _as_2d(a: np.ndarray, k: int) -> np.ndarray | None:
  """`a` as [prod(shape[:k]), prod(shape[k:])] without a copy, or None where that needs one."""
  view = a.view()
  try:
    view.shape = (int(np.prod(a.shape[:k], dtype=np.int64)), int(np.prod(a.shape[k:], dtype=np.int64)))
  except AttributeError:  # numpy refuses to reshape in place when the strides do not allow it
    return None
  return view


def _rows_fast(a: np.ndarray) -> bool:
  return a.strides[1] == a.itemsize


def _cols_fast(a: np.ndarray) -> bool:
  return a.strides[0] == a.itemsize and a.strides[1] != a.itemsize


def transposes(a: np.ndarray) -> bool:
  """Whether `a` is laid out by columns when seen as 2D at some split of its axes (a transposed view)."""
  for k in range(1, a.ndim):
    a2 = _as_2d(a, k)
    if a2 is not None and min(a2.shape) >= 2 and _cols_fast(a2):
      return True
  return False


def transposed_pair(out: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """2D views (o, v) of two arrays of one shape where one is laid out by rows and the other by columns
  (an HF [out, in] weight and our [in, out], heads split or not), or None."""
  for k in range(1, out.ndim):
    o2, v2 = _as_2d(out, k), _as_2d(value, k)
    if o2 is None or v2 is None or min(o2.shape) < 2:
      continue
    if (_rows_fast(o2) and _cols_fast(v2)) or (_cols_fast(o2) and _rows_fast(v2)):
      return o2, v2
  return None


def copy_tiled(out: np.ndarray, value: np.ndarray) -> None:
  """out[...] = value (any dtype cast), in bands of BAND lines of `out`'s fast axis when one array is a
  transposed view of the other's layout. Why: numpy walks the copy in the destination's order, so each
  element read from a transposed source is a row (often a page) away from the last; in a band, the
  source lines stay in cache while the destination's rows are walked. Measured on bfloat16 weights of
  five shapes ([2048, 2048] to [2048, 32000]), both ways: whole 0.2-0.3 GB/s, bands of 64 1.0-3.2
  (bands of 256: 0.5-2.3; 128 × 128 tiles 0.8-3.7, but ~8× the numpy calls, and the many small calls
  starved from-hf's saving thread of the GIL: +0.25 GiB peak memory, measured)."""
  pair = transposed_pair(out, value)
  if pair is None:
    np.copyto(out, value, casting="unsafe")
    return
  o2, v2 = pair
  if _rows_fast(o2):
    for j in range(0, o2.shape[1], BAND):
      np.copyto(o2[:, j : j + BAND], v2[:, j : j + BAND], casting="unsafe")
  else:
    for i in range(0, o2.shape[0], BAND):
      np.copyto(o2[i : i + BAND], v2[i : i + BAND], casting="unsafe")
