"""The training / evaluation input pipeline: documents → packed, sharded, checkpointable batches.

`make_iterator(data_cfg, tokenizer, split=..., seq_len=T, batch_size=B, ...)` yields dicts of numpy
arrays, each [B, T]:

  inputs       int32    token ids; padding is the tokenizer's pad id
  targets      int32    the next token of the same document (computed before packing, so a target
                        never crosses a document boundary)
  segment_ids  int32    1, 2, ... per document piece within a row; 0 = padding
  positions    int32    position within the document (see long documents below); 0 on padding
  loss_mask    float32  1 where `targets` is a real next token of the same document, else 0

Stages, all grain (`grain.MapDataset` up to reading, `grain.IterDataset` after):
  1. document indices of the split (held-out: a fixed hash of the index, independent of the seed);
  2. train: a global shuffle, reseeded every epoch (`shuffle` then `repeat`); held-out: file order;
  3. the order is dealt round-robin to S *streams* (document k of the order goes to stream k mod S);
     each stream, on its own:
  4. read + tokenize: [BOS] + tokens + [EOS]; documents of fewer than 2 tokens are skipped and counted;
  5. inputs = doc[:-1], targets = doc[1:], cut into pieces of at most T (`FlatMapIterDataset`);
  6. first-fit packing of the pieces into rows of T (`FirstFitPackIterDataset`), B/S rows per batch,
     padding of a last partial batch (`batch_and_pad`);
  7. the global batch is the streams' batches stacked in stream order; a process reads only the
     streams that overlap its rows [p·B/P, (p+1)·B/P) and keeps those rows; prefetch (threads, or
     `mp_prefetch` worker processes when data_cfg.worker_count > 0).

One global stream of batches, whatever the number of processes. The sequence of global batches is a
function of the data config, the seed, T, the global batch B and S only (S = `data.streams`; train
default: one stream per row, S = B; held-out: S = 1). Two processes assemble exactly the batches one
process makes, and a checkpoint's data state (each stream's grain state) resumes on another number of
processes: every stream continues where it stopped, so no document is lost or repeated — the resumed
run reads the very batches the uninterrupted run would have (tests/test_data.py checks 1 → 2 and
2 → 1). Why not grain's ElasticIterator: it refuses IterDataset stages, and packing is one. With
P > S processes several read the same stream (each keeps its rows): correct, at P/S times the reading.

Long documents: piece k of a document longer than T holds tokens [k*T, (k+1)*T) with positions
k*T ... (k+1)*T - 1, i.e. positions continue through the document (RoPE sees where in the document
the piece is), while the piece is its own segment (attention cannot reach the previous piece, which
is in another row or batch). Only a document's last piece can be shorter than T, so two pieces of one
document never share a row. Positions can therefore exceed T (up to the longest document's length).

State: `get_state()` is a JSON-serialisable dict (each stream's grain state, plus a fingerprint of
the arguments); `set_state` on a fresh iterator made with the same arguments continues with exactly
the same batches. It also takes the list of every process's states (a checkpoint's `data` item),
from which each process takes its streams, whatever number of processes saved them. A state saved
with different arguments is refused with a `DataError`. With `data.worker_count` > 0 grain's
multiprocessing state is per process: such a state resumes only on the same number of processes.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from typing import Any

import grain
import numpy as np
from absl import flags

from behemoth_jax.data.errors import DataError
from behemoth_jax.data.sources import Corpus, open_source
from behemoth_jax.data.tokenizer import Tokenizer

SPLITS = ("train", "heldout")
MIN_TOKENS = 2  # documents the tokenizer turns into fewer tokens are skipped (counted, not an error)
# First-fit packing fills this many rows at once (at least the batch size): more open rows leave a
# short piece more places to fit, so less padding; a checkpoint restore re-packs at most this many.
MIN_PACKING_BINS = 64
STATE_VERSION = 2  # 2: per-stream states (one global stream of batches)


def split_indices(num_documents: int, heldout_fraction: float, split: str) -> np.ndarray:
  """Sorted document indices of `split`. Held out: those whose hashed index falls below the fraction.

  The hash is of the index only (not of the seed), so the held-out set stays fixed when the shuffle
  seed changes; train and held-out are disjoint and together cover every document. With two or more
  documents each split gets at least one (a tiny corpus would otherwise have no held-out set).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  u_N = _hash_unit(np.arange(num_documents, dtype=np.uint64))
  heldout_N = u_N < heldout_fraction
  if num_documents >= 2:
    heldout_N[np.argmin(u_N)] = True
    heldout_N[np.argmax(u_N)] = False
  return np.flatnonzero(heldout_N if split == "heldout" else ~heldout_N).astype(np.int64)


