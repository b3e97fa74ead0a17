"""Tokenizers for the input pipeline: the in-repo byte tokenizer and Hugging Face tokenizer.json files.

Both expose the same small interface (`Tokenizer`): `encode(text)` gives the document's token ids
WITHOUT special tokens (the pipeline adds BOS/EOS itself, so a tokenizer.json post-processor that
would add them too is bypassed), `decode(ids)`, and the ids `bos_id`, `eos_id`, `pad_id`, `vocab_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from behemoth_jax.data.errors import DataError

# Byte tokenizer ids: bytes 0..255, then the three specials (the tiny config's ids).
BOS, EOS, PAD = 256, 257, 258

# Special-token spellings tried, in order, when a tokenizer.json's ids are not given explicitly.
# Llama 3/4 first, then the SentencePiece / GPT-style conventions.
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
PAD_NAMES = ("<|finetune_right_pad|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]")


class Tokenizer(Protocol):
  """What the pipeline needs from a tokenizer."""

  vocab_size: int
  bos_id: int | None  # None: documents are not prefixed
  eos_id: int | None  # None: documents are not terminated
  pad_id: int  # fills padding; its loss is always masked, so any id is correct

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; BOS 256, EOS 257, PAD 258. Needs no files."""

  vocab_size = 259
  bos_id = BOS
  eos_id = EOS
  pad_id = PAD

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    # Specials are not text; invalid byte sequences (e.g. a token cut mid-character) decode leniently
    # because decode is for looking at data, not for round-trip guarantees on arbitrary ids.
    return bytes(ids_N[ids_N < 256].astype(np.uint8)).decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json (e.g. Llama 4's), with explicit or looked-up specials."""

  def __init__(self, path: str | Path, bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None):
    import tokenizers  # imported here so the byte tokenizer works without the package

    self.path = str(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # the Rust error text can span lines; keep the message to one
      raise DataError(f"{self.path}: not a valid tokenizer.json ({_one_line(e)})") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bos_id = bos_id if bos_id is not None else self._lookup(BOS_NAMES)
    self.eos_id = eos_id if eos_id is not None else self._lookup(EOS_NAMES)
    pad = pad_id if pad_id is not None else self._lookup(PAD_NAMES)
    # Padding is always masked out of the loss, so without a pad token any valid id will do.
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
    for name in ("bos_id", "eos_id", "pad_id"):
      value = getattr(self, name)
      if value is not None and not 0 <= value < self.vocab_size:
        raise DataError(f"{self.path}: {name} {value} is outside the vocabulary [0, {self.vocab_size})")

  def _lookup(self, names: Sequence[str]) -> int | None:
    for name in names:
      i = self._tok.token_to_id(name)
      if i is not None:
        return int(i)
    return None

  def encode(self, text: str) -> np.ndarray:
    # add_special_tokens=False: the pipeline adds BOS/EOS, a post-processor must not add them twice.
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def load_tokenizer(spec: str, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
  """`"bytes"` → `ByteTokenizer`; otherwise a tokenizer.json path (or a directory holding one)."""
  if spec == "bytes":
    # The byte tokenizer's ids are fixed; a different id asked for means the model config and the
    # data config disagree, which would train on the wrong specials silently.
    for name, given, fixed in (("BOS", bos_id, BOS), ("EOS", eos_id, EOS)):
      if given is not None and given != fixed:
        raise DataError(f"tokenizer bytes: {name} id is fixed at {fixed}, got {given}")
    return ByteTokenizer()
  path = Path(spec)
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise DataError(f"{path}: tokenizer file not found")
  return HFTokenizer(path, bos_id=bos_id, eos_id=eos_id)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text[:200] or e.__class__.__name__


__all__ = ["BOS", "EOS", "PAD", "ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]
