"""The Llama 4 text decoder: pre-norm blocks, the repeating layer cycle scanned, the model.

Layers follow a pattern (RoPE/NoPE, chunked/global, MoE/dense) with period P = `cfg.cycle_length`
(4 for the released models). With `scan_layers`, the first ⌊L/P⌋ cycles are one stacked `Cycle`
module run by `jax.lax.scan` (parameters gain a leading `layers` axis); the L mod P layers left over
run unscanned, as do all layers when scanning is off. Both paths are tested equal.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from behemoth_jax.config import LayerKind, ModelConfig
from behemoth_jax.model.attention import Attention, KVCache, Positions
from behemoth_jax.model.kernels import segment_positions
from behemoth_jax.model.layers import (
  EMBEDDING,
  Embed,
  RMSNorm,
  SwiGLU,
  dtype_of,
  param,
  remat,
  stack_modules,
)
from behemoth_jax.model.moe import MoE, MoEStats
from behemoth_jax.model.rope import inv_frequencies, rope_angles
from behemoth_jax.model.vision import VisionEncoder, fuse_image_features
from sharding import axes as ax


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, kind: LayerKind, rngs: nnx.Rngs):
    d, pd, std = cfg.hidden_size, cfg.param_dtype, cfg.initializer_range
    self.input_norm = RMSNorm(d, cfg.rms_norm_eps, pd, rngs)
    self.attn = Attention(cfg, kind, rngs)
    self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, pd, rngs)
    q = dict(fp8=cfg.fp8, quant=cfg.weight_quant, dtype=cfg.dtype)
    self.ffn = MoE(cfg, rngs) if kind.moe else SwiGLU(d, cfg.intermediate_size_mlp, pd, std, rngs, **q)

  def __call__(
    self, x_BTD: jax.Array, pos: Positions, cache: KVCache | None = None
  ) -> tuple[jax.Array, MoEStats | None, KVCache | None]:
    """(residual stream, router statistics of an MoE layer or None, KV cache: see `Attention`)."""
    attn_BTD, cache = self.attn(self.input_norm(x_BTD), pos, cache)
    x_BTD = x_BTD + attn_BTD
    y = self.ffn(self.post_attn_norm(x_BTD))
    y, stats = y if isinstance(self.ffn, MoE) else (y, None)
    return ax.constrain(x_BTD + y, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED)), stats, cache


def _run_block(block: Block, x_BTD: jax.Array, pos: Positions, cache, remat_policy: str):
  """One block as its own remat unit: the backward pass recomputes and holds one layer at a time."""
  graphdef, state = nnx.split(block)
  return remat(lambda x, st, c: nnx.merge(graphdef, st)(x, pos, c), remat_policy)(x_BTD, state, cache)


class Cycle(nnx.Module):
  """P consecutive layers: the unit of the layer scan."""

  def __init__(self, cfg: ModelConfig, kinds: tuple[LayerKind, ...], rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, kind, rngs) for kind in kinds])

  def __call__(
    self, x_BTD: jax.Array, pos: Positions, caches: tuple[KVCache, ...] | None = None, remat_policy: str = "none"
  ):
    """(x, per-block router statistics, per-block caches or None). Each block is its own remat unit
    (rematerialising the whole cycle held P layers' MoE buffers at once: docs/SCALE.md)."""
    stats, out = [], []
    for i, block in enumerate(self.blocks):
      x_BTD, s, c = _run_block(block, x_BTD, pos, None if caches is None else caches[i], remat_policy)
      stats.append(s)
      out.append(c)
    return x_BTD, tuple(stats), None if caches is None else tuple(out)


class Decoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    kinds, p = cfg.layer_kinds, cfg.cycle_length
    self.num_cycles = cfg.num_cycles
    self.remat_policy = cfg.remat_policy
    self.scan_unroll = cfg.scan_unroll
    self.num_experts = cfg.num_experts
    self.first_tail = first_tail = self.num_cycles * p  # index of the first unscanned layer
    self.cycles = (
      stack_modules(lambda r: Cycle(cfg, kinds[:p], r), self.num_cycles, rngs.params()) if self.num_cycles else None
    )
    self.tail = nnx.List([Block(cfg, kinds[i], rngs) for i in range(first_tail, cfg.num_layers)])

  def __call__(
    self, x_BTD: jax.Array, pos: Positions, caches: dict | None = None
  ) -> tuple[jax.Array, MoEStats, dict | None]:
    """(residual stream, router statistics of the MoE layers in layer order ([L_moe, E]), caches).

    `caches` ({"cycles": per-block caches stacked over cycles, "tail": [...]}, from
    `Llama4.init_cache`) makes this a prefill or a decode step; None is training's forward."""
    out = None if caches is None else {"cycles": None, "tail": []}
    cycle_stats = None
    if self.cycles is not None:
      graphdef, stacked = nnx.split(self.cycles)

      def body(x, xs):
        state, cache = xs
        x, stats, cache = nnx.merge(graphdef, state)(x, pos, cache, self.remat_policy)
        return x, (stats, cache)

      xs = (stacked, None if caches is None else caches["cycles"])
      x_BTD, (cycle_stats, cycle_caches) = jax.lax.scan(body, x_BTD, xs, unroll=min(self.scan_unroll, self.num_cycles))
      if out is not None:
        out["cycles"] = cycle_caches
    x_BTD, stats, tail_caches = self.run_tail(x_BTD, pos, cycle_stats, None if caches is None else caches["tail"])
    if out is not None:
      out["tail"] = tail_caches
    return x_BTD, stats, out

  def run_tail(self, x_BTD: jax.Array, pos: Positions, cycle_stats: tuple | None, caches: list | None = None):
    """The unscanned layers after the cycles, then every MoE layer's statistics in layer order:
    (x, MoEStats [L_moe, E], tail caches or None). `cycle_stats`: the scan's per-block statistics
    (each [num_cycles, ...]; None for a dense block), or None without cycles."""
    per_layer: list[tuple[int, MoEStats]] = []
    if cycle_stats is not None:
      p = len(cycle_stats)
      for j, s in enumerate(cycle_stats):
        if s is not None:
          per_layer += [(c * p + j, jax.tree.map(lambda a: a[c], s)) for c in range(self.num_cycles)]
    out = None if caches is None else []
    for i, block in enumerate(self.tail):
      x_BTD, s, c = _run_block(block, x_BTD, pos, None if caches is None else caches[i], self.remat_policy)
      if out is not None:
        out.append(c)
      if s is not None:
        per_layer.append((self.first_tail + i, s))
    per_layer.sort(key=lambda item: item[0])
    if not per_layer:
      e = self.num_experts
      return x_BTD, MoEStats(jnp.zeros((0, e)), jnp.zeros((0, e)), jnp.zeros((0,))), out
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in per_layer]), out