def _hash_unit(x_N: np.ndarray) -> np.ndarray:
  """SplitMix64 of each index, mapped to [0, 1): a fixed, well-mixed function of the index."""
  with np.errstate(over="ignore"):  # the mixing relies on uint64 wrap-around
    z = x_N + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
  return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# --- Stages (module-level classes: grain pickles them into worker processes) ---------------------
class _ReadAndTokenize(grain.transforms.Map):
  """Document index → [BOS] + tokens + [EOS] (int32), or None when shorter than MIN_TOKENS."""

  def __init__(self, corpus: Corpus, tokenizer: Tokenizer):
    self.corpus = corpus
    self.tokenizer = tokenizer
    self.skipped = 0
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_lock": None}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def map(self, index: Any) -> np.ndarray | None:
    tokens = tokenize_document(self.corpus[int(index)], self.tokenizer)
    if tokens is None:
      with self._lock:  # grain runs this map in several threads
        self.skipped += 1
    return tokens


class _ReadScored(_ReadAndTokenize):
  """Record of `generate --score` → {doc: ids, topk_ids / topk_logp: [len, k]} (offline distillation)."""

  def __init__(self, corpus: Corpus, tokenizer: Tokenizer, k: int):
    super().__init__(corpus, tokenizer)
    self.k = k

  def map(self, index: Any) -> dict[str, np.ndarray] | None:
    rec, where = self.corpus.record(int(index)), self.corpus.where(int(index))
    try:
      ids = np.asarray(rec["ids"], np.int32)
      top_ids = np.asarray(rec["topk_ids"], np.int32)
      top_lp = np.asarray(rec["topk_logprobs"], np.float32)
    except KeyError as e:
      raise DataError(f"{where}: missing field {e.args[0]!r} (write records with `generate --score K`)") from None
    if top_ids.shape != top_lp.shape or top_ids.ndim != 2 or len(top_ids) != len(ids) or top_ids.shape[1] < self.k:
      raise DataError(
        f"{where}: topk_ids {top_ids.shape} / topk_logprobs {top_lp.shape} must be [len(ids) = "
        f"{len(ids)}, >= distill.topk = {self.k}]"
      )
    if len(ids) < MIN_TOKENS:
      with self._lock:
        self.skipped += 1
      return None
    return {"doc": ids, "topk_ids": top_ids[:, : self.k], "topk_logp": top_lp[:, : self.k]}


def tokenize_document(text: str, tokenizer: Tokenizer) -> np.ndarray | None:
  """[BOS] + tokens + [EOS] as int32 (without a special the tokenizer lacks); None if too short."""
  tokens = tokenizer.encode(text)
  if len(tokens) < MIN_TOKENS:
    return None
  parts = [tokens]
  if tokenizer.bos_id is not None:
    parts.insert(0, np.array([tokenizer.bos_id], np.int32))
  if tokenizer.eos_id is not None:
    parts.append(np.array([tokenizer.eos_id], np.int32))
  return np.concatenate(parts).astype(np.int32)


class _IsUsable(grain.transforms.Filter):
  def filter(self, element: np.ndarray | None) -> bool:
    return element is not None


