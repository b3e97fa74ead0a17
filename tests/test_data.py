"""Input pipeline: packing reconstructs documents exactly, sharding, checkpoint resume, formats, errors.

Documents are compared by value: every packed segment is cut back out of the batches (by segment id)
and matched against the pieces the tokenized originals must produce.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from behemoth_jax.config import DataConfig
from behemoth_jax.data import (
  PAD,
  ByteTokenizer,
  DataError,
  builtin_corpus,
  document_order,
  load_tokenizer,
  make_iterator,
  open_source,
  split_indices,
  tokenize_document,
)

T = 16  # short rows so that documents of a few dozen bytes need several pieces


# --- Helpers ----------------------------------------------------------------------------------
def _docs(n: int, seed: int = 0) -> list[str]:
  """n distinct documents of 1..60 bytes; an id prefix keeps them distinct. Every 7th is 1 byte long
  (too short: skipped)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    if i % 7 == 3:
      out.append("x")
      continue
    body = "".join(rng.choice(list("abcdefghij klmnop"), size=int(rng.integers(0, 50))))
    out.append(f"<{i:03d}>{body}")
  return out


def _write_jsonl(path: Path, docs: list[str]) -> Path:
  path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
  return path


def _iterate(
  cfg: DataConfig, tok=None, *, split="train", batch_size=3, seed=0, process_index=0, process_count=1, num_epochs=1
):
  it = make_iterator(
    cfg,
    tok or ByteTokenizer(),
    split=split,
    seq_len=T,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    num_epochs=num_epochs,
  )
  batches = list(it)
  skipped = it.skipped_documents
  it.close()
  return batches, skipped


def _segments(batches: list[dict[str, np.ndarray]], pad: int = PAD) -> list[tuple[tuple, tuple, tuple]]:
  """Every packed segment as (inputs, targets, positions), checking the row invariants on the way."""
  out = []
  for b in batches:
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for k, dtype in (
      ("inputs", np.int32),
      ("targets", np.int32),
      ("segment_ids", np.int32),
      ("positions", np.int32),
      ("loss_mask", np.float32),
    ):
      assert b[k].dtype == dtype and b[k].shape == b["inputs"].shape == (len(b["inputs"]), T), k
    seg_BT = b["segment_ids"]
    np.testing.assert_array_equal(b["loss_mask"], (seg_BT > 0).astype(np.float32))
    pad_BT = seg_BT == 0
    assert np.all(b["inputs"][pad_BT] == pad) and np.all(b["targets"][pad_BT] == pad)
    assert np.all(b["positions"][pad_BT] == 0)
    for row in range(len(seg_BT)):
      ids = seg_BT[row]
      n = int(np.count_nonzero(ids))
      assert np.all(ids[n:] == 0), "padding only at the end of a row"
      # Segments are numbered 1, 2, ... from the left, each contiguous.
      expect = np.concatenate([[1], 1 + np.cumsum(np.diff(ids[:n]) != 0)]) if n else ids[:0]
      np.testing.assert_array_equal(ids[:n], expect)
      for s in range(1, int(ids.max(initial=0)) + 1):
        m = ids == s
        inp, tgt, pos = b["inputs"][row][m], b["targets"][row][m], b["positions"][row][m]
        np.testing.assert_array_equal(tgt[:-1], inp[1:])  # the next token, within the document
        np.testing.assert_array_equal(np.diff(pos), np.ones(len(pos) - 1))
        out.append((tuple(inp.tolist()), tuple(tgt.tolist()), tuple(pos.tolist())))
  return out


def _expected_pieces(docs: list[str], tok=None) -> dict[int, list[tuple[tuple, tuple, tuple]]]:
  """Document index → the pieces make_iterator must emit for it (skipped documents left out)."""
  tok = tok or ByteTokenizer()
  out = {}
  for i, d in enumerate(docs):
    toks = tokenize_document(d, tok)
    if toks is None:
      continue
    inp, tgt = toks[:-1].tolist(), toks[1:].tolist()
    out[i] = [
      (tuple(inp[s : s + T]), tuple(tgt[s : s + T]), tuple(range(s, min(s + T, len(inp)))))
      for s in range(0, len(inp), T)
    ]
  return out


