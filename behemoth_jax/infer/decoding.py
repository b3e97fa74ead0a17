"""The static decoding path and what both paths share: sampling, prefill, one decode step.

`Generator` runs a batch of left-padded prompts to the end in one jitted program (prefill + a
while_loop of decode steps); the continuous path (infer/engine.py) refills decode slots as rows end.
Every row uses its true positions (0 at its first real token), so a padded row decodes exactly as it
would alone, and a record's samples are keyed by the seed, its identity and the token index only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from behemoth_jax.model.transformer import check_token_ids, unstack_layers
from sharding.api import place, use_mesh
from sharding.rules import BATCH_AXES


@dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  seed: int = 0


def sample(logits_BV: jax.Array, key: jax.Array, s: Sampling, rows_B: jax.Array | None = None) -> jax.Array:
  """Next tokens [B] from float32 logits [B, V]. Row b draws with `fold_in(key, rows_B[b])` (default:
  its index b): give each row its record's identity and its draw depends on no other row."""
  rows_B = jnp.arange(logits_BV.shape[0]) if rows_B is None else rows_B
  return sample_rows(logits_BV, jax.vmap(lambda i: jax.random.fold_in(key, i))(rows_B), s)


def token_keys(key: jax.Array, token_B: jax.Array, records_B: jax.Array) -> jax.Array:
  """The key of new token `token_B[b]` of record `records_B[b]`: fold_in(fold_in(key, token), record),
  whatever the batch, slot or step that draws it."""
  return jax.vmap(lambda i, r: jax.random.fold_in(jax.random.fold_in(key, i), r))(token_B, records_B)


def sample_rows(logits_BV: jax.Array, keys_B: jax.Array, s: Sampling) -> jax.Array:
  """Next tokens [B] from float32 logits [B, V], row b drawn with its own key `keys_B[b]`."""
  if s.temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV / s.temperature
  if s.top_k > 0:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    drop_sorted = jnp.cumsum(probs, axis=-1) - probs > s.top_p  # keep the smallest set reaching top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys_B, logits).astype(jnp.int32)


def checked_prompts(prompts, vocab_size: int, max_len: int | None = None) -> list[np.ndarray]:
  """The prompts as int32 arrays; ValueError naming the first that is not a non-empty 1-D list of ids
  in the vocabulary (or, given `max_len`, leaves no room to generate)."""
  rows = [np.asarray(p, np.int32) for p in prompts]
  for i, row in enumerate(rows):
    if row.ndim != 1 or row.size == 0:
      raise ValueError(f"prompts[{i}]: expected a non-empty 1-D list of token ids, got shape {row.shape}")
    if max_len is not None and row.size >= max_len:
      raise ValueError(f"prompts[{i}]: {row.size} tokens leave no room in a context of {max_len}")
    check_token_ids(row, vocab_size, f"prompts[{i}]")
  return rows


