"""Continuous batching: a fixed number of decode slots, each refilled from the prompt stream as its row ends.

The device holds one state (`Slots`): KV caches with one row per slot, each slot's last token, its
position, how many tokens it has generated, its limit, its record and its output so far. Two compiled
programs move it forward, neither recompiled per batch:

- `_prefill_insert`: new prompts packed into a few rows of a token budget (segment ids keep them apart,
  positions restart at 0 for each: attention as in training's packed rows), their first tokens
  sampled, their keys and values copied into the free slots' cache rows (`KVCache.insert`). One
  compile per budget bucket (powers of two up to `prefill_tokens`, larger only for longer prompts).
- `_decode`: decode steps over every slot until enough slots have ended (or every row, when no prompt
  is left); ended slots keep their state until the host collects them.

The host loop collects ended slots' outputs, refills them and repeats. A slot's computation depends on
its record alone (true positions, per-slot cache rows, samples keyed by seed, record and token index:
`decoding.token_keys`), and the schedule — which prompt enters which slot when — is a deterministic
function of the prompts and their completions, so a rerun of the same prompts computes the same thing.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from behemoth_jax.infer.decoding import Sampling, checked_prompts, decode_step, sample_rows, token_keys
from behemoth_jax.model.attention import KVCache
from behemoth_jax.model.transformer import unstack_layers
from sharding import axes as ax
from sharding.api import logical_to_spec, place, use_mesh
from sharding.rules import BATCH_AXES


class Slots(struct.PyTreeNode):
  caches: dict
  tok_B: jax.Array  # the last sampled token (fed by the next decode step)
  pos_B: jax.Array  # its position
  n_B: jax.Array  # tokens generated so far
  limit_B: jax.Array  # tokens the row may generate
  rec_B: jax.Array  # the record the slot holds (keys its samples)
  live_B: jax.Array  # still generating
  out_BN: jax.Array  # generated tokens, pad after the end


def _is_cache(c) -> bool:
  return isinstance(c, KVCache)


def _finish(tok_B, n_B, limit_B, stop):
  return ~jnp.isin(tok_B, stop) & (n_B < limit_B)


def _prefill_insert(
  graphdef,
  params,
  st: Slots,
  ids_RT,
  seg_RT,
  slot_RT,
  last_RT,
  index_P,
  slot_P,
  rec_P,
  limit_P,
  *,
  sampling: Sampling,
  stop: tuple[int, ...],
  pad_id: int,
) -> Slots:
  """Prefills packed prompts and moves them into slots `slot_P` (out of range: an unused entry)."""
  model = nnx.merge(graphdef, params)
  r, t = ids_RT.shape
  scratch = model.init_cache(r, t, packed=True)
  h, _, scratch = model.forward(model.embed_tokens(ids_RT), None, seg_RT, scratch)
  h_P = jnp.take(h.reshape(r * t, -1), index_P, axis=0)  # each prompt's last token
  logits = model.logits(h_P[:, None])[:, 0]
  zero = jnp.zeros_like(rec_P)
  tok_P = sample_rows(logits, token_keys(jax.random.key(sampling.seed), zero, rec_P), sampling)
  b = st.tok_B.shape[0]
  refill_B = jnp.zeros((b,), bool).at[slot_P].set(True, mode="drop")

  def insert(running, packed):
    if running.pos_BS.ndim == 3:  # stacked over the scanned cycles
      return jax.vmap(lambda c, s: c.insert(s, slot_RT, last_RT, refill_B))(running, packed)
    return running.insert(packed, slot_RT, last_RT, refill_B)

  caches = jax.tree.map(insert, st.caches, scratch, is_leaf=_is_cache)
  one = jnp.ones_like(rec_P)
  stop_ids = jnp.asarray(stop or (-1,), jnp.int32)
  out_PN = jnp.full((slot_P.shape[0], st.out_BN.shape[1]), pad_id, jnp.int32).at[:, 0].set(tok_P)
  set_ = lambda a, v: a.at[slot_P].set(v, mode="drop")  # noqa: E731
  return Slots(
    caches,
    set_(st.tok_B, tok_P),
    set_(st.pos_B, jnp.take(last_RT.reshape(-1), index_P) + 1),
    set_(st.n_B, one),
    set_(st.limit_B, limit_P),
    set_(st.rec_B, rec_P),
    set_(st.live_B, _finish(tok_P, one, limit_P, stop_ids)),
    set_(st.out_BN, out_PN),
  )


def _decode(graphdef, params, st: Slots, want_free, *, sampling: Sampling, stop: tuple[int, ...], max_steps: int):
  """Decode steps over every slot while fewer than `want_free` slots have ended and some row is live."""
  key = jax.random.key(sampling.seed)
  stop_ids = jnp.asarray(stop or (-1,), jnp.int32)

  def cond(c):
    i, s = c
    return (i < max_steps) & (jnp.sum(~s.live_B) < want_free) & jnp.any(s.live_B)

  def body(c):
    i, s = c
    logits, caches = decode_step(graphdef, params, s.caches, s.tok_B, s.pos_B)
    tok = sample_rows(logits, token_keys(key, s.n_B, s.rec_B), sampling)
    live = s.live_B
    rows = jnp.arange(tok.shape[0])
    out = s.out_BN.at[rows, jnp.where(live, s.n_B, s.out_BN.shape[1])].set(tok, mode="drop")
    n = s.n_B + live
    tok = jnp.where(live, tok, s.tok_B)
    nxt = s.replace(
      caches=caches,
      tok_B=tok,
      pos_B=s.pos_B + live,
      n_B=n,
      live_B=live & _finish(tok, n, s.limit_B, stop_ids),
      out_BN=out,
    )
    return i + 1, nxt

  return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), st))[1]


def row_length(longest: int, smallest: int = 64) -> int:
  """A packed prefill's row length: the power of two (at least `smallest`) that holds `longest` tokens."""
  return max(smallest, 1 << (longest - 1).bit_length())


