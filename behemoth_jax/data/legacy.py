"""The pre-grain helpers `train.py` still imports (token stream + random windows).

Kept only so that `train.py` runs until it moves to `make_iterator`; remove together with that change.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from behemoth_jax.data.tokenizer import BOS, EOS, ByteTokenizer


def byte_encode(text: str) -> np.ndarray:
  return ByteTokenizer().encode(text)


def token_stream(docs: list[str]) -> np.ndarray:
  """Documents as one int32 stream: BOS doc EOS BOS doc EOS ..."""
  parts = []
  for doc in docs:
    parts += [np.array([BOS], np.int32), byte_encode(doc), np.array([EOS], np.int32)]
  return np.concatenate(parts)


def split_stream(stream: np.ndarray, heldout_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
  cut = int(len(stream) * (1 - heldout_fraction))
  return stream[:cut], stream[cut:]


def batches(stream: np.ndarray, batch: int, seq: int, seed: int) -> Iterator[np.ndarray]:
  """Endless random windows [batch, seq + 1] (inputs and next-token targets)."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(stream) - seq - 1, size=batch)
    yield np.stack([stream[s:s + seq + 1] for s in starts])