class _SplitIntoPieces(grain.experimental.FlatMapTransform):
  """doc → pieces {inputs, targets, positions} of at most seq_len; targets shifted BEFORE cutting."""

  max_fan_out = 2**31 - 1  # only used by MapDataset flat maps; the IterDataset one has no limit

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, doc: np.ndarray | dict) -> list[dict[str, np.ndarray]]:
    extra = {}
    if isinstance(doc, dict):  # scored record: the teacher's top-k for each input position
      extra = {"teacher_topk_ids": doc["topk_ids"][:-1], "teacher_topk_logp": doc["topk_logp"][:-1]}
      doc = doc["doc"]
    inputs, targets = doc[:-1], doc[1:]
    positions = np.arange(len(inputs), dtype=np.int32)
    t = self.seq_len
    return [
      {
        "inputs": inputs[s : s + t],
        "targets": targets[s : s + t],
        "positions": positions[s : s + t],
        **{k: v[s : s + t] for k, v in extra.items()},
      }
      for s in range(0, len(inputs), t)
    ]


class _Finalize(grain.transforms.Map):
  """Packed batch (grain's key names) → the batch dict of this module."""

  def __init__(self, pad_id: int):
    self.pad_id = pad_id

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids_BT = batch["inputs_segment_ids"].astype(np.int32)
    real_BT = segment_ids_BT > 0
    # Rows added by batch_and_pad are all zeros; set every padding slot to the pad id alike.
    extra = {k: batch[k] for k in ("teacher_topk_ids", "teacher_topk_logp") if k in batch}
    return {
      **extra,
      "inputs": np.where(real_BT, batch["inputs"], self.pad_id).astype(np.int32),
      "targets": np.where(real_BT, batch["targets"], self.pad_id).astype(np.int32),
      "segment_ids": segment_ids_BT,
      "positions": np.where(real_BT, batch["positions"], 0).astype(np.int32),
      # Every real slot's target is its document's next token (shifted before packing).
      "loss_mask": real_BT.astype(np.float32),
    }


# --- The iterator ---------------------------------------------------------------------------
class _StreamRows(grain.IterDataset):
  """This process's rows of the global batch: rows [lo, hi) of each overlapping stream's batch,
  stacked in stream order. A finite stream that has ended contributes empty (padding) rows; the
  iterator ends when all of them have. State: {stream id: that stream's grain state}."""

  def __init__(self, streams: dict[int, grain.IterDataset], rows: dict[int, tuple[int, int]], empty):
    super().__init__(list(streams.values()))
    self.ids, self.rows, self.empty = list(streams), rows, empty

  def __iter__(self) -> _StreamRowsIterator:
    return _StreamRowsIterator(self)


class _StreamRowsIterator(grain.DatasetIterator):
  def __init__(self, ds: _StreamRows):
    super().__init__([p.__iter__() for p in ds.parents])
    self._ds = ds
    self._ended = [False] * len(ds.ids)

  def __next__(self) -> dict[str, np.ndarray]:
    parts = []
    for i, (sid, it) in enumerate(zip(self._ds.ids, self._parents, strict=True)):
      lo, hi = self._ds.rows[sid]
      batch = None
      if not self._ended[i]:
        try:
          batch = next(it)
        except StopIteration:
          self._ended[i] = True
      parts.append(self._ds.empty(hi - lo) if batch is None else {k: v[lo:hi] for k, v in batch.items()})
    if all(self._ended):
      raise StopIteration
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]

  def get_state(self) -> dict[str, Any]:
    return {
      str(sid): {"grain": it.get_state(), "ended": ended}
      for sid, it, ended in zip(self._ds.ids, self._parents, self._ended, strict=True)
    }

  def set_state(self, state: dict[str, Any]) -> None:
    for i, (sid, it) in enumerate(zip(self._ds.ids, self._parents, strict=True)):
      it.set_state(state[str(sid)]["grain"])
      self._ended[i] = bool(state[str(sid)]["ended"])


