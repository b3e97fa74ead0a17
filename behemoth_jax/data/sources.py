"""Document sources: random access to the documents (strings) of the built-in corpus or of files.

`open_source(source, format, text_field)` gives a `Corpus`: `len(corpus)` documents, `corpus[i]` the
i-th as a string, `corpus.where(i)` its file and line / record for messages. It satisfies grain's
random-access data source protocol (`__len__`, `__getitem__`), so `grain.MapDataset.source` accepts it.

Random access (rather than grain's sequential `ParquetIterDataset`) is what makes the index-based
held-out split, per-process sharding and a global per-epoch shuffle exact and checkpointable.

Formats (`auto` picks by extension):
  text         .txt .md                  the whole file is one document
  jsonl        .jsonl .json              one JSON object per line, the document is field `text_field`
  parquet      .parquet                  column `text_field`; row groups are read when first needed
  arrayrecord  .array_record .arrayrecord  grain's ArrayRecordDataSource; a record is a UTF-8 JSON object
                                         with `text_field`, or else raw UTF-8 text

Cheap checks (path exists, file not empty, Parquet column present) run when the source is opened;
content checks (UTF-8, JSON, field) run when a document is read, so opening a large corpus does not
read all of it. Either way the error is a one-line `DataError` naming the file (and line / record).
"""

from __future__ import annotations

import glob as globlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from pydoc_data import topics
from typing import Any

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from behemoth_jax.data import scores
from behemoth_jax.data.errors import DataError

FORMATS = ("text", "jsonl", "parquet", "arrayrecord")
EXTENSIONS = {
  ".txt": "text",
  ".md": "text",
  ".jsonl": "jsonl",
  ".json": "jsonl",
  ".parquet": "parquet",
  ".array_record": "arrayrecord",
  ".arrayrecord": "arrayrecord",
}


def builtin_corpus() -> list[str]:
  """CPython's `pydoc_data` topics (~465 KB of English documentation, 79 documents), sorted by key."""
  return [topics.topics[k] for k in sorted(topics.topics)]


# --- One file's documents ---------------------------------------------------------------------
class _FileDocs:
  """Documents of one file. Subclasses open handles lazily so that a pickled copy (grain worker
  processes) opens its own."""

  format = ""

  def __init__(self, path: str, text_field: str):
    self.path = path
    self.text_field = text_field
    self._lock = threading.Lock()  # grain reads with several threads

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, i: int) -> str:
    raise NotImplementedError

  def where(self, i: int) -> str:
    return self.path

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_lock"] = None
    for key in self._handles():
      state[key] = None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _handles(self) -> tuple[str, ...]:
    return ()

  def _decode(self, data: bytes, where: str) -> str:
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r})") from None

  def _from_json(self, text: str, where: str, *, required: bool = True) -> str | None:
    """The `text_field` of a JSON object; None when not required and `text` is not a JSON object."""
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      if not required:
        return None
      raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      if not required:
        return None
      raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if self.text_field not in obj:
      keys = ", ".join(list(obj)[:8])
      raise DataError(f"{where}: missing field {self.text_field!r} (fields: {keys})")
    value = obj[self.text_field]
    if not isinstance(value, str):
      raise DataError(f"{where}: field {self.text_field!r} is {type(value).__name__}, expected a string")
    return value


class _TextFile(_FileDocs):
  format = "text"

  def __len__(self) -> int:
    return 1

  def __getitem__(self, i: int) -> str:
    return self._decode(Path(self.path).read_bytes(), self.path)


class _JsonlFile(_FileDocs):
  """Line offsets are indexed once at open (a byte scan, no parsing); a read is one `pread`."""

  format = "jsonl"

  def __init__(self, path: str, text_field: str):
    super().__init__(path, text_field)
    self._fd: int | None = None
    self.starts_N, self.ends_N, self.lines_N = _index_lines(path)
    if len(self.starts_N) == 0:
      raise DataError(f"{path}: empty file (no non-blank lines)")

  def _handles(self) -> tuple[str, ...]:
    return ("_fd",)

  def __len__(self) -> int:
    return len(self.starts_N)

  def where(self, i: int) -> str:
    return f"{self.path}:{int(self.lines_N[i])}"

  def _line(self, i: int) -> tuple[str, str]:
    """(text of line i, where) — decoded, not parsed."""
    if self._fd is None:
      with self._lock:
        if self._fd is None:
          self._fd = os.open(self.path, os.O_RDONLY)
    start, end = int(self.starts_N[i]), int(self.ends_N[i])
    # pread: no shared file position, so concurrent reads from grain's threads cannot interfere.
    where = self.where(i)
    return self._decode(os.pread(self._fd, end - start, start), where), where

  def __getitem__(self, i: int) -> str:
    text, where = self._line(i)
    return self._from_json(text, where)

  def record(self, i: int) -> dict:
    """The whole JSON object of line i (multimodal and offline-distillation records)."""
    text, where = self._line(i)
    try:
      obj = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)