class Llama4(nnx.Module):
  """Llama4ForCausalLM's math (embed → decoder → RMSNorm → untied lm_head, float32 logits), and with
  `cfg.vision` Llama4ForConditionalGeneration's: image features replace `<|patch|>` embeddings."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, v, pd, std = cfg.hidden_size, cfg.vocab_size, cfg.param_dtype, cfg.initializer_range
    self.cfg = cfg
    self.embed = Embed(v, d, pd, std, rngs)
    self.pos_table_PD = (
      param(rngs, (cfg.max_position_embeddings, d), (None, ax.EMBED), pd, std, EMBEDDING)
      if cfg.learned_pos_embedding
      else None
    )
    self.decoder = Decoder(cfg, rngs)
    self.final_norm = RMSNorm(d, cfg.rms_norm_eps, pd, rngs)
    self.lm_head_DV = None if cfg.tie_word_embeddings else param(rngs, (d, v), (ax.EMBED, ax.VOCAB), pd, std)
    vc = cfg.vision
    self.vision = None if vc is None else VisionEncoder(vc, pd, cfg.remat_policy, rngs)
    self.projector_PD = (
      None if vc is None else param(rngs, (vc.vision_output_dim, d), (ax.MLP, ax.EMBED), pd, vc.initializer_range)
    )

  def positions(
    self, batch: int, length: int, positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None
  ) -> Positions:
    """True positions (default 0..T-1, or restarting per segment) and their RoPE angles."""
    explicit = positions_BT is not None or segment_ids_BT is not None
    if positions_BT is None:
      positions_BT = (
        segment_positions(segment_ids_BT)
        if segment_ids_BT is not None
        else jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
      )
    cfg = self.cfg
    cos, sin = rope_angles(positions_BT, inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    return Positions(positions_BT.astype(jnp.int32), segment_ids_BT, cos, sin, explicit)

  def embed_tokens(self, input_ids_BT: jax.Array) -> jax.Array:
    return self.embed(input_ids_BT, dtype_of(self.cfg.dtype))

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """Tiles [N, C, H, W] → projected features [N, tokens_per_tile, D] (or [B, K, ...] → [B, K·tpt, D])."""
    if self.vision is None:
      raise ValueError("pixel_values: this model has no vision encoder (model.vision is not set)")
    lead = pixel_values.shape[:-3]
    feats = self.vision(pixel_values.reshape(-1, *pixel_values.shape[-3:]), dtype_of(self.cfg.dtype))
    feats = jnp.einsum("NSP,PD->NSD", feats, self.projector_PD[...].astype(feats.dtype))
    return feats.reshape(-1, feats.shape[-1]) if len(lead) == 1 else feats.reshape(lead[0], -1, feats.shape[-1])

  def embed_inputs(self, input_ids_BT: jax.Array, pixel_values: jax.Array | None = None) -> jax.Array:
    """Token embeddings with image features fused in (early fusion).

    pixel_values: float32 tiles [N, C, H, W] in prompt order over the whole batch (HF's layout), or
    [B, K, C, H, W]: K tile slots per row, used by that row's image tokens in order (padding slots unused).
    Concrete ids outside [0, vocab_size) raise ValueError (a gather would clamp them silently); traced
    ids (inside jit) are the caller's to check, as the data pipeline and the tokenizer check do.
    """
    check_token_ids(input_ids_BT, self.cfg.vocab_size)
    x = self.embed_tokens(input_ids_BT)
    if pixel_values is None:
      return x
    if pixel_values.ndim not in (4, 5):
      raise ValueError(
        f"pixel_values: expected [tiles, C, H, W] or [batch, tiles, C, H, W], got shape {tuple(pixel_values.shape)}"
      )
    if pixel_values.ndim == 5 and pixel_values.shape[0] != input_ids_BT.shape[0]:
      raise ValueError(f"pixel_values: batch {pixel_values.shape[0]} != input_ids batch {input_ids_BT.shape[0]}")
    return fuse_image_features(x, input_ids_BT, self.image_features(pixel_values), self.cfg.vision.image_token_id)

  def forward(
    self,
    x_BTD: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    cache: dict | None = None,
  ) -> tuple[jax.Array, MoEStats, dict | None]:
    """Input embeddings [B, T, D] → (final-normed hidden states [B, T, D], router statistics, caches).

    Without `cache`: training's forward. With caches from `init_cache`: the prompt's prefill (caches
    filled), then one decode step per call on the caches it returned (positions: true positions)."""
    b, t, _ = x_BTD.shape
    pos = self.positions(b, t, positions_BT, segment_ids_BT)
    h_BTD, stats, cache = self.decoder(self.prologue(x_BTD, pos), pos, cache)
    return self.final_norm(h_BTD), stats, cache

  def prologue(self, x_BTD: jax.Array, pos: Positions) -> jax.Array:
    """What precedes the first layer: learned position embeddings where the model has them, the
    residual stream's sharding."""
    if self.pos_table_PD is not None:
      x_BTD = x_BTD + jnp.take(self.pos_table_PD[...], pos.positions_BT, axis=0).astype(x_BTD.dtype)
    return ax.constrain(x_BTD, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))

  def init_cache(self, batch: int, max_len: int, packed: bool = False) -> dict:
    """Empty KV caches for `max_len` tokens (prompt + generated): chunked layers hold one chunk.
    `packed`: a prefill scratch holding every token of packed rows by index (`KVCache.insert`)."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)

    def layer(kind: LayerKind) -> KVCache:
      chunk = cfg.attention_chunk_size if kind.chunked else None
      return KVCache.create(batch, max_len, cfg.num_kv_heads, cfg.head_dim, dt, chunk, packed)

    dec = self.decoder
    cycles = None
    if dec.cycles is not None:
      p = len(dec.cycles.blocks)
      one = tuple(layer(cfg.layer_kind(j)) for j in range(p))
      cycles = jax.tree.map(lambda a: jnp.broadcast_to(a, (dec.num_cycles, *a.shape)), one)
    return {"cycles": cycles, "tail": [layer(cfg.layer_kind(dec.first_tail + i)) for i in range(len(dec.tail))]}

  def hidden_states(
    self, x_BTD: jax.Array, positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None
  ) -> jax.Array:
    """Input embeddings [B, T, D] → final-normed hidden states [B, T, D] (compute dtype)."""
    return self.forward(x_BTD, positions_BT, segment_ids_BT)[0]

  def lm_head_weight(self) -> jax.Array:
    """[D, V] output projection (the embedding table transposed when tied)."""
    return self.embed.table_VD[...].T if self.lm_head_DV is None else self.lm_head_DV[...]

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    w_DV = self.lm_head_weight()
    logits = jnp.einsum("BTD,DV->BTV", h_BTD, w_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)
    return ax.constrain(logits, (ax.BATCH, ax.LENGTH, ax.ACT_VOCAB))

  def __call__(
    self,
    input_ids_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    pixel_values: jax.Array | None = None,
  ) -> jax.Array:
    """int32 token ids [B, T] (+ image tiles, see `embed_inputs`) → float32 logits [B, T, V].
    Packed documents (segment ids) never attend across a boundary; their positions restart at 0
    unless given."""
    h = self.hidden_states(self.embed_inputs(input_ids_BT, pixel_values), positions_BT, segment_ids_BT)
    return self.logits(h)


def check_token_ids(ids, vocab_size: int, what: str = "input_ids") -> None:
  """ValueError naming the first id outside [0, vocab_size) and where it is; no-op on tracers."""
  if isinstance(ids, jax.core.Tracer):
    return
  ids = np.asarray(ids)
  bad = np.argwhere((ids < 0) | (ids >= vocab_size))
  if bad.size:
    where = tuple(int(i) for i in bad[0])
    raise ValueError(
      f"{what}: token id {int(ids[where])} at {list(where)} is outside [0, {vocab_size}) "
      f"(model.vocab_size; {len(bad)} of {ids.size} ids are)"
    )


def create_model(cfg: ModelConfig, seed: int = 0) -> Llama4:
  return Llama4(cfg, rngs=nnx.Rngs(params=seed))


def unstack_layers(model: Llama4) -> Llama4:
  """The same model with every layer unscanned (`scan_layers` False): layer c·P + j of the stacked
  cycles becomes its own block. Generation uses it: a scan over stacked weights slices (copies) every
  layer's weights on every step, which dominated CPU decoding (docs/PERFORMANCE.md)."""
  dec = model.decoder
  if dec.cycles is None:
    return model
  cfg = dataclasses.replace(model.cfg, scan_layers=False)
  p = len(dec.cycles.blocks)
  old = dict(nnx.to_flat_state(nnx.state(model)))
  graphdef, state = nnx.split(abstract_model(cfg))
  flat = dict(nnx.to_flat_state(state))
  for path, var in flat.items():
    src, index = path, None
    if path[:2] == ("decoder", "tail"):
      i = path[2]
      if i < dec.first_tail:
        src, index = ("decoder", "cycles", "blocks", i % p, *path[3:]), i // p
      else:
        src = ("decoder", "tail", i - dec.first_tail, *path[3:])
    value = old[src].get_value()
    var.set_value(value if index is None else value[index])
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def abstract_model(cfg: ModelConfig) -> Llama4:
  """Shapes and dtypes only (no allocation): parameter counts, sharding plans, restore targets."""
  return nnx.eval_shape(lambda: create_model(cfg))
