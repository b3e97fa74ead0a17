"""A random train batch of one unpacked document per row, for step-level tests."""

import jax.numpy as jnp
import numpy as np


def random_batch(b: int, t: int, seed: int = 0, vocab: int = 259, drop: float = 0.0) -> dict:
  """inputs/targets uniform in [0, vocab), positions 0..t-1, one segment per row; `drop` > 0 masks that
  share of the tokens out of the loss at random."""
  r = np.random.default_rng(seed)
  batch = {
    "inputs": r.integers(0, vocab, (b, t)),
    "targets": r.integers(0, vocab, (b, t)),
    "segment_ids": np.ones((b, t), np.int32),
    "positions": np.tile(np.arange(t), (b, 1)),
    "loss_mask": (r.random((b, t)) >= drop).astype(np.float32) if drop else np.ones((b, t), np.float32),
  }
  return {k: jnp.asarray(v) for k, v in batch.items()}