def _index_lines(path: str, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Byte [start, end) and 1-based line number of every non-blank line (CR/LF stripped)."""
  newlines = []
  size = 0
  with open(path, "rb") as f:
    while block := f.read(chunk):
      newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + size)
      size += len(block)
  nl_N = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
  starts_N = np.concatenate([[0], nl_N + 1]).astype(np.int64)
  ends_N = np.concatenate([nl_N, [size]]).astype(np.int64)
  lines_N = np.arange(1, len(starts_N) + 1, dtype=np.int64)
  # Strip a CR before each LF (Windows line ends), then drop empty lines (incl. the one after the
  # final newline): blank lines separate nothing in JSONL and are not documents.
  with open(path, "rb") as f:
    mm = np.memmap(f, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    has_cr = ends_N > starts_N
    has_cr[has_cr] = mm[ends_N[has_cr] - 1] == ord("\r")
    ends_N = ends_N - has_cr
    del mm
  keep = ends_N > starts_N
  return starts_N[keep], ends_N[keep], lines_N[keep]


class _ParquetFile(_FileDocs):
  """Column `text_field`; a row group is decoded when one of its rows is first read, and the most
  recently used few are kept. The train shuffle is global, so on a file of many row groups most reads
  decode a whole row group: for large corpora prefer ArrayRecord (per-record random access)."""

  format = "parquet"
  cache_row_groups = 4

  def __init__(self, path: str, text_field: str):
    super().__init__(path, text_field)

    self._file = None
    self._cache: OrderedDict[int, list] = OrderedDict()
    meta = self._open().metadata
    schema = self._open().schema_arrow
    if meta.num_rows == 0:
      raise DataError(f"{path}: empty file (0 rows)")
    if text_field not in schema.names:
      raise DataError(f"{path}: missing field {text_field!r} (columns: {', '.join(schema.names[:8])})")
    kind = schema.field(text_field).type
    if not (
      pa.types.is_string(kind)
      or pa.types.is_large_string(kind)
      or pa.types.is_binary(kind)
      or pa.types.is_large_binary(kind)
    ):
      raise DataError(f"{path}: field {text_field!r} has type {kind}, expected a string")
    rows_G = np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], np.int64)
    self.offsets_G = np.concatenate([[0], np.cumsum(rows_G)])

  def _handles(self) -> tuple[str, ...]:
    return ("_file", "_cache")

  def __setstate__(self, state: dict[str, Any]) -> None:
    super().__setstate__(state)
    self._cache = OrderedDict()

  def _open(self):
    if self._file is None:
      try:
        self._file = pq.ParquetFile(self.path)
      except Exception as e:  # pyarrow raises several types for a damaged or non-Parquet file
        raise DataError(f"{self.path}: not a valid Parquet file ({e})") from None
    return self._file

  def __len__(self) -> int:
    return int(self.offsets_G[-1])

  def where(self, i: int) -> str:
    return f"{self.path}: row {i}"

  def __getitem__(self, i: int) -> str:
    g = int(np.searchsorted(self.offsets_G, i, side="right") - 1)
    with self._lock:  # pyarrow file objects are not meant for concurrent reads
      rows = self._cache.get(g)
      if rows is None:
        table = self._open().read_row_group(g, columns=[self.text_field])
        # Raw buffers, decoded per row below, so bad UTF-8 is reported with its row.
        rows = table.column(0).cast(_binary_type(table.column(0).type)).to_pylist()
        self._cache[g] = rows
        if len(self._cache) > self.cache_row_groups:
          self._cache.popitem(last=False)
      else:
        self._cache.move_to_end(g)
    value = rows[i - int(self.offsets_G[g])]
    if value is None:
      raise DataError(f"{self.where(i)}: field {self.text_field!r} is null")
    return self._decode(value, self.where(i))


def _binary_type(kind):
  large = pa.types.is_large_string(kind) or pa.types.is_large_binary(kind)
  return pa.large_binary() if large else pa.binary()


class _ArrayRecordFile(_FileDocs):
  """grain's `ArrayRecordDataSource` for one file (one per file so that errors can name it)."""

  format = "arrayrecord"

  def __init__(self, path: str, text_field: str):
    super().__init__(path, text_field)

    try:
      self._source = grain.sources.ArrayRecordDataSource([path])
      self._len = len(self._source)
    except Exception as e:  # array_record raises RuntimeError / ValueError for non-ArrayRecord files
      raise DataError(f"{path}: not a valid ArrayRecord file ({e})") from None
    if self._len == 0:
      raise DataError(f"{path}: empty file (0 records)")

  def __len__(self) -> int:
    return self._len

  def where(self, i: int) -> str:
    return f"{self.path}: record {i}"

  def __getitem__(self, i: int) -> str:
    where = self.where(i)
    data = self._source[i]
    if scores.is_score_record(data):  # `generate --score` output: the scored document's text field
      value = scores.decode(data, where).get(self.text_field)
      if not isinstance(value, str):
        raise DataError(f"{where}: score record without a string field {self.text_field!r}")
      return value
    text = self._decode(data, where)
    if text.lstrip().startswith("{"):
      # Looks like JSON: a JSON object must carry the field; text that merely starts with a brace
      # but does not parse as an object is raw text.
      value = self._from_json(text, where, required=False)
      if value is not None:
        return value
    return text

  def record(self, i: int) -> dict:
    """Record i as a dict: a score record (`data/scores.py`: arrays included) or a JSON object."""
    where, data = self.where(i), self._source[i]
    if scores.is_score_record(data):
      return scores.decode(data, where)
    try:
      obj = json.loads(self._decode(data, where))
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


_READERS = {"text": _TextFile, "jsonl": _JsonlFile, "parquet": _ParquetFile, "arrayrecord": _ArrayRecordFile}


# --- The corpus -----------------------------------------------------------------------------
class Corpus:
  """All documents of a source, indexed 0..len-1 in a fixed order (files sorted by path)."""

  def __init__(self, name: str, files: list[_FileDocs] | None = None, texts: list[str] | None = None):
    self.name = name
    self.files = files or []
    self._texts = texts
    counts = [len(f) for f in self.files] if texts is None else [len(texts)]
    self.offsets_F = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.offsets_F[-1])

  def _locate(self, i: int) -> tuple[int, int]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"document {i} out of range [0, {len(self)})")
    f = int(np.searchsorted(self.offsets_F, i, side="right") - 1)
    return f, i - int(self.offsets_F[f])

  def __getitem__(self, i: int) -> str:
    if self._texts is not None:
      return self._texts[int(i)]
    f, j = self._locate(i)
    return self.files[f][j]

  def record(self, i: int) -> dict:
    """The JSON object of document i (JSONL sources only)."""
    f, j = (None, None) if self._texts is not None else self._locate(i)
    if f is None or not hasattr(self.files[f], "record"):
      raise DataError(f"{self.name}: records with fields are only read from .jsonl and ArrayRecord files")
    return self.files[f].record(j)

  def where(self, i: int) -> str:
    """The file (and line / record) of document i, for messages."""
    if self._texts is not None:
      return f"{self.name}[{int(i)}]"
    f, j = self._locate(i)
    return self.files[f].where(j)

  def __repr__(self) -> str:
    return f"Corpus({self.name!r}, {len(self)} documents in {max(len(self.files), 1)} file(s))"