class DataIterator:
  """Iterator of batch dicts with grain's checkpointing (`get_state` / `set_state`)."""

  def __init__(
    self,
    dataset: grain.IterDataset,
    fingerprint: dict[str, Any],
    reader: _ReadAndTokenize,
    num_documents: int,
    streams: tuple[int, ...] | None = None,
  ):
    self._dataset = dataset
    self._it = iter(dataset)
    # Stop grain's prefetch thread / workers before interpreter teardown (grain's own __del__ then
    # fails noisily on already-cleared module globals).
    self._finalizer = weakref.finalize(self, _close, self._it)
    self._fingerprint = fingerprint
    self._reader = reader
    self.num_documents = num_documents  # documents of the split
    self.streams = streams  # the streams this process reads; None: one per-process grain state

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  @property
  def skipped_documents(self) -> int:
    """Documents skipped as shorter than MIN_TOKENS by reads in THIS process so far (read-ahead
    included; a document is counted each time an epoch reads it). With worker_count > 0 reading
    happens in worker processes and is not counted here; `count_usable_documents` gives exact numbers."""
    return self._reader.skipped

  def get_state(self) -> dict[str, Any]:
    key = "grain" if self.streams is None else "streams"
    return {"version": STATE_VERSION, "fingerprint": dict(self._fingerprint), key: self._it.get_state()}

  def set_state(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
    """Continues from `state` (this iterator's), or from a list of every process's states."""
    states = state if isinstance(state, list) else [state]
    if not states:
      raise DataError("data iterator state: empty")
    for st in states:
      if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
        raise DataError(
          f"data iterator state: expected version {STATE_VERSION}, got "
          f"{st.get('version') if isinstance(st, dict) else type(st).__name__}"
        )
      saved = st["fingerprint"]
      for key, value in self._fingerprint.items():
        if key in ("process_index", "process_count"):
          continue  # per-process states: this process's is picked below
        if saved.get(key) != value:
          raise DataError(f"data iterator state: saved with {key}={saved.get(key)!r}, this iterator has {value!r}")
    if self.streams is None:  # one grain state per process: only the same process count resumes
      where = {k: self._fingerprint.get(k) for k in ("process_index", "process_count")}
      mine = [st for st in states if all(st["fingerprint"].get(k) == v for k, v in where.items())]
      if len(mine) != 1:
        raise DataError(
          f"data iterator state: saved by {len(states)} process(es), this run has "
          f"{self._fingerprint.get('process_count', 1)}; with per-process data states (data.worker_count > 0, "
          "multimodal data) a run resumes only on the same number of processes"
        )
      self._it.set_state(mine[0]["grain"])
      return
    merged = {}
    for st in states:
      if "streams" not in st:
        raise DataError("data iterator state: saved without streams (data.worker_count > 0?)")
      merged.update(st["streams"])
    missing = [s for s in self.streams if str(s) not in merged]
    if missing:
      raise DataError(f"data iterator state: no state for stream(s) {missing[:8]} among {len(merged)} saved")
    self._it.set_state({str(s): merged[str(s)] for s in self.streams})

  def close(self) -> None:
    """Stops prefetch threads / worker processes (also done when collected, and at exit)."""
    self._finalizer()


def _absl_flags_parsed() -> None:
  """grain 0.2.18's mp_prefetch reads an absl flag, which raises UnparsedFlagAccessError in programs
  that do not start through absl.app (google/grain#1355, fixed upstream after 0.2.18). Marking the
  flags parsed keeps every flag at its default; a later absl.app / FLAGS(argv) still parses argv."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _close(it: Any) -> None:
  close = getattr(it, "close", None)
  if close is not None:
    close()
  # grain 0.2.18's DatasetIterator.__del__ calls close() again on every iterator of the chain, which
  # at interpreter teardown fails on cleared module globals ("Exception ignored ... 'NoneType' object
  # has no attribute ..."); once closed, a no-op is correct.
  todo = [it]
  while todo:
    node = todo.pop()
    node.close = _noop
    # mp_prefetch keeps its per-worker readers in an interleave iterator's `_iterators_in_use`.
    children = [*getattr(node, "_parents", ()), *getattr(node, "_iterators_in_use", ())]
    todo += [c for c in children if c is not None and hasattr(c, "close")]


def _noop() -> None:
  pass


def make_iterator(
  data_cfg: Any,
  tokenizer: Tokenizer,
  *,
  split: str,
  seq_len: int,
  batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
  num_epochs: int | None = None,
  teacher_topk: int = 0,
) -> DataIterator:
  """Batches of `split` for process `process_index` of `process_count` (see the module docstring).

  `teacher_topk` > 0: the source was written by `generate --score` (JSONL, or binary ArrayRecord score
  records: data/scores.py); records give the token ids
  (not re-tokenized) and batches add teacher_topk_ids int32 / teacher_topk_logp float32 [B, T, k].

  `batch_size` is per process (the global batch is batch_size × process_count). `seed` drives the
  train shuffle and packing-row order (callers pass data_cfg.shuffle_seed or one derived from it).
  `num_epochs=None` repeats forever; with a number, each stream ends after that many passes, its last
  batch filled up with padding rows, and the iterator when all of this process's streams have ended
  (processes may end a batch apart: multi-process callers take a fixed number of batches).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")

  corpus = open_source(data_cfg.source, data_cfg.format, data_cfg.text_field)
  ids_N = split_indices(len(corpus), data_cfg.heldout_fraction, split)
  global_batch = batch_size * process_count
  num_streams = (data_cfg.streams or global_batch) if split == "train" else 1
  if global_batch % num_streams:
    raise DataError(f"data.streams: {num_streams} streams do not divide the global batch of {global_batch} rows")
  if len(ids_N) == 0:
    raise DataError(f"{data_cfg.source}: no documents for split {split!r} ({len(corpus)} documents in the source)")
  _check_usable(corpus, tokenizer, ids_N, split)

  seed = int(seed) % 2**32  # grain's shuffle takes 32-bit seeds

  def topk_struct(value):
    return {"teacher_topk_ids": value, "teacher_topk_logp": value} if teacher_topk else {}

  reader = _ReadScored(corpus, tokenizer, teacher_topk) if teacher_topk else _ReadAndTokenize(corpus, tokenizer)
  if teacher_topk and len(corpus):  # a score file of too few entries fails here, before any step
    reader.map(0)
    reader.skipped = 0  # counted again when the pipeline reads it
  order = document_order(ids_N, shuffle=split == "train", seed=seed, num_epochs=num_epochs)
  rows = stream_rows(global_batch, num_streams, process_index, process_count)
  # The process's read threads and buffers, shared out among the streams it reads.
  read_options = grain.ReadOptions(
    num_threads=max(1, min(4, os.cpu_count() or 1) // len(rows)), prefetch_buffer_size=max(4, 64 // len(rows))
  )
  rows_per_stream = global_batch // num_streams
  streams = {}
  for sid in rows:
    ds = order[sid::num_streams].map(reader).filter(_IsUsable())
    it = ds.to_iter_dataset(read_options)
    it = grain.experimental.FlatMapIterDataset(it, _SplitIntoPieces(seq_len))
    it = grain.experimental.FirstFitPackIterDataset(
      it,
      length_struct={"inputs": seq_len, "targets": seq_len, "positions": seq_len, **topk_struct(seq_len)},
      num_packing_bins=max(rows_per_stream, MIN_PACKING_BINS),
      seed=_stream_seed(seed, sid) if num_streams > 1 else seed,
      shuffle_bins=split == "train",
      # Our own positions (continuing through long documents) are packed as given, not re-derived.
      meta_features=("positions",),
      padding_struct={"inputs": tokenizer.pad_id, "targets": tokenizer.pad_id, "positions": 0, **topk_struct(0)},
    )
    # A last partial batch (finite epochs) is filled with empty rows, not dropped: eval sees every document.
    pad_batch = functools.partial(grain.experimental.batch_and_pad, batch_size=rows_per_stream)
    streams[sid] = it.batch(rows_per_stream, batch_fn=pad_batch).map(_Finalize(tokenizer.pad_id))
  empty = functools.partial(_empty_rows, seq_len=seq_len, pad_id=tokenizer.pad_id, topk=teacher_topk)
  it = _StreamRows(streams, rows, empty)
  if data_cfg.worker_count > 0:
    _absl_flags_parsed()
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=data_cfg.worker_count, per_worker_buffer_size=max(data_cfg.prefetch, 1))
    )
  elif data_cfg.prefetch > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=data_cfg.prefetch)

  # What a saved state is only valid for. Not the source path: a corpus may move between runs. Not the
  # number of processes: the batches do not depend on it (but grain's multiprocessing state does).
  fingerprint = dict(
    num_documents=len(corpus),
    heldout_fraction=data_cfg.heldout_fraction,
    split=split,
    seq_len=seq_len,
    global_batch_size=global_batch,
    streams=num_streams,
    seed=seed,
    num_epochs=num_epochs,
    worker_count=data_cfg.worker_count,
    **({"teacher_topk": teacher_topk} if teacher_topk else {}),
    **({"process_index": process_index, "process_count": process_count} if data_cfg.worker_count > 0 else {}),
    tokenizer=f"{type(tokenizer).__name__}:{tokenizer.vocab_size}:{tokenizer.bos_id}:{tokenizer.eos_id}",
  )
  local = None if data_cfg.worker_count > 0 else tuple(rows)
  return DataIterator(it, fingerprint, reader, num_documents=len(ids_N), streams=local)


