"""The attention layer of a decoder block (docs/ARCHITECTURE.md §2.2, §2.4) and its KV cache.

GQA: project → RoPE → QK-norm (RoPE layers) → temperature (NoPE layers) → the kernel
(model/kernels.py: chunked local for RoPE layers, global causal for NoPE layers) → output projection.
With a KV cache the same layer prefills the prompt (attending as in training, then filling the
cache) or decodes one token (appending to the cache and attending over it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from behemoth_jax.config import LayerKind, ModelConfig
from behemoth_jax.model.kernels import NEG_INF, causal_attention
from behemoth_jax.model.layers import matmul, rms_norm, weight
from behemoth_jax.model.rope import apply_rope
from sharding import axes as ax

# Named scopes of the two attention kinds: behemoth_jax.scale.collectives counts their traffic apart.
ATTENTION_SCOPES = {True: "chunked_attention", False: "global_attention"}
# The projections' matmuls (their name stacks): a collective named after one moves a weight or a partial
# product of that matmul (fsdp's gathers, XLA's windowed einsums), not keys and values for the kernel.
PROJECTIONS = ("BTD,DNH->BTNH", "BTD,DKH->BTKH", "BTNH,NHD->BTD")


class Positions(NamedTuple):
  """Per-token position information shared by every layer of one forward pass."""

  positions_BT: jax.Array  # int32 true positions (RoPE, temperature, chunk membership)
  segment_ids_BT: jax.Array | None  # tokens attend only within their segment
  cos_BTJ: jax.Array
  sin_BTJ: jax.Array
  explicit: bool  # positions are not simply 0..T-1 (use the windowed chunk path)


class Attention(nnx.Module):
  """GQA self-attention of one decoder layer (docs/ARCHITECTURE.md §2.2): project → RoPE → QK-norm → temperature."""

  def __init__(self, cfg: ModelConfig, kind: LayerKind, rngs: nnx.Rngs):
    d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, pd = cfg.initializer_range, cfg.param_dtype
    self.cfg = cfg
    self.kind = kind
    q = dict(quant=cfg.weight_quant, dtype=cfg.dtype)
    self.wq_DNH = weight(rngs, (d, n, h), (ax.EMBED, ax.HEADS, ax.HEAD_DIM), pd, std, **q)
    self.wk_DKH = weight(rngs, (d, kv, h), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), pd, std, **q)
    self.wv_DKH = weight(rngs, (d, kv, h), (ax.EMBED, ax.KV_HEADS, ax.HEAD_DIM), pd, std, **q)
    self.wo_NHD = weight(rngs, (n, h, d), (ax.HEADS, ax.HEAD_DIM, ax.EMBED), pd, std, **q)

  def _qkv(self, x_BTD: jax.Array, pos: Positions) -> tuple[jax.Array, jax.Array, jax.Array]:
    cfg, dt = self.cfg, x_BTD.dtype
    q = matmul(PROJECTIONS[0], x_BTD, self.wq_DNH[...], cfg.fp8)
    k = matmul(PROJECTIONS[1], x_BTD, self.wk_DKH[...], cfg.fp8)
    v = matmul(PROJECTIONS[1], x_BTD, self.wv_DKH[...], cfg.fp8)
    if self.kind.rope:
      q = apply_rope(q, pos.cos_BTJ, pos.sin_BTJ)
      k = apply_rope(k, pos.cos_BTJ, pos.sin_BTJ)
      if cfg.use_qk_norm:  # weightless, per head over head_dim, RoPE layers only
        q, k = rms_norm(q, cfg.rms_norm_eps), rms_norm(k, cfg.rms_norm_eps)
    elif cfg.attn_temperature_tuning:  # NoPE layers; true positions, not cache length
      p = pos.positions_BT.astype(jnp.float32)
      scale = 1.0 + cfg.attn_scale * jnp.log1p(jnp.floor((p + 1.0) / cfg.floor_scale))
      q = (q.astype(jnp.float32) * scale[:, :, None, None]).astype(dt)
    return q, k, v

  def _attend(self, q, k, v, pos: Positions) -> jax.Array:
    cfg = self.cfg
    split = (ax.BATCH, ax.LENGTH, ax.ACT_HEADS, None)
    q = ax.constrain(q, split)
    # Keys and values leave their projections as projected (the sequence split over context), so that
    # whatever moves them for the kernel is named here or in the kernel, apart from the projections'
    # own traffic (PROJECTIONS; program accounting: scale/aot.py's context report).
    k, v = ax.constrain(k, split), ax.constrain(v, split)
    if not self.kind.chunked:  # global layers: every query needs every key (all-gather over context)
      k = ax.constrain(k, (ax.BATCH, None, ax.ACT_HEADS, None))
      v = ax.constrain(v, (ax.BATCH, None, ax.ACT_HEADS, None))
    return causal_attention(
      q,
      k,
      v,
      chunk=cfg.attention_chunk_size if self.kind.chunked else None,
      positions_BT=pos.positions_BT,
      segment_ids_BT=pos.segment_ids_BT,
      explicit_positions=pos.explicit,
      block=cfg.attention_block,
    )

  def __call__(
    self, x_BTD: jax.Array, pos: Positions, cache: KVCache | None = None
  ) -> tuple[jax.Array, KVCache | None]:
    """(output [B, T, D], cache). Without a cache: training's attention. With an empty cache: the
    prompt attended as in training, its keys and values written to the cache (prefill). With a
    filled cache: the new token(s) appended and attended over the cache (decode, T = 1)."""
    with jax.named_scope(ATTENTION_SCOPES[self.kind.chunked]):  # program accounting by layer kind
      q, k, v = self._qkv(x_BTD, pos)
      if cache is None or not cache.filled:
        out = self._attend(q, k, v, pos)
        cache = None if cache is None else cache.fill(k, v, pos)
      else:
        cache = cache.append(k, v, pos)
        out = cache.attend(q, pos)
      return matmul(PROJECTIONS[2], out, self.wo_NHD[...], self.cfg.fp8), cache


class KVCache(struct.PyTreeNode):
  """One layer's keys and values for decoding, one row per sequence (or decode slot).

  Chunked (RoPE) layers keep a ring of `window` = chunk places, place = position mod chunk: a query
  sees only its own chunk, so memory is O(chunk) whatever the generated length. Global layers keep
  every token at the place of its true position. `pos_BS` is each place's true position, -1 when empty
  or padding. Places are per row, so rows of different lengths (left-padded prompts, or continuous
  batching's slots, each at its own position) share one cache. `packed`: a prefill scratch that keeps
  every token by sequence index (a packed row of several prompts, copied into slots by `insert`).
  """

  k_BSKH: jax.Array
  v_BSKH: jax.Array
  pos_BS: jax.Array
  chunk: int | None = struct.field(pytree_node=False, default=None)  # None: global attention
  window: int | None = struct.field(pytree_node=False, default=None)  # ring size; None: place = position
  filled: bool = struct.field(pytree_node=False, default=False)  # a prompt is in it: the next call decodes
  packed: bool = struct.field(pytree_node=False, default=False)  # scratch: place = sequence index

  @classmethod
  def create(
    cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, chunk: int | None, packed: bool = False
  ) -> KVCache:
    window = chunk if chunk is not None and chunk < max_len and not packed else None
    s = max_len if window is None else window
    zeros = jnp.zeros((batch, s, kv_heads, head_dim), dtype)
    return cls(zeros, zeros, jnp.full((batch, s), -1, jnp.int32), chunk, window, packed=packed)

  def _valid(self, pos: Positions) -> jax.Array:
    real = pos.segment_ids_BT > 0 if pos.segment_ids_BT is not None else jnp.ones(pos.positions_BT.shape, bool)
    return jnp.where(real, pos.positions_BT, -1)

  def place(self, p_BT: jax.Array) -> jax.Array:
    """Each position's place in a row (out of range, so dropped by a scatter, for padding: p < 0)."""
    s = self.pos_BS.shape[1]
    return jnp.where(p_BT >= 0, p_BT if self.window is None else p_BT % self.window, s)

  def _write(self, rows, places, k, v, p) -> KVCache:
    """Scatter k, v, positions to (rows, places); out-of-range places are dropped."""
    k = self.k_BSKH.at[rows, places].set(k.astype(self.k_BSKH.dtype), mode="drop")
    v = self.v_BSKH.at[rows, places].set(v.astype(self.v_BSKH.dtype), mode="drop")
    return self.replace(k_BSKH=k, v_BSKH=v, pos_BS=self.pos_BS.at[rows, places].set(p, mode="drop"))

  def fill(self, k_BTKH: jax.Array, v_BTKH: jax.Array, pos: Positions) -> KVCache:
    t = k_BTKH.shape[1]
    p_BT = self._valid(pos)
    if self.packed:
      k = jax.lax.dynamic_update_slice_in_dim(self.k_BSKH, k_BTKH.astype(self.k_BSKH.dtype), 0, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(self.v_BSKH, v_BTKH.astype(self.v_BSKH.dtype), 0, axis=1)
      p = jax.lax.dynamic_update_slice_in_dim(self.pos_BS, p_BT, 0, axis=1)
      return self.replace(k_BSKH=k, v_BSKH=v, pos_BS=p, filled=True)
    # A ring keeps the last `window` tokens (the current chunk); consecutive positions never share a place.
    keep = t if self.window is None else min(t, self.window)
    p_new = p_BT[:, t - keep :]
    rows = jnp.arange(p_new.shape[0])[:, None]
    out = self._write(rows, self.place(p_new), k_BTKH[:, t - keep :], v_BTKH[:, t - keep :], p_new)
    return out.replace(filled=True)

  def append(self, k_B1KH: jax.Array, v_B1KH: jax.Array, pos: Positions) -> KVCache:
    p_B1 = self._valid(pos)
    return self._write(jnp.arange(p_B1.shape[0])[:, None], self.place(p_B1), k_B1KH, v_B1KH, p_B1)

  def insert(self, scratch: KVCache, slot_RT: jax.Array, last_RT: jax.Array, refill_B: jax.Array) -> KVCache:
    """Copies packed prompts' keys and values (`scratch`: packed, [R, T]) into rows of this cache:
    token (r, t) goes to row `slot_RT[r, t]` (out of range: dropped) at its position's place. Rows in
    `refill_B` are emptied first. `last_RT`: the position of the last token of each token's prompt (a
    ring keeps only the last `window` positions of a prompt; earlier ones would share their places)."""
    pos = jnp.where(refill_B[:, None], -1, self.pos_BS)
    p_RT = scratch.pos_BS
    if self.window is not None:
      p_RT = jnp.where(p_RT > last_RT - self.window, p_RT, -1)
    slot_RT = jnp.where(p_RT >= 0, slot_RT, pos.shape[0])
    return self.replace(pos_BS=pos, filled=True)._write(slot_RT, self.place(p_RT), scratch.k_BSKH, scratch.v_BSKH, p_RT)

  def attend(self, q_B1NH: jax.Array, pos: Positions) -> jax.Array:
    b, _, n, h = q_B1NH.shape
    kv = self.k_BSKH.shape[2]
    q = q_B1NH.reshape(b, kv, n // kv, h)
    p_B1 = pos.positions_BT
    mask_BS = (self.pos_BS >= 0) & (self.pos_BS <= p_B1)
    if self.chunk is not None:
      mask_BS &= self.pos_BS // self.chunk == p_B1 // self.chunk
    scores = jnp.einsum("BKGH,BSKH->BKGS", q, self.k_BSKH.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BS[:, None, None, :], scores * (h**-0.5), NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("BKGS,BSKH->BKGH", probs, self.v_BSKH.astype(q.dtype)).reshape(b, 1, n, h)