def left_pad(prompts: list[np.ndarray], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(ids [B, T], mask [B, T]) with each prompt right-aligned; T rounded up to `multiple`."""
  t = max(len(p) for p in prompts)
  t = -(-t // multiple) * multiple
  ids = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for b, p in enumerate(prompts):
    ids[b, t - len(p) :], mask[b, t - len(p) :] = p, 1
  return ids, mask


def prefill(graphdef, params, ids_BT, mask_BT, pixel_values, max_len):
  model = nnx.merge(graphdef, params)
  positions = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)
  caches = model.init_cache(ids_BT.shape[0], max_len)
  x = model.embed_inputs(ids_BT, pixel_values)
  h, _, caches = model.forward(x, positions, mask_BT.astype(jnp.int32), caches)
  return model.logits(h[:, -1:])[:, 0], caches, positions[:, -1]


def decode_step(graphdef, params, caches, tokens_B, positions_B):
  """(next-token logits [B, V], updated caches) of one token per sequence at `positions_B`."""
  model = nnx.merge(graphdef, params)
  x = model.embed_tokens(tokens_B[:, None])
  ones = jnp.ones_like(tokens_B)[:, None]
  h, _, caches = model.forward(x, positions_B[:, None], ones, caches)
  return model.logits(h)[:, 0], caches


def _generate(
  graphdef,
  params,
  ids_BT,
  mask_BT,
  pixel_values,
  records_B,
  *,
  max_new: int,
  stop_ids: tuple[int, ...],
  pad_id: int,
  sampling: Sampling,
):
  logits, caches, pos = prefill(graphdef, params, ids_BT, mask_BT, pixel_values, ids_BT.shape[1] + max_new)
  b = ids_BT.shape[0]
  key = jax.random.key(sampling.seed)
  stop = jnp.asarray(stop_ids or (-1,), jnp.int32)

  def cond(state):
    i, _, done, *_ = state
    return (i < max_new) & ~jnp.all(done)

  def body(state):
    i, out, done, logits, caches, pos = state
    # The draw of new token i of record r: fold_in(fold_in(key(seed), i), r), whatever the batch.
    tok = sample(logits, jax.random.fold_in(key, i), sampling, records_B)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    done = done | jnp.isin(tok, stop)
    pos = pos + 1
    logits, caches = decode_step(graphdef, params, caches, tok, pos)
    return i + 1, out, done, logits, caches, pos

  out = jnp.full((b, max_new), pad_id, jnp.int32)
  init = (jnp.zeros((), jnp.int32), out, jnp.zeros((b,), bool), logits, caches, pos)
  n, out, *_ = jax.lax.while_loop(cond, body, init)
  return out, n


class Generator:
  """Compiled prefill + decode loop for one model (recompiles per prompt length bucket and batch).

  With `mesh`, the model's parameters are placed by the sharding rules and generation runs on the
  mesh (the batch is padded with empty rows to a multiple of the token-sharding axes). Layers are
  decoded from an unscanned copy of a scanned model (`transformer.unstack_layers`; one more copy of
  the layer weights while the caller keeps the original): faster decoding (docs/PERFORMANCE.md)."""

  def __init__(
    self, model, *, stop_ids: tuple[int, ...], pad_id: int, sampling: Sampling = Sampling(), bucket: int = 64, mesh=None
  ):

    self.graphdef, self.params = nnx.split(unstack_layers(model))  # no per-token slicing of stacked weights
    self.vocab_size = model.cfg.vocab_size
    self.stop_ids, self.pad_id, self.sampling, self.bucket = tuple(stop_ids), pad_id, sampling, bucket
    self.mesh, self.rows_multiple = mesh, 1
    if mesh is not None:
      self.params = place(self.params, mesh)
      self.rows_multiple = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    self._jit = {}

  def __call__(
    self,
    prompts: list[np.ndarray],
    max_new_tokens: int,
    pixel_values: np.ndarray | None = None,
    records: list[int] | None = None,
  ) -> list[np.ndarray]:
    """Completions (without the prompt, cut after the first stop token) for left-padded `prompts`.
    `records`: each prompt's identity (its index in the prompt file), which keys its samples
    (default: its position in this call)."""

    n = len(prompts)
    rows = checked_prompts(prompts, self.vocab_size)
    rows += [np.asarray([self.pad_id], np.int32)] * ((-n) % self.rows_multiple)  # filler rows, dropped below
    ids, mask = left_pad(rows, self.pad_id, self.bucket)
    mask[n:] = 0
    records_B = np.arange(len(rows), dtype=np.int32)
    if records is not None:
      records_B[:n] = records
    fn = self._jit.get(max_new_tokens)
    if fn is None:
      fn = self._jit[max_new_tokens] = jax.jit(
        partial(
          _generate,
          self.graphdef,
          max_new=max_new_tokens,
          stop_ids=self.stop_ids,
          pad_id=self.pad_id,
          sampling=self.sampling,
        )
      )
    if self.mesh is None:
      out, _ = fn(self.params, ids, mask, pixel_values, records_B)
    else:
      with use_mesh(self.mesh):
        out, _ = fn(self.params, ids, mask, pixel_values, records_B)
    out = np.asarray(out)[:n]
    results = []
    for row in out:
      hits = np.nonzero(np.isin(row, self.stop_ids))[0]
      results.append(row[: hits[0] + 1] if hits.size else row)
    return results