def _match(segments, expected: dict[int, list], docs: list[str], tok=None) -> set[int]:
  """Which documents the segments are; asserts each of them appears exactly once, rebuilt exactly."""
  tok = tok or ByteTokenizer()
  seen = collections.Counter(segments)
  found = set()
  for i, pieces in expected.items():
    if pieces[0] not in seen:
      continue
    for p in pieces:  # a document is there whole or not at all
      assert seen[p] == 1, f"document {i}: piece at position {p[2][0]} seen {seen[p]} times"
      del seen[p]
    tokens = [t for p in pieces for t in p[0]] + [pieces[-1][1][-1]]
    assert tok.decode(tokens) == docs[i]
    found.add(i)
  assert not seen, f"{len(seen)} segments belong to no document"
  return found


# --- Packing ----------------------------------------------------------------------------------
def test_packing_reconstructs_every_document_once(tmp_path):
  docs = _docs(60)
  cfg = DataConfig(source=str(_write_jsonl(tmp_path / "c.jsonl", docs)), heldout_fraction=0.1)
  batches, skipped = _iterate(cfg)
  train = split_indices(len(docs), 0.1, "train")
  expected = {i: p for i, p in _expected_pieces(docs).items() if i in set(train.tolist())}
  assert any(len(p) > 1 for p in expected.values()), "the test needs documents longer than a row"
  assert _match(_segments(batches), expected, docs) == set(expected)
  assert skipped == sum(len(docs[i]) < 2 for i in train)
  assert skipped > 0


def test_long_documents_continue_positions(tmp_path):
  doc = "".join(chr(97 + i % 26) for i in range(50))  # BOS + 50 + EOS: inputs of 51 = 4 pieces
  (tmp_path / "d.txt").write_text(doc)
  (tmp_path / "e.txt").write_text(doc.upper())
  cfg = DataConfig(source=str(tmp_path), heldout_fraction=0.5)
  segs = _segments(_iterate(cfg, batch_size=2)[0])
  assert sorted(s[2][0] for s in segs) == [0, 16, 32, 48]
  assert [len(s[0]) for s in sorted(segs, key=lambda s: s[2][0])] == [16, 16, 16, 3]


def test_epochs_reshuffled_and_complete():
  ids = np.arange(100, 140)
  order = [int(i) for i in document_order(ids, shuffle=True, seed=5, num_epochs=3)]
  epochs = [order[i * 40 : (i + 1) * 40] for i in range(3)]
  for e in epochs:
    assert sorted(e) == ids.tolist()
  assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
  assert [int(i) for i in document_order(ids, shuffle=True, seed=5, num_epochs=1)] == epochs[0]
  assert [int(i) for i in document_order(ids, shuffle=True, seed=6, num_epochs=1)] != epochs[0]
  assert [int(i) for i in document_order(ids, shuffle=False, seed=5, num_epochs=1)] == ids.tolist()


# --- Splits and sharding ------------------------------------------------------------------------
def test_split_indices_disjoint_deterministic():
  train, held = split_indices(1000, 0.1, "train"), split_indices(1000, 0.1, "heldout")
  assert not set(train) & set(held) and len(train) + len(held) == 1000
  assert 50 < len(held) < 150  # ~10%
  np.testing.assert_array_equal(held, split_indices(1000, 0.1, "heldout"))
  # Growing the corpus keeps earlier documents in their split (the hash is of the index alone).
  assert set(split_indices(2000, 0.1, "heldout")) >= set(held)
  assert len(split_indices(3, 0.01, "heldout")) == 1 and len(split_indices(3, 0.99, "train")) == 1


def test_two_processes_see_disjoint_documents_covering_the_split(tmp_path):
  docs = _docs(40, seed=1)
  cfg = DataConfig(source=str(_write_jsonl(tmp_path / "c.jsonl", docs)), heldout_fraction=0.1)
  expected = _expected_pieces(docs)
  found = [_match(_segments(_iterate(cfg, process_index=p, process_count=2)[0]), expected, docs) for p in range(2)]
  train = set(split_indices(len(docs), 0.1, "train").tolist()) & set(expected)
  assert found[0] and found[1] and not found[0] & found[1]
  assert found[0] | found[1] == train