def open_source(source: str, format: str = "auto", text_field: str = "text") -> Corpus:
  """The corpus of `source`: "builtin", a file, a directory (searched recursively) or a glob."""
  if format not in ("auto", *FORMATS):
    raise DataError(f"{source}: unknown format {format!r} (one of auto, {', '.join(FORMATS)})")
  if source == "builtin":
    return Corpus("builtin", texts=builtin_corpus())
  files = [_READERS[fmt](path, text_field) for path, fmt in _find_files(source, format)]
  return Corpus(source, files=files)


def _find_files(source: str, format: str) -> list[tuple[str, str]]:
  """(path, format) of every data file of `source`, sorted by path."""
  if any(c in source for c in "*?["):
    paths = sorted(p for p in globlib.glob(source, recursive=True) if os.path.isfile(p))
    if not paths:
      raise DataError(f"{source}: path not found (the glob matches no files)")
    named = True  # globbed files were chosen by the user: an unknown extension is an error
  elif os.path.isdir(source):
    paths = []
    for root, dirs, names in os.walk(source):
      dirs[:] = [d for d in dirs if not d.startswith(".")]
      paths += [os.path.join(root, n) for n in names if not n.startswith(".")]
    paths.sort()
    if format == "auto":  # a directory may hold other files (README, checksums): skip them
      paths = [p for p in paths if _extension(p) in EXTENSIONS]
    if not paths:
      raise DataError(f"{source}: no data files in directory (extensions: {', '.join(EXTENSIONS)})")
    named = False
  elif os.path.isfile(source):
    paths, named = [source], True
  else:
    raise DataError(f"{source}: path not found")
  out = []
  for path in paths:
    fmt = format
    if fmt == "auto":
      fmt = EXTENSIONS.get(_extension(path), "")
      if not fmt and named:
        raise DataError(f"{path}: cannot tell the format from the extension; set data.format ({', '.join(FORMATS)})")
    if os.path.getsize(path) == 0:
      raise DataError(f"{path}: empty file")
    out.append((path, fmt))
  return out


def _extension(path: str) -> str:
  return os.path.splitext(path)[1].lower()
