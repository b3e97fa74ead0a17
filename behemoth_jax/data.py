"""Built-in corpus and byte-level tokenizer: nothing is downloaded.

The corpus is the `pydoc_data` topics that ship with CPython (~465 KB of English documentation).
Tokens: bytes 0..255, then BOS 256, EOS 257, PAD 258 (the tiny config's special ids).
"""

from __future__ import annotations

import numpy as np

BOS, EOS, PAD = 256, 257, 258


def byte_encode(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def builtin_corpus() -> list[str]:
  from pydoc_data import topics  # part of the standard library
  return [topics.topics[k] for k in sorted(topics.topics)]


def token_stream(docs: list[str]) -> np.ndarray:
  """Documents as one int32 stream: BOS doc EOS BOS doc EOS ..."""
  parts = []
  for doc in docs:
    parts += [np.array([BOS], np.int32), byte_encode(doc), np.array([EOS], np.int32)]
  return np.concatenate(parts)


def split_stream(stream: np.ndarray, heldout_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
  cut = int(len(stream) * (1 - heldout_fraction))
  return stream[:cut], stream[cut:]


def batches(stream: np.ndarray, batch: int, seq: int, seed: int):
  """Endless random windows [batch, seq + 1] (inputs and next-token targets)."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(stream) - seq - 1, size=batch)
    yield np.stack([stream[s:s + seq + 1] for s in starts])
