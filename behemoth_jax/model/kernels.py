"""Attention kernels: causal GQA softmax attention, local within position chunks or global, and the
masks that decide who sees whom. The math only; the layer (projections, RoPE, QK-norm, temperature)
and the KV cache are model/attention.py.

Chunked attention is computed chunk by chunk, O(T·C) memory and FLOPs, never as a masked T×T matrix:
query i sees key j iff `pos_i // C == pos_j // C` and j ≤ i (chunks aligned to position 0,
docs/ARCHITECTURE.md §2.4).

- Default positions (0..T-1): queries of index-block c attend keys of block c only.
- Explicit positions or packed segments: queries of block c attend keys of blocks c-1 and c (2C keys),
  masked by position-chunk, index causality and segment. This is exact whenever positions increase
  strictly within a segment (then every key a query may see lies fewer than C indices back), which
  holds for packed documents whose positions restart at 0 and for left-padded batches.

Two kernels, each with a hand-written backward tested against `jax.grad` of a plain reference: the
dense one (key spans up to `block`; causal query blocks skip the masked upper triangle) and the
blocked one (online softmax over key blocks, FlashAttention's recomputing backward; only the (query
block, key block) pairs holding a visible key are computed, forward and backward).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sharding import axes as ax

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # masked scores: finite, so a fully masked row is no NaN


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
  """Positions restarting at 0 at each change of segment id along T."""
  b, t = segment_ids_BT.shape
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  seg_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - seg_start


def _blocks(x: jax.Array, n: int, c: int) -> jax.Array:
  """[B, n*c, ...] → [B, n, c, ...]."""
  return x.reshape(x.shape[0], n, c, *x.shape[2:])


def _with_previous(x: jax.Array, fill) -> jax.Array:
  """[B, n, c, ...] → [B, n, 2c, ...]: each block preceded by the previous block (first: `fill`)."""
  prev = jnp.concatenate([jnp.full_like(x[:, :1], fill), x[:, :-1]], axis=1)
  return jnp.concatenate([prev, x], axis=2)


ATTENTION_CORE = "attention_core"  # named scope of the scores and values matmuls (program accounting: scale/aot.py)


def _in_scope(name: str):
  """A decorator: the function traced under jax.named_scope(name)."""

  def wrap(fn):
    @functools.wraps(fn)
    def scoped(*args, **kwargs):
      with jax.named_scope(name):
        return fn(*args, **kwargs)

    return scoped

  return wrap


@_in_scope(ATTENTION_CORE)
def causal_attention(
  q_BTNH: jax.Array,
  k_BTKH: jax.Array,
  v_BTKH: jax.Array,
  *,
  chunk: int | None,
  positions_BT: jax.Array | None = None,
  segment_ids_BT: jax.Array | None = None,
  explicit_positions: bool = False,
  block: int = 0,
) -> jax.Array:
  """Causal GQA attention, local within position chunks of size `chunk` (None: global).

  Returns [B, T, N, H] in q's dtype; scores and softmax in float32. With `block` > 0 and a key span
  (chunk, twice the chunk when windowed, or T for global layers) longer than it, keys are visited
  `block` at a time with an online softmax and FlashAttention's recomputing backward: live scores
  are queries × block, not queries × keys (what lets 8K-token chunks and 1M-token global layers
  fit). A span that is not a multiple of `block` gets masked padding keys up to the next multiple.
  Both paths skip what causality masks out: the blocked one visits only the (query block, key block)
  pairs that hold a visible key (`_block_pairs`), the dense one splits queries into row blocks (`_dense`).
  """
  b, t, n, h = q_BTNH.shape
  kv = k_BTKH.shape[2]
  g = n // kv
  c = t if chunk is None or chunk >= t else chunk
  pad = (-t) % c
  nc = (t + pad) // c
  pos_masked = explicit_positions and chunk is not None
  windowed = pos_masked and nc > 1

  def prep(x):
    return _blocks(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)), nc, c)

  q = prep(q_BTNH).reshape(b, nc, c, kv, g, h)
  k, v = prep(k_BTKH), prep(v_BTKH)
  idx_q = jnp.arange(nc * c, dtype=jnp.int32).reshape(nc, c)
  idx_k = idx_q
  if windowed:
    k, v = _with_previous(k, 0), _with_previous(v, 0)
    idx_k = jnp.concatenate([idx_q - c, idx_q], axis=1)
  pos_q = pos_k = seg_q = seg_k = None
  if pos_masked:
    pos_q = prep(positions_BT)
    pos_k = _with_previous(pos_q, 0) if windowed else pos_q
  if segment_ids_BT is not None:
    seg_q = prep(segment_ids_BT)
    seg_k = _with_previous(seg_q, -1) if windowed else seg_q
  masks = _Masks(idx_q, idx_k, pos_q, pos_k, seg_q, seg_k, chunk if pos_masked else None)
  s = k.shape[2]
  if block and s > block:
    extra = (-s) % block
    if extra:  # padding keys after every real one: causality masks them (index past every query)
      widen = lambda x, fill: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=fill)
      k, v = (jnp.pad(x, [(0, 0), (0, 0), (0, extra), (0, 0), (0, 0)]) for x in (k, v))  # [B, n, s, K, H]
      masks = masks._replace(
        idx_k=widen(masks.idx_k, nc * c + s),
        pos_k=None if pos_k is None else widen(pos_k, 0),
        seg_k=None if seg_k is None else widen(seg_k, -1),
      )
    # A sequence split over `context` keeps its queries in one block (every key block visited): the
    # pair scan's dynamic query-block slices of context-sharded carries made XLA all-gather the f32
    # carries at every pair (Scout, 4 layers, context 2 x tensor 4: 110 GiB of all-gathers per chip per
    # step instead of 14 GiB; docs/SCALE.md).
    pairs = _block_pairs(c, k.shape[2], block, windowed, one_query_block=ax.shards(ax.LENGTH) > 1)
    out = _flash(q, k, v, masks, pairs, block)
  else:
    out = _dense(q, k, v, masks, windowed)
  return out.reshape(b, nc * c, n, h)[:, :t]


QUERY_BLOCK = 64  # rows per causal query block of the dense path


def _dense(q, k, v, masks: _Masks, windowed: bool) -> jax.Array:
  """Softmax attention of each query block over only the keys it can see: rows [i·b, (i+1)·b) of a
  block of c queries see keys [0, (i+1)·b) (or, windowed, the c + b keys ending at the row block), so
  the upper triangle of masked-out scores is never computed ((n+1)/2n of the full square for n row
  blocks). The row blocks are a static loop; each is an ordinary masked softmax, with a hand-written
  backward (`_dense_hm_bwd`): autodiff's version spent most of its time on XLA:CPU transposing
  per-block copies and reducing p·dp over the keys (docs/PERFORMANCE.md, "Design measurements")."""
  c = q.shape[2]
  qb = QUERY_BLOCK if c % QUERY_BLOCK == 0 and c > QUERY_BLOCK else c
  spans = tuple((i * qb, i * qb + c + qb) if windowed else (0, (i + 1) * qb) for i in range(c // qb))
  # Head-major once: [B, n, K, c, G, H] and [B, n, K, s, H], so every block's dots take their rows
  # (queries x group) and keys contiguously instead of transposing a copy per block.
  qh, kh, vh = jnp.moveaxis(q, 3, 2), jnp.moveaxis(k, 3, 2), jnp.moveaxis(v, 3, 2)
  return jnp.moveaxis(_dense_hm(qh, kh, vh, masks, spans), 2, 3)


def _block_mask(masks: _Masks, i: int, qb: int, lo: int, hi: int) -> jax.Array:
  """[B or 1, n, 1, qb, 1, hi - lo]: which keys of the span the queries of row block i see."""
  return masks.rows(i * qb, qb).block(lo, hi - lo)[:, :, None, :, None, :]


def _dense_forward(qh, kh, vh, masks, spans):
  qb, scale = qh.shape[3] // len(spans), qh.shape[-1] ** -0.5
  outs, probs = [], []
  for i, (lo, hi) in enumerate(spans):
    sc = jnp.einsum(
      "BnKqGH,BnKsH->BnKqGs", qh[:, :, :, i * qb : (i + 1) * qb], kh[:, :, :, lo:hi], preferred_element_type=jnp.float32
    )
    p = jax.nn.softmax(jnp.where(_block_mask(masks, i, qb, lo, hi), sc * scale, NEG_INF), axis=-1)
    probs.append(p)
    outs.append(
      jnp.einsum(
        "BnKqGs,BnKsH->BnKqGH", p.astype(vh.dtype), vh[:, :, :, lo:hi], preferred_element_type=jnp.float32
      ).astype(qh.dtype)
    )
  return jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0], probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense_hm(qh, kh, vh, masks, spans):
  return _dense_forward(qh, kh, vh, masks, spans)[0]


def _dense_hm_fwd(qh, kh, vh, masks, spans):
  out, probs = _dense_forward(qh, kh, vh, masks, spans)
  return out, (qh, kh, vh, out, probs)


def _dense_hm_bwd(spans, res, d_out):
  """Softmax backward with FlashAttention's row term: sum_s p·dp = dO·O (over H, not over keys), and
  dK/dV of each block added into their key span; saved probabilities, nothing recomputed."""
  qh, kh, vh, out, probs = res
  qb, scale = qh.shape[3] // len(spans), qh.shape[-1] ** -0.5
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, n, K, c, G]
  dkT = jnp.zeros(jnp.swapaxes(kh, 3, 4).shape, jnp.float32)
  dvT = jnp.zeros_like(dkT)
  dqs = []
  for i, ((lo, hi), p) in enumerate(zip(spans, probs)):
    rows = slice(i * qb, (i + 1) * qb)
    q_i, do_i, k_i = qh[:, :, :, rows], d_out[:, :, :, rows], kh[:, :, :, lo:hi]
    dp = jnp.einsum("BnKqGH,BnKsH->BnKqGs", do_i, vh[:, :, :, lo:hi], preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[:, :, :, rows, :, None]) * scale).astype(qh.dtype)
    dqs.append(jnp.einsum("BnKqGs,BnKsH->BnKqGH", ds, k_i, preferred_element_type=jnp.float32))
    # dK and dV transposed ([H, keys]): their dots contract the rows of ds and p where they lie
    # instead of XLA transposing a copy of each block's [rows, keys] matrix.
    dkT = dkT.at[..., lo:hi].add(jnp.einsum("BnKqGH,BnKqGs->BnKHs", q_i, ds, preferred_element_type=jnp.float32))
    dvT = dvT.at[..., lo:hi].add(
      jnp.einsum("BnKqGH,BnKqGs->BnKHs", do_i, p.astype(d_out.dtype), preferred_element_type=jnp.float32)
    )
  dq = jnp.concatenate(dqs, axis=3) if len(dqs) > 1 else dqs[0]
  unT = lambda x, like: jnp.swapaxes(x, 3, 4).astype(like.dtype)
  return dq.astype(qh.dtype), unT(dkT, kh), unT(dvT, vh), None


_dense_hm.defvjp(_dense_hm_fwd, _dense_hm_bwd)


class _Masks(NamedTuple):
  """What decides whether query i may see key j, kept factored so a key block's mask is built alone."""

  idx_q: jax.Array  # [n, cq] sequence index of each query
  idx_k: jax.Array  # [n, s]
  pos_q: jax.Array | None  # [B, n, cq] positions (chunk membership by position), or None
  pos_k: jax.Array | None
  seg_q: jax.Array | None  # [B, n, cq] segment ids, or None
  seg_k: jax.Array | None
  chunk: int | None

  def rows(self, start: int, size: int) -> _Masks:
    """The masks of queries [start, start + size) only."""
    cut = lambda x: None if x is None else x[..., start : start + size]
    return self._replace(idx_q=cut(self.idx_q), pos_q=cut(self.pos_q), seg_q=cut(self.seg_q))

  def rows_at(self, start: jax.Array, size: int) -> _Masks:
    """`rows` at a traced start."""
    cut = lambda x: None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)
    return self._replace(idx_q=cut(self.idx_q), pos_q=cut(self.pos_q), seg_q=cut(self.seg_q))

  def block(self, start: int | jax.Array, size: int) -> jax.Array:
    """[B or 1, n, cq, size] for keys [start, start + size)."""
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=x.ndim - 1)
    idx_k = cut(self.idx_k)
    mask = ((idx_k[:, None, :] <= self.idx_q[:, :, None]) & (idx_k[:, None, :] >= 0))[None]
    if self.pos_q is not None:
      mask = mask & (self.pos_q[..., None] // self.chunk == cut(self.pos_k)[:, :, None, :] // self.chunk)
    if self.seg_q is not None:
      mask = mask & (self.seg_q[..., None] == cut(self.seg_k)[:, :, None, :])
    return mask


def _block_scores(q, k_j, masks: _Masks, start, size: int) -> jax.Array:
  """Masked float32 scores [B, n, K, G, cq, size] of one key block."""
  s = jnp.einsum("BcqKGH,BcsKH->BcKGqs", q, k_j, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  return jnp.where(masks.block(start, size)[:, :, None, None], s, NEG_INF)


def _key_block(x, j, block: int):
  return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=2)


def _block_pairs(
  cq: int, s: int, block: int, windowed: bool, one_query_block: bool = False
) -> tuple[int, tuple[tuple[int, int], ...]]:
  """(query block size, the (query block, key block) pairs to visit, query-block-major): only pairs
  holding a key some query of the block may see. Row r of a chunk sees keys [0, r] (`s` keys in the
  chunk's own layout), or, windowed, keys (r, r + c] of the previous chunk and its own (2c keys; keys c or
  more indices back are never in the same position chunk: see the module docstring). So a global or
  chunked layer visits nq(nq+1)/2 of nq² pairs, a windowed one nq + 1 key blocks per query block
  instead of 2nq. Queries not a multiple of `block`, or `one_query_block`, stay one block (every key
  block visited)."""
  nk = s // block
  if one_query_block or cq % block or cq == block:
    return cq, tuple((0, j) for j in range(nk))
  pairs = []
  for i in range(cq // block):
    last_row = (i + 1) * block - 1
    lo, hi = (i, (last_row + cq) // block) if windowed else (0, last_row // block)
    pairs += [(i, j) for j in range(lo, min(hi, nk - 1) + 1)]
  return block, tuple(pairs)


def _rows(x, i, size: int, axis: int):
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _put_rows(x, value, i, size: int, axis: int):
  return jax.lax.dynamic_update_slice_in_dim(x, value, i * size, axis=axis)


def _flash_forward(q, k, v, masks: _Masks, pairs, block: int):
  """Online softmax over key blocks (a scan over the visited (query block, key block) pairs): O(query
  block · key block) live scores instead of queries × keys. Returns the output [B, n, cq, K, G, H] in
  q's dtype and the log-sum-exp [B, n, K, G, cq] (float32)."""
  b, n, cq, kv, g, h = q.shape
  qb, pairs = pairs
  m0 = jnp.full((b, n, kv, g, cq), NEG_INF, jnp.float32)
  acc0 = jnp.zeros((b, n, kv, g, cq, h), jnp.float32)

  def body(carry, ij):
    m_all, l_all, acc_all = carry
    i, j = ij[0], ij[1]
    m, l, acc = _rows(m_all, i, qb, 4), _rows(l_all, i, qb, 4), _rows(acc_all, i, qb, 4)
    sc = _block_scores(_rows(q, i, qb, 2), _key_block(k, j, block), masks.rows_at(i * qb, qb), j * block, block)
    m_new = jnp.maximum(m, sc.max(axis=-1))
    p = jnp.exp(sc - m_new[..., None])
    corr = jnp.exp(m - m_new)
    l = l * corr + p.sum(axis=-1)
    pv = jnp.einsum(
      "BcKGqs,BcsKH->BcKGqH", p.astype(v.dtype), _key_block(v, j, block), preferred_element_type=jnp.float32
    )
    acc = acc * corr[..., None] + pv
    return (_put_rows(m_all, m_new, i, qb, 4), _put_rows(l_all, l, i, qb, 4), _put_rows(acc_all, acc, i, qb, 4)), None

  init = (m0, jnp.zeros_like(m0), acc0)
  (m, l, acc), _ = jax.lax.scan(body, init, jnp.asarray(pairs, jnp.int32))
  out = (acc / l[..., None]).astype(q.dtype)  # l >= 1 for every row: each visits its own diagonal key
  return jnp.moveaxis(out, 4, 2), m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, masks: _Masks, pairs, block: int):
  return _flash_forward(q, k, v, masks, pairs, block)[0]


def _flash_fwd(q, k, v, masks, pairs, block):
  out, lse = _flash_forward(q, k, v, masks, pairs, block)
  return out, (q, k, v, masks, out, lse)


def _flash_bwd(pairs, block, res, d_out):
  """FlashAttention's backward over the same pairs: probabilities recomputed per pair from the saved
  log-sum-exp, so memory stays O(query block · key block); dQ, dK and dV are float32 carries, each pair
  adding into its query block's rows and its key block's."""
  q, k, v, masks, out, lse = res
  qb, pairs = pairs
  d_out = jnp.moveaxis(d_out, 2, 4)  # [B, n, K, G, cq, H]
  delta = jnp.sum(d_out.astype(jnp.float32) * jnp.moveaxis(out, 2, 4).astype(jnp.float32), axis=-1)
  scale = q.shape[-1] ** -0.5

  def body(carry, ij):
    dq_all, dk_all, dv_all = carry
    i, j = ij[0], ij[1]
    q_i, do_i = _rows(q, i, qb, 2), _rows(d_out, i, qb, 4)
    k_j, v_j = _key_block(k, j, block), _key_block(v, j, block)
    sc = _block_scores(q_i, k_j, masks.rows_at(i * qb, qb), j * block, block)
    p = jnp.exp(sc - _rows(lse, i, qb, 4)[..., None])
    dv = jnp.einsum("BcKGqs,BcKGqH->BcsKH", p.astype(d_out.dtype), do_i, preferred_element_type=jnp.float32)
    dp = jnp.einsum("BcKGqH,BcsKH->BcKGqs", do_i, v_j, preferred_element_type=jnp.float32)
    ds = (p * (dp - _rows(delta, i, qb, 4)[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("BcKGqs,BcsKH->BcqKGH", ds, k_j, preferred_element_type=jnp.float32)
    dk = jnp.einsum("BcKGqs,BcqKGH->BcsKH", ds, q_i, preferred_element_type=jnp.float32)
    add = lambda x, d, at, size: _put_rows(x, _rows(x, at, size, 2) + d, at, size, 2)
    return (add(dq_all, dq, i, qb), add(dk_all, dk, j, block), add(dv_all, dv, j, block)), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  (dq, dk, dv), _ = jax.lax.scan(body, (zeros(q), zeros(k), zeros(v)), jnp.asarray(pairs, jnp.int32))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
