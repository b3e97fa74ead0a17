"""Offline teacher scores as compact binary records (`generate --score K --out SCORES.array_record`).

One record per scored document, in an ArrayRecord file (random access by index, so grain's pipeline
reads it with packing, a per-epoch shuffle and exact resume, like any other source):

    MAGIC (8 bytes) | header length (uint32, little-endian) | header (UTF-8 JSON)
    | ids int32 [n] | topk_ids int32 [n, k] | topk_logprobs [n, k] in bfloat16 or float16 (little-endian)

The header is {"n", "k", "logprob_dtype", "fields": the input record's other JSON fields}. A (token,
entry) pair costs 4 + 2 bytes before compression and the token ids 4/k more; ArrayRecord's zstd, one
record per chunk (each record decompresses alone), brings that under 6 (the top byte of an id below 2^24
is zero). JSONL with 5-decimal floats costs ~16 bytes per pair. Why not safetensors or npz per record:
safetensors' numpy API has no bfloat16 and npz adds a zip directory per record; the layout above is
as small as the data and parsed with numpy alone (no pickle).
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np

from behemoth_jax.data.errors import DataError

MAGIC = b"BJSCORE1"
LOGPROB_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
# One record per ArrayRecord chunk: reading document i decompresses document i only.
WRITER_OPTIONS = "group_size:1,zstd:3"
SUFFIXES = (".array_record", ".arrayrecord")


def encode(fields: dict, ids: np.ndarray, topk_ids: np.ndarray, topk_logprobs: np.ndarray, dtype: str) -> bytes:
  """The record of one scored document: `fields` (JSON-able), ids [n], top-k ids and log-probs [n, k]."""
  ids = np.ascontiguousarray(ids, "<i4")
  topk_ids = np.ascontiguousarray(topk_ids, "<i4")
  n, k = topk_ids.shape
  assert ids.shape == (n,) and np.shape(topk_logprobs) == (n, k), (ids.shape, topk_ids.shape)
  logp = np.ascontiguousarray(np.asarray(topk_logprobs, np.float32).astype(LOGPROB_DTYPES[dtype]))
  header = json.dumps({"n": n, "k": k, "logprob_dtype": dtype, "fields": fields}).encode()
  return b"".join([MAGIC, struct.pack("<I", len(header)), header, ids.tobytes(), topk_ids.tobytes(), logp.tobytes()])


def is_score_record(data: bytes) -> bool:
  return data[: len(MAGIC)] == MAGIC


def decode(data: bytes, where: str) -> dict:
  """{**fields, "ids": int32 [n], "topk_ids": int32 [n, k], "topk_logprobs": float32 [n, k]}; a
  DataError naming `where` if the bytes are not a whole record."""
  try:
    (size,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4 + size
    header = json.loads(data[len(MAGIC) + 4 : start])
    n, k, dtype = int(header["n"]), int(header["k"]), LOGPROB_DTYPES[header["logprob_dtype"]]
    want = start + 4 * n + 4 * n * k + dtype.itemsize * n * k
    if len(data) != want:
      raise ValueError(f"{len(data)} bytes, the header describes {want}")
    ids = np.frombuffer(data, "<i4", n, start).astype(np.int32)
    top = np.frombuffer(data, "<i4", n * k, start + 4 * n).astype(np.int32).reshape(n, k)
    logp = np.frombuffer(data, dtype, n * k, start + 4 * n * (k + 1)).astype(np.float32).reshape(n, k)
  except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise DataError(f"{where}: not a valid score record ({e})") from None
  return {**header["fields"], "ids": ids, "topk_ids": top, "topk_logprobs": logp}


class Writer:
  """Score records appended to an ArrayRecord file (closed on `close` or leaving a `with` block)."""

  def __init__(self, path: str, dtype: str = "bfloat16"):
    from array_record.python.array_record_module import ArrayRecordWriter  # installed with grain

    if dtype not in LOGPROB_DTYPES:
      raise DataError(f"--score-dtype: must be one of {tuple(LOGPROB_DTYPES)}, got {dtype!r}")
    self.dtype = dtype
    self._writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)

  def write(self, fields: dict, ids, topk_ids, topk_logprobs) -> int:
    """Appends one document; returns its record's size in bytes (before compression)."""
    data = encode(fields, ids, topk_ids, topk_logprobs, self.dtype)
    self._writer.write(data)
    return len(data)

  def close(self) -> None:
    self._writer.close()

  def __enter__(self) -> Writer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