def stream_rows(
  global_batch: int, num_streams: int, process_index: int, process_count: int
) -> dict[int, tuple[int, int]]:
  """{stream: (lo, hi)}: the streams overlapping process `process_index`'s rows of the global batch,
  each with the rows of its own batch that fall to this process."""
  per_stream = global_batch // num_streams
  lo, hi = global_batch * process_index // process_count, global_batch * (process_index + 1) // process_count
  return {
    s: (max(lo, s * per_stream) - s * per_stream, min(hi, (s + 1) * per_stream) - s * per_stream)
    for s in range(lo // per_stream, (hi - 1) // per_stream + 1)
  }


def _stream_seed(seed: int, stream: int) -> int:
  return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1)[0])


def _empty_rows(n: int, *, seq_len: int, pad_id: int, topk: int) -> dict[str, np.ndarray]:
  """`n` padding rows (what `_Finalize` makes of batch_and_pad's zero rows): a finite stream that ended."""
  out = {
    "inputs": np.full((n, seq_len), pad_id, np.int32),
    "targets": np.full((n, seq_len), pad_id, np.int32),
    "segment_ids": np.zeros((n, seq_len), np.int32),
    "positions": np.zeros((n, seq_len), np.int32),
    "loss_mask": np.zeros((n, seq_len), np.float32),
  }
  if topk:
    out = {
      "teacher_topk_ids": np.zeros((n, seq_len, topk), np.int32),
      "teacher_topk_logp": np.zeros((n, seq_len, topk), np.float32),
      **out,
    }
  return out


