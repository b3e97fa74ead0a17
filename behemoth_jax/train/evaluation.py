"""Held-out caption accuracy on the procedural shapes dataset: does the model see colour, shape, motion?

For each held-out example and each attribute its caption states (colour, shape, and for clips the
direction), every possible word is put into the caption and the model scores the caption's tokens
given the image; the attribute counts as right when the true word's caption has the highest
log-likelihood. Chance is 1/6 (colour), 1/4 (shape), 1/4 (direction).
"""

from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from behemoth_jax.data import shapes
from behemoth_jax.data.multimodal import MMSource
from behemoth_jax.data.pipeline import split_indices


def _score_fn(graphdef):
  @jax.jit
  def score(params, inputs, targets, mask, pixel_values):
    model = nnx.merge(graphdef, params)
    logits = model(inputs, pixel_values=pixel_values)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return (jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask).sum(-1)

  return score


def caption_accuracy(
  graphdef, params, source: MMSource, heldout_fraction: float, num_examples: int = 200, batch: int = 64
) -> dict[str, float]:
  """{"colour": acc, "shape": acc, "direction": acc (clips only), "examples": n} on held-out examples."""
  ids = split_indices(len(source), heldout_fraction, "heldout")[:num_examples]
  seqs, owners = [], []  # owners: (field, example, candidate index, true index)
  for i in ids:
    media_ids, tiles, _ = source.encode_media(int(i))  # drawn and preprocessed once per example
    for field, (captions, true) in shapes.caption_candidates(shapes.attributes(int(i))).items():
      for c, text in enumerate(captions):
        seqs.append(source.with_text(media_ids, tiles, text))
        owners.append((field, int(i), c, true))
  length = max(len(s["ids"]) - 1 for s in seqs)
  tiles = max(len(s["tiles"]) for s in seqs)
  vc, pad = source.vc, source.tok.pad_id
  score = _score_fn(graphdef)
  scores = np.zeros(len(seqs))
  for start in range(0, len(seqs), batch):
    chunk = seqs[start : start + batch]
    n = len(chunk)
    inputs = np.full((batch, length), pad, np.int32)
    targets = np.full((batch, length), pad, np.int32)
    mask = np.zeros((batch, length), np.float32)
    pixels = np.zeros((batch, tiles, 3, vc.image_size, vc.image_size), np.float32)
    for r, s in enumerate(chunk):
      m = len(s["ids"]) - 1
      inputs[r, :m], targets[r, :m], mask[r, :m] = s["ids"][:-1], s["ids"][1:], s["text_mask"]
      pixels[r, : len(s["tiles"])] = s["tiles"]
    scores[start : start + n] = np.asarray(score(params, inputs, targets, mask, pixels))[:n]
  best: dict[tuple[str, int], tuple[float, int, int]] = {}
  for (field, i, c, true), sc in zip(owners, scores, strict=True):
    if (field, i) not in best or sc > best[(field, i)][0]:
      best[(field, i)] = (sc, c, true)
  right: dict[str, list[bool]] = defaultdict(list)
  for (field, _), (_, c, true) in best.items():
    right[field].append(c == true)
  out = {field: float(np.mean(v)) for field, v in right.items()}
  out["examples"] = len(ids)
  out["clips"] = len(right.get("direction", []))
  return out