def _global_batches(cfg: DataConfig, procs: int, n: int, states=None, global_batch=4) -> tuple[list, list]:
  """n global batches assembled from `procs` processes' iterators (rows stacked in process order), and
  each process's state after them; `states`: every process's saved states, to resume from."""
  its = [
    make_iterator(
      cfg,
      ByteTokenizer(),
      split="train",
      seq_len=T,
      batch_size=global_batch // procs,
      seed=3,
      process_index=p,
      process_count=procs,
    )
    for p in range(procs)
  ]
  if states is not None:
    for it in its:
      it.set_state(json.loads(json.dumps(states)))  # through JSON, as a checkpoint stores them
  batches = [
    {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    for parts in zip(*[[next(it) for _ in range(n)] for it in its], strict=True)
  ]
  out = [it.get_state() for it in its]
  for it in its:
    it.close()
  return batches, out


def _same(a: list[dict], b: list[dict]) -> bool:
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("streams", [0, 2])
def test_processes_assemble_one_global_stream_and_resume_on_another_count(tmp_path, streams):
  """The global batches do not depend on the number of processes (streams = rows: each process reads
  its own streams; 2 streams on 4 processes: two processes read each stream, keeping their rows), and
  a data state resumes on another number of processes with the very batches the uninterrupted run
  reads next: no document lost or repeated, none reordered."""
  docs = _docs(40, seed=5)
  cfg = DataConfig(source=str(_write_jsonl(tmp_path / "c.jsonl", docs)), streams=streams)
  one, _ = _global_batches(cfg, 1, 12)  # > one epoch: 40 documents are ~5 global batches of 4 x 16
  assert len({b["inputs"].tobytes() for b in one}) == 12
  for procs in (2, 4):
    assert _same(_global_batches(cfg, procs, 12)[0], one), procs
  for before, after in ((1, 2), (2, 1), (4, 2)):
    head, states = _global_batches(cfg, before, 5)
    tail, _ = _global_batches(cfg, after, 7, states=states)
    assert _same(head + tail, one), (before, after)


def test_per_process_data_states_refuse_another_process_count(tmp_path):
  cfg = DataConfig(source=str(_write_jsonl(tmp_path / "c.jsonl", _docs(20))), worker_count=1)
  kw = dict(split="train", seq_len=T, seed=0)
  it = make_iterator(cfg, ByteTokenizer(), batch_size=4, process_index=0, process_count=1, **kw)
  next(it)
  state = it.get_state()
  it.close()
  other = make_iterator(cfg, ByteTokenizer(), batch_size=2, process_index=1, process_count=2, **kw)
  with pytest.raises(DataError, match="same number of processes"):
    other.set_state([state])
  other.close()


# --- Checkpointing ------------------------------------------------------------------------------
@pytest.mark.parametrize("worker_count", [0, 1])
def test_state_restore_gives_the_same_batches(tmp_path, worker_count):
  docs = _docs(30, seed=2)
  source = str(_write_jsonl(tmp_path / "c.jsonl", docs))
  cfg = DataConfig(source=source, worker_count=worker_count, prefetch=2)
  kw = dict(split="train", seq_len=T, batch_size=4, seed=7, process_index=0, process_count=1)
  it = make_iterator(cfg, ByteTokenizer(), **kw)
  for _ in range(9):  # > one epoch of this corpus, mid packing group
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON
  after = [next(it) for _ in range(6)]
  it.close()
  fresh = make_iterator(cfg, ByteTokenizer(), **kw)
  fresh.set_state(state)
  again = [next(fresh) for _ in range(6)]
  assert all(np.array_equal(a[k], b[k]) for a, b in zip(after, again, strict=True) for k in a)
  fresh.close()
  if worker_count:
    return  # the rest does not depend on workers (and each worker pool takes seconds to start)
  # ... and not trivially: a fresh iterator without the state starts elsewhere.
  fresh2 = make_iterator(cfg, ByteTokenizer(), **kw)
  assert not np.array_equal(next(fresh2)["inputs"], after[0]["inputs"])
  fresh2.close()
  other = make_iterator(cfg, ByteTokenizer(), **{**kw, "batch_size": 2})
  with pytest.raises(DataError, match="batch_size"):
    other.set_state(state)
  other.close()


def test_seed_changes_order_not_content(tmp_path):
  docs = _docs(30, seed=3)
  cfg = DataConfig(source=str(_write_jsonl(tmp_path / "c.jsonl", docs)))
  a, b = _iterate(cfg, seed=1)[0], _iterate(cfg, seed=2)[0]
  assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])
  assert sorted(_segments(a)) == sorted(_segments(b))
  c = _iterate(cfg, seed=1)[0]
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, c, strict=True) for k in x)