def document_order(ids_N: np.ndarray, *, shuffle: bool, seed: int, num_epochs: int | None) -> grain.MapDataset:
  """The document indices in reading order: `ids_N` per epoch, shuffled anew each epoch if `shuffle`."""
  ds = grain.MapDataset.source(ids_N)
  if shuffle:
    # shuffle-then-repeat reshuffles every epoch: grain's shuffle seeds epoch e with seed + e. Mixing
    # the seed first keeps runs with seeds s and s + 1 from sharing permutations one epoch apart.
    ds = ds.shuffle(seed=int(np.random.SeedSequence(int(seed)).generate_state(1)[0]))
  return ds.repeat(num_epochs)


def _check_usable(corpus: Corpus, tokenizer: Tokenizer, ids_N: np.ndarray, split: str) -> None:
  """Fails early when no document is long enough. Reads in order until the first usable one, so the
  common case costs one read; an all-short source is read fully, then reported."""
  for i in ids_N:
    if tokenize_document(corpus[int(i)], tokenizer) is not None:
      return
  raise DataError(
    f"{corpus.name}: no usable documents in split {split!r} (all {len(ids_N)} are shorter than {MIN_TOKENS} tokens)"
  )


def count_usable_documents(corpus: Corpus, tokenizer: Tokenizer) -> tuple[int, int]:
  """(usable, skipped) over the whole corpus; reads and tokenizes everything (for small corpora/tests)."""
  usable = sum(tokenize_document(corpus[i], tokenizer) is not None for i in range(len(corpus)))
  return usable, len(corpus) - usable
