"""The multimodal input pipeline: image/video–text examples (and text-only ones) → packed batches.

Sources (`data.source`):
  builtin_shapes   the procedural dataset of behemoth_jax/data/shapes.py;
  *.jsonl          one JSON object per line: the text field (`data.text_field`) plus any of
                   "image": path or [paths], "video": a directory of frames or a file of frames
                   (GIF, APNG, ...), "frames": [paths]; relative paths start at the JSONL file's folder;
  *.array_record   records holding the same JSON objects.
Records without media are plain text documents, packed alongside.

Each example becomes [BOS] + media blocks (docs/ARCHITECTURE.md §3 layout; a video is one single-tile block per
sampled frame) + text + [EOS]; the loss covers the text and EOS only (never image-layout tokens).
Examples are packed whole, in a seeded order, into rows of `seq_len` tokens and at most
`data.max_tiles_per_row` tiles (next fit); the packing plan is made once, and rows are reshuffled
every epoch by grain. Batches add `pixel_values` float32 [B, K, 3, S, S]: row b's tiles in order,
then zero padding slots that no token uses.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import grain
import numpy as np
from PIL import Image

from behemoth_jax.config import VisionConfig
from behemoth_jax.data import shapes
from behemoth_jax.data.errors import DataError
from behemoth_jax.data.images import (
  best_canvas,
  check_layout_ids,
  count_frames,
  image_prompt_ids,
  preprocess_image,
  preprocess_video,
  video_prompt_ids,
)
from behemoth_jax.data.pipeline import SPLITS, DataIterator, split_indices
from behemoth_jax.data.sources import _JsonlFile
from behemoth_jax.data.tokenizer import Tokenizer

STATE_VERSION = 1


class _Records:
  """JSON records of a JSONL file (line-indexed, read on demand) or an ArrayRecord file."""

  def __init__(self, path: str, fmt: str):
    self.path, self.root = path, Path(path).parent
    self._jsonl = _JsonlFile(path, "text") if fmt == "jsonl" else None
    if self._jsonl is None:
      try:
        self._raw = grain.sources.ArrayRecordDataSource([path])
      except Exception as e:  # array_record raises RuntimeError / ValueError for non-ArrayRecord files
        raise DataError(f"{path}: not a valid ArrayRecord file ({e})") from None
      if len(self._raw) == 0:
        raise DataError(f"{path}: empty file (no records)")

  def __len__(self) -> int:
    return len(self._jsonl if self._jsonl is not None else self._raw)

  def where(self, i: int) -> str:
    return self._jsonl.where(i) if self._jsonl is not None else f"{self.path}: record {i}"

  def __getitem__(self, i: int) -> dict:
    if self._jsonl is not None:
      return self._jsonl.record(i)
    try:
      obj = json.loads(self._raw[i].decode("utf-8"))
    except UnicodeDecodeError as e:
      raise DataError(f"{self.where(i)}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
      raise DataError(f"{self.where(i)}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise DataError(f"{self.where(i)}: expected a JSON object, got {type(obj).__name__}")
    return obj


class MMSource:
  """Index → example (media + text). `sizes(i)` gives (tokens, tiles) without decoding pixels."""

  def __init__(self, data_cfg: Any, vc: VisionConfig, tokenizer: Tokenizer):
    self.vc, self.tok, self.text_field = vc, tokenizer, data_cfg.text_field
    self.frames = data_cfg.video_frames
    self.source = data_cfg.source
    if data_cfg.source == "builtin_shapes":
      self.records = None
      self.length = shapes.NUM_EXAMPLES
    else:
      fmt = data_cfg.format
      if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".array_record": "arrayrecord"}.get(Path(data_cfg.source).suffix, "")
      if fmt not in ("jsonl", "arrayrecord"):
        raise DataError(
          f"{data_cfg.source}: a model with vision reads data.source builtin_shapes, a .jsonl or an "
          ".array_record file of image/video–text records"
        )
      if not Path(data_cfg.source).is_file():
        raise DataError(f"{data_cfg.source}: file not found")
      self.records = _Records(data_cfg.source, fmt)
      self.length = len(self.records)

  def __len__(self) -> int:
    return self.length

  def _media(self, i: int) -> tuple[list[tuple[str, Any]], str]:
    """([("image" | "video", source)], text) of example i."""
    if self.records is None:
      frames, attrs = shapes.render(i, self.vc.image_size, self.frames)
      media = ("video", np.stack(frames)) if attrs["video"] else ("image", frames[0])
      return [media], shapes.caption(attrs)
    rec, where = self.records[i], self.records.where(i)
    text = rec.get(self.text_field)
    if not isinstance(text, str):
      raise DataError(f"{where}: missing or non-string field {self.text_field!r} (fields: {', '.join(rec)})")
    media = []
    root = self.records.root
    images = rec.get("image", rec.get("images", []))
    for p in [images] if isinstance(images, str) else images:
      media.append(("image", str(root / p)))
    if "video" in rec:
      media.append(("video", str(root / rec["video"])))
    if "frames" in rec:
      media.append(("video", [str(root / p) for p in rec["frames"]]))
    return media, text

  def _grid(self, image: Any) -> tuple[int, int]:
    if isinstance(image, str):
      try:
        with Image.open(image) as im:
          width, height = im.size
      except FileNotFoundError:
        raise DataError(f"{image}: image file not found") from None
      except OSError as e:
        raise DataError(f"{image}: not an image Pillow can read ({e.__class__.__name__})") from None
    else:
      height, width = np.asarray(image).shape[:2]
    return best_canvas(height, width, self.vc.image_size, self.vc.max_tiles)

  def _num_frames(self, video: Any) -> int:
    return min(count_frames(video), self.frames)  # what `video_frames(num_frames=...)` samples

  def sizes(self, i: int) -> tuple[int, int]:
    """(input tokens, tiles) of example i as packed: len(ids) - 1 and the tile count."""
    if self.records is None:  # builtin: known without drawing
      attrs = shapes.attributes(i)
      n_img = self.frames if attrs["video"] else 1
      blocks = n_img * len(image_prompt_ids(self.vc, (1, 1)))
      return 1 + blocks + len(self.tok.encode(shapes.caption(attrs))), n_img  # BOS + blocks + text (+EOS −1)
    media, text = self._media(i)
    tokens, tiles = len(self.tok.encode(text)) + 1, 0
    for kind, src in media:
      if kind == "image":
        grid = self._grid(src)
        tokens += len(image_prompt_ids(self.vc, grid))
        tiles += grid[0] * grid[1] + (grid[0] * grid[1] > 1)
      else:
        n = self._num_frames(src)
        tokens += n * len(image_prompt_ids(self.vc, (1, 1)))
        tiles += n
    return tokens, tiles

  def encode_media(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(media token ids, tiles [k, 3, S, S], the example's text) of example i."""
    media, text = self._media(i)
    vc, parts, tiles = self.vc, [], [np.zeros((0, 3, self.vc.image_size, self.vc.image_size), np.float32)]
    for kind, src in media:
      if kind == "image":
        t, grid = preprocess_image(src, vc.image_size, vc.max_tiles)
        parts.append(image_prompt_ids(vc, grid))
      else:
        t = preprocess_video(src, vc.image_size, num_frames=self.frames)
        parts.append(video_prompt_ids(vc, len(t)))
      tiles.append(t.astype(np.float32))
    media_ids = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    return media_ids, np.concatenate(tiles), text

  def with_text(self, media_ids: np.ndarray, tiles: np.ndarray, text: str) -> dict[str, np.ndarray]:
    """ids [n+1] (BOS … EOS), text_mask [n] over targets (the text and EOS; the target of the last
    media token is the first text token), tiles [k, 3, S, S]."""
    ids = np.concatenate([[self.tok.bos_id], media_ids, self.tok.encode(text), [self.tok.eos_id]]).astype(np.int32)
    text_mask = np.zeros(len(ids) - 1, np.float32)
    text_mask[len(media_ids) :] = 1.0
    return {"ids": ids, "text_mask": text_mask, "tiles": tiles}

  def encode(self, i: int) -> dict[str, np.ndarray]:
    return self.with_text(*self.encode_media(i))