# --- Formats ----------------------------------------------------------------------------------
def _write_format(fmt: str, tmp_path: Path, docs: list[str]) -> Path:
  if fmt == "text":
    d = tmp_path / "texts"
    d.mkdir()
    for i, doc in enumerate(docs):
      (d / f"{i:03d}.{'md' if i % 2 else 'txt'}").write_text(doc)
    (d / "README").write_text("not data: no known extension, skipped in a directory")
    return d
  if fmt == "jsonl":
    return _write_jsonl(tmp_path / "c.jsonl", docs)
  if fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=3)
    assert pq.ParquetFile(path).metadata.num_row_groups > 2
    return path
  if fmt == "arrayrecord":
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "c.array_record"
    w = ArrayRecordWriter(str(path), "group_size:1")
    for i, doc in enumerate(docs):  # JSON objects and raw text records mixed
      w.write((json.dumps({"text": doc}) if i % 2 else doc).encode())
    w.close()
    return path
  raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet", "arrayrecord"])
def test_formats(tmp_path, fmt):
  docs = _docs(12, seed=4)
  docs[5] = "{looks like JSON but is raw text"  # arrayrecord: not an object → raw text
  path = _write_format(fmt, tmp_path, docs)
  corpus = open_source(str(path), "auto", "text")
  assert [corpus[i] for i in range(len(corpus))] == docs
  explicit = open_source(str(path), fmt, "text") if fmt != "text" else corpus
  assert len(explicit) == len(docs)
  cfg = DataConfig(source=str(path), heldout_fraction=0.4)
  expected = _expected_pieces(docs)
  found = set()
  for split in ("train", "heldout"):
    found |= _match(_segments(_iterate(cfg, split=split)[0]), expected, docs)
  assert found == set(expected)