class ContinuousBatcher:
  """`slots` decode slots over caches of `max_len` positions (prompt + generated); see the module doc.

  `refill`: the decode loop returns to the host when this many slots have ended (while prompts wait)
  — larger packs more prompts into each prefill, smaller keeps slots busier. With `mesh`, parameters
  are placed by the sharding rules and slots are a multiple of the token-sharding axes."""

  def __init__(
    self,
    model,
    *,
    slots: int,
    max_len: int,
    stop_ids: tuple[int, ...],
    pad_id: int,
    sampling: Sampling | None = None,
    prefill_tokens: int = 2048,
    refill: int | None = None,
    max_steps: int = 256,
    mesh=None,
  ):
    self.graphdef, self.params = nnx.split(unstack_layers(model))
    self.vocab_size = model.cfg.vocab_size
    self.rows = 1
    if mesh is not None:
      self.params = place(self.params, mesh)
      self.rows = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    self.mesh = mesh
    self.slots = -(-slots // self.rows) * self.rows
    self.max_len, self.pad_id = max_len, pad_id
    self.stop_ids = tuple(stop_ids)
    self.sampling = sampling = sampling or Sampling()
    self.prefill_tokens = prefill_tokens
    self.refill = max(1, self.slots // 4) if refill is None else refill
    kw = dict(sampling=sampling, stop=self.stop_ids)
    with self._context():
      self._prefill = jax.jit(partial(_prefill_insert, self.graphdef, pad_id=pad_id, **kw), donate_argnums=(1,))
      self._decode = jax.jit(partial(_decode, self.graphdef, max_steps=max_steps, **kw), donate_argnums=(1,))
      if mesh is not None:
        rep = NamedSharding(mesh, PartitionSpec())
        self._peek = jax.jit(lambda s: (s.live_B, s.n_B, s.out_BN), out_shardings=(rep, rep, rep))

  def _context(self):
    return use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _empty(self, width: int) -> Slots:
    """Every slot free, created on the devices (sharded over the batch axes on a mesh)."""
    b = self.slots

    def empty():
      caches = nnx.merge(self.graphdef, self.params).init_cache(b, self.max_len)
      caches = jax.tree.map(lambda c: c.replace(filled=True), caches, is_leaf=_is_cache)
      z = jnp.zeros((b,), jnp.int32)
      return Slots(caches, z, z, z, z, z, jnp.zeros((b,), bool), jnp.full((b, width), self.pad_id, jnp.int32))

    if self.mesh is None:
      return jax.jit(empty)()
    shapes = jax.eval_shape(empty)

    def by_slot(a):
      return NamedSharding(self.mesh, logical_to_spec((ax.BATCH,) + (None,) * (a.ndim - 1), self.mesh, a.shape))

    shardings = jax.tree.map(by_slot, shapes)
    shardings = shardings.replace(caches=jax.tree.map(partial(cache_sharding, self.mesh), shapes.caches))
    return jax.jit(empty, out_shardings=shardings)()

  def _to_device(self, *arrays: np.ndarray):
    """Host arrays as the programs' inputs: as they are on one process; on a mesh over several
    processes (one job over many hosts, each holding the same values), global replicated arrays."""
    if self.mesh is None or jax.process_count() == 1:
      return arrays
    rep = NamedSharding(self.mesh, PartitionSpec())
    return tuple(jax.make_array_from_callback(a.shape, rep, lambda idx, a=a: a[idx]) for a in arrays)

  def _to_host(self, st: Slots) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(live, generated count, outputs) of every slot, on this host (replicated first on a mesh)."""
    if self.mesh is None:
      return jax.device_get((st.live_B, st.n_B, st.out_BN))
    return tuple(np.asarray(x.addressable_data(0)) for x in self._peek(st))

  def _pack(self, queue: deque, prompts, free: int):
    """Takes prompts off `queue`, in order, into a packed prefill of [rows, length]: rows as long as the
    longest of the next `free` prompts (a power of two: one compile per length), as many as fill
    `prefill_tokens` (a multiple of the batch axes), each prompt in the first row with room for it.
    Returns (chosen indices, their (row, column) places, rows, length)."""
    t = row_length(max(len(prompts[i]) for i in list(queue)[:free]))
    r = max(1, self.prefill_tokens // t // self.rows) * self.rows
    chosen, places, fill = [], [], [0] * r
    while queue and len(chosen) < free:
      n = len(prompts[queue[0]])
      row = next((j for j in range(r) if fill[j] + n <= t), None)
      if row is None:
        break
      chosen.append(queue.popleft())
      places.append((row, fill[row]))
      fill[row] += n
    return chosen, places, r, t

  def __call__(
    self,
    prompts: list[np.ndarray],
    max_new: list[int],
    records: list[int] | None = None,
    on_done: Callable[[int, np.ndarray], None] | None = None,
  ) -> list[np.ndarray]:
    """Completions (cut after the first stop token) of `prompts`, each at most `max_new[i]` tokens and
    at most `max_len` positions in all (a prompt of `max_len` tokens or more: ValueError; the caller
    checks). `records`: each prompt's identity, which keys its samples (default: its index).
    `on_done(i, tokens)` is called as each completes."""
    prompts = checked_prompts(prompts, self.vocab_size, self.max_len)
    records = list(range(len(prompts))) if records is None else list(records)
    results: list[np.ndarray | None] = [None] * len(prompts)
    if not prompts:
      return []
    width = max(1, max(max_new))
    queue, free, held = deque(range(len(prompts))), list(range(self.slots)), {}
    with self._context():
      st = self._empty(width)
      while queue or held:
        while queue and free:  # every free slot filled before decoding on
          chosen, places, r, t = self._pack(queue, prompts, len(free))
          slots = [free.pop(0) for _ in chosen]
          packed = self._packed(chosen, places, slots, (r, t), prompts, max_new, records)
          st = self._prefill(self.params, st, *self._to_device(*packed))
          held.update(zip(slots, chosen, strict=True))
        want = np.int32(min(self.refill if queue else self.slots, self.slots))
        st = self._decode(self.params, st, *self._to_device(want))
        live, n, out = self._to_host(st)
        for s in [s for s in sorted(held) if not live[s]]:
          i = held.pop(s)
          results[i] = out[s, : n[s]].copy()
          free.append(s)
          if on_done is not None:
            on_done(i, results[i])
        free.sort()
    return results

  def _packed(self, chosen, places, slots, shape, prompts, max_new, records):
    """The host arrays of one `_prefill_insert` call (per-prompt arrays padded to one entry per slot)."""
    r, t = shape
    ids = np.full((r, t), self.pad_id, np.int32)
    seg, dest, last = (np.zeros((r, t), np.int32) for _ in range(3))
    dest[:] = self.slots
    cap = self.slots
    index, slot_p = np.zeros(cap, np.int32), np.full(cap, self.slots, np.int32)
    rec, limit = np.zeros(cap, np.int32), np.zeros(cap, np.int32)
    for j, (i, (row, col), s) in enumerate(zip(chosen, places, slots, strict=True)):
      n = len(prompts[i])
      ids[row, col : col + n], seg[row, col : col + n] = prompts[i], j + 1
      dest[row, col : col + n], last[row, col : col + n] = s, n - 1
      index[j], slot_p[j], rec[j] = row * t + col + n - 1, s, records[i]
      limit[j] = max(1, min(max_new[i], self.max_len - n))
    return ids, seg, dest, last, index, slot_p, rec, limit


def cache_sharding(mesh, leaf, batch: str | None = ax.BATCH) -> NamedSharding:
  """Where a KV cache leaf lives: keys/values [.., B, S, K, H] and positions [.., B, S] (leading: the
  scanned cycles) with B (decode slots, or a batch's rows) over the `batch` axes (None: replicated, a
  batch-1 prefill) and S over the length axes."""
  if leaf.ndim < 2:
    logical = (None,) * leaf.ndim
  elif leaf.ndim >= 4:
    logical = (None,) * (leaf.ndim - 4) + (batch, ax.LENGTH, ax.KV_HEADS, None)
  else:
    logical = (None,) * (leaf.ndim - 2) + (batch, ax.LENGTH)
  return NamedSharding(mesh, logical_to_spec(logical, mesh, leaf.shape))