def packing_plan(source: MMSource, ids_N: np.ndarray, seq_len: int, max_tiles: int, seed: int) -> list[tuple]:
  """Rows of example indices: next fit over a seeded permutation, whole examples only."""
  order = np.random.default_rng(seed).permutation(ids_N)
  rows, cur, cur_len, cur_tiles = [], [], 0, 0
  for i in order:
    n, k = source.sizes(int(i))
    if n > seq_len or k > max_tiles:
      raise DataError(
        f"{source.source}: example {i} needs {n} tokens and {k} tiles, more than a row holds "
        f"(train.seq_len={seq_len}, data.max_tiles_per_row={max_tiles})"
      )
    if cur and (cur_len + n > seq_len or cur_tiles + k > max_tiles):
      rows.append(tuple(cur))
      cur, cur_len, cur_tiles = [], 0, 0
    cur.append(int(i))
    cur_len, cur_tiles = cur_len + n, cur_tiles + k
  if cur:
    rows.append(tuple(cur))
  return rows


class _LoadRow(grain.transforms.Map):
  def __init__(self, source: MMSource, seq_len: int, max_tiles: int, pad_id: int):
    self.source, self.seq_len, self.max_tiles, self.pad_id = source, seq_len, max_tiles, pad_id

  def map(self, row: tuple) -> dict[str, np.ndarray]:
    t, k, vc = self.seq_len, self.max_tiles, self.source.vc
    out = {
      "inputs": np.full(t, self.pad_id, np.int32),
      "targets": np.full(t, self.pad_id, np.int32),
      "segment_ids": np.zeros(t, np.int32),
      "positions": np.zeros(t, np.int32),
      "loss_mask": np.zeros(t, np.float32),
      "pixel_values": np.zeros((k, 3, vc.image_size, vc.image_size), np.float32),
    }
    at = tiles_at = 0
    for seg, i in enumerate(row, start=1):
      ex = self.source.encode(i)
      n = len(ex["ids"]) - 1
      out["inputs"][at : at + n] = ex["ids"][:-1]
      out["targets"][at : at + n] = ex["ids"][1:]
      out["segment_ids"][at : at + n] = seg
      out["positions"][at : at + n] = np.arange(n)
      out["loss_mask"][at : at + n] = ex["text_mask"]
      m = len(ex["tiles"])
      out["pixel_values"][tiles_at : tiles_at + m] = ex["tiles"]
      at, tiles_at = at + n, tiles_at + m
    return out