def test_glob_and_mixed_directory(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", ["alpha doc", "beta doc"])
  (tmp_path / "b.txt").write_text("gamma doc")
  corpus = open_source(str(tmp_path / "*"), "auto", "text")
  assert [corpus[i] for i in range(len(corpus))] == ["alpha doc", "beta doc", "gamma doc"]
  assert corpus.where(1).endswith("a.jsonl:2")


# --- Tokenizers -------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
  tok = load_tokenizer("bytes")
  ids = tok.encode("héllo ✓")
  assert ids.dtype == np.int32 and ids.tolist() == list("héllo ✓".encode())
  assert tok.decode([256, *ids.tolist(), 257]) == "héllo ✓"
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
  with pytest.raises(DataError, match="BOS id is fixed at 256"):
    load_tokenizer("bytes", bos_id=200000)


def test_hf_tokenizer_json(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  text = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    text,
    trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<pad>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  # A post-processor that adds BOS itself, as Llama's does: the pipeline must not add it twice.
  tok.post_processor = processors.TemplateProcessing(
    single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
  )
  tok.save(str(tmp_path / "tokenizer.json"))

  hf = load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, 2)
  assert load_tokenizer(str(tmp_path)).vocab_size == hf.vocab_size  # a model directory works too
  for s in ["the lazy fox", "unseen wörds ✓ 123"]:
    ids = hf.encode(s)
    assert ids.dtype == np.int32 and 0 not in ids.tolist()
    assert hf.decode(ids) == s
  assert load_tokenizer(str(tmp_path / "tokenizer.json"), bos_id=2, eos_id=2).bos_id == 2

  docs = ["the quick brown fox jumps", "over the lazy dog again and again", "pack my box"]
  cfg = DataConfig(source=str(_write_jsonl(tmp_path / "c.jsonl", docs)), heldout_fraction=0.3)
  batches, _ = _iterate(cfg, hf, batch_size=2)
  segs = _segments(batches, hf.pad_id)
  starts = [s for s in segs if s[2][0] == 0]
  assert starts and all(s[0][0] == 0 and s[0][1] != 0 for s in starts)  # exactly one BOS
  expected = _expected_pieces(docs, hf)
  assert _match(segs, expected, docs, hf) == set(split_indices(3, 0.3, "train").tolist())


# --- Errors -----------------------------------------------------------------------------------
def _error_cases(tmp_path: Path):
  p = tmp_path
  (p / "empty.jsonl").write_bytes(b"")
  (p / "blank.jsonl").write_text("\n\n")
  (p / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
  _write_jsonl(p / "bad.jsonl", ["fine doc one", "fine doc two"])
  with open(p / "bad.jsonl", "a") as f:
    f.write('{"text": "unterminated\n')
  (p / "field.jsonl").write_text('{"text": "fine doc"}\n{"body": "no text field"}\n')
  _write_jsonl(p / "short.jsonl", ["a", "", "b"])
  (p / "data.csv").write_text("a,b\n")
  (p / "bad.parquet").write_bytes(b"not parquet at all")
  return [
    # (source, file named in the message, text in the message)
    (str(p / "missing.jsonl"), "missing.jsonl", "path not found"),
    (str(p / "nothing*.jsonl"), "nothing*.jsonl", "path not found"),
    (str(p / "empty.jsonl"), "empty.jsonl", "empty file"),
    (str(p / "blank.jsonl"), "blank.jsonl", "empty file"),
    (str(p / "latin1.txt"), "latin1.txt", "not valid UTF-8"),
    (str(p / "bad.jsonl"), "bad.jsonl:3", "invalid JSON"),
    (str(p / "field.jsonl"), "field.jsonl:2", "missing field 'text'"),
    (str(p / "short.jsonl"), "short.jsonl", "no usable documents"),
    (str(p / "data.csv"), "data.csv", "cannot tell the format"),
    (str(p / "bad.parquet"), "bad.parquet", "not a valid Parquet file"),
  ]


def test_errors_are_one_line_and_name_the_file(tmp_path):
  for source, where, problem in _error_cases(tmp_path):
    with pytest.raises(DataError) as e:
      # Some errors surface when opening, others when the document is read by the pipeline.
      cfg = DataConfig(source=source, heldout_fraction=0.01)
      for split in ("train", "heldout"):
        _iterate(cfg, split=split)
    msg = str(e.value)
    assert "\n" not in msg and where in msg and problem in msg, (source, msg)
    assert isinstance(e.value, ValueError)


def test_tokenizer_errors(tmp_path):
  with pytest.raises(DataError, match=r"nope\.json: tokenizer file not found"):
    load_tokenizer(str(tmp_path / "nope.json"))
  (tmp_path / "tokenizer.json").write_text("{broken")
  with pytest.raises(DataError) as e:
    load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert "tokenizer.json: not a valid tokenizer.json" in str(e.value) and "\n" not in str(e.value)


# --- Built-in corpus --------------------------------------------------------------------------
def test_builtin_corpus_splits():
  docs = builtin_corpus()
  assert len(docs) > 50 and all(isinstance(d, str) and d for d in docs)
  assert docs == builtin_corpus()  # fixed order
  train, held = split_indices(len(docs), 0.02, "train"), split_indices(len(docs), 0.02, "heldout")
  assert len(held) >= 1 and not set(train) & set(held) and len(train) + len(held) == len(docs)
  # The held-out iterator yields exactly the held-out documents (T=16 rows; they are a few KB).
  cfg = DataConfig(heldout_fraction=0.02)
  segs = _segments(_iterate(cfg, split="heldout", batch_size=8)[0])
  assert _match(segs, {i: p for i, p in _expected_pieces(docs).items() if i in held}, docs) == set(held)
  it = make_iterator(
    cfg, ByteTokenizer(), split="train", seq_len=64, batch_size=2, seed=0, process_index=0, process_count=1
  )
  first = [next(it) for _ in range(3)]
  it.close()
  assert all(b["loss_mask"].sum() > 0 for b in first)