def make_mm_iterator(
  data_cfg: Any,
  vc: VisionConfig,
  tokenizer: Tokenizer,
  *,
  split: str,
  seq_len: int,
  batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
  num_epochs: int | None = None,
  vocab_size: int | None = None,
) -> DataIterator:
  """Batches of packed multimodal rows (module docstring); the same contract as `make_iterator`."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if vocab_size is not None:
    check_layout_ids(vc, vocab_size)
  source = MMSource(data_cfg, vc, tokenizer)
  ids_N = split_indices(len(source), data_cfg.heldout_fraction, split)
  start = len(ids_N) * process_index // process_count
  end = len(ids_N) * (process_index + 1) // process_count
  if end == start:
    raise DataError(f"{data_cfg.source}: no examples for split {split!r} of process {process_index}")
  seed = int(seed) % 2**32
  rows = packing_plan(source, ids_N[start:end], seq_len, data_cfg.max_tiles_per_row, seed)
  ds = grain.MapDataset.source(rows)
  if split == "train":
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs).map(_LoadRow(source, seq_len, data_cfg.max_tiles_per_row, tokenizer.pad_id))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(4, os.cpu_count() or 1), prefetch_buffer_size=16))
  it = it.batch(batch_size, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size))
  if data_cfg.prefetch > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=data_cfg.prefetch)
  fingerprint = dict(
    kind="multimodal",
    version=STATE_VERSION,
    num_examples=len(source),
    split=split,
    seq_len=seq_len,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    num_epochs=num_epochs,
    max_tiles=data_cfg.max_tiles_per_row,
    video_frames=data_cfg.video_frames,
    tokenizer=f"{type(tokenizer).__name__}:{tokenizer.vocab_size}",
  )
  return DataIterator(it, fingerprint, _NoReader(), num_documents=end - start)


class _NoReader:
  skipped = 0
