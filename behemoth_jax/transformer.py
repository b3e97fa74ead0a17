"""The Llama 4 text decoder: pre-norm blocks, the repeating layer cycle scanned, the model.

Layers follow a pattern (RoPE/NoPE, chunked/global, MoE/dense) with period P = `cfg.cycle_length`
(4 for the released models). With `scan_layers`, the first ⌊L/P⌋ cycles are one stacked `Cycle`
module run by `jax.lax.scan` (parameters gain a leading `layers` axis); the L mod P layers left over
run unscanned, as do all layers when scanning is off. Both paths are tested equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from behemoth_jax.attention import Attention, Positions, segment_positions
from behemoth_jax.config import LayerKind, ModelConfig
from behemoth_jax.layers import Embed, RMSNorm, SwiGLU, dtype_of, param
from behemoth_jax.moe import MoE, MoEStats
from behemoth_jax.rope import inv_frequencies, rope_angles
from sharding import axes as ax

REMAT_POLICIES = {
    "full": None,  # save nothing but the block inputs
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn, policy: str):
  return fn if policy == "none" else jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, kind: LayerKind, rngs: nnx.Rngs):
    d, pd, std = cfg.hidden_size, cfg.param_dtype, cfg.initializer_range
    self.input_norm = RMSNorm(d, cfg.rms_norm_eps, pd, rngs)
    self.attn = Attention(cfg, kind, rngs)
    self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps, pd, rngs)
    self.ffn = MoE(cfg, rngs) if kind.moe else SwiGLU(d, cfg.intermediate_size_mlp, pd, std, rngs, fp8=cfg.fp8)

  def __call__(self, x_BTD: jax.Array, pos: Positions) -> tuple[jax.Array, MoEStats | None]:
    x_BTD = x_BTD + self.attn(self.input_norm(x_BTD), pos)
    y = self.ffn(self.post_attn_norm(x_BTD))
    y, stats = y if isinstance(self.ffn, MoE) else (y, None)
    return ax.constrain(x_BTD + y, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED)), stats


class Cycle(nnx.Module):
  """P consecutive layers: the unit of the layer scan."""

  def __init__(self, cfg: ModelConfig, kinds: tuple[LayerKind, ...], rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(cfg, kind, rngs) for kind in kinds])

  def __call__(self, x_BTD: jax.Array, pos: Positions) -> tuple[jax.Array, tuple[MoEStats | None, ...]]:
    stats = []
    for block in self.blocks:
      x_BTD, s = block(x_BTD, pos)
      stats.append(s)
    return x_BTD, tuple(stats)


def _stacked_cycles(cfg: ModelConfig, kinds: tuple[LayerKind, ...], n: int, key: jax.Array) -> Cycle:
  """n independently initialised cycles whose parameters are stacked on a leading `layers` axis."""
  graphdefs = []

  def make(k):
    graphdef, state = nnx.split(Cycle(cfg, kinds, nnx.Rngs(params=k)))
    graphdefs.append(graphdef)  # traced once; the structure is the same for every cycle
    return state

  states = jax.vmap(make)(jax.random.split(key, n))
  cycles = nnx.merge(graphdefs[0], states)
  for _, var in nnx.iter_graph(cycles):
    if isinstance(var, nnx.Variable):
      var.set_metadata("out_sharding", (ax.LAYERS, *var.get_metadata("out_sharding")))
  return cycles


class Decoder(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    kinds, p = cfg.layer_kinds, cfg.cycle_length
    n = cfg.num_layers // p if cfg.scan_layers else 0
    self.num_cycles = n if n >= 2 else 0
    self.remat_policy = cfg.remat_policy
    self.num_experts = cfg.num_experts
    first_tail = self.num_cycles * p
    self.cycles = _stacked_cycles(cfg, kinds[:p], self.num_cycles, rngs.params()) if self.num_cycles else None
    self.tail = nnx.List([Block(cfg, kinds[i], rngs) for i in range(first_tail, cfg.num_layers)])

  def __call__(self, x_BTD: jax.Array, pos: Positions) -> tuple[jax.Array, MoEStats]:
    """Returns the residual stream and router statistics of the MoE layers in layer order ([L_moe, E])."""
    per_layer: list[tuple[int, MoEStats]] = []
    if self.cycles is not None:
      graphdef, stacked = nnx.split(self.cycles)
      body = remat(lambda x, state: nnx.merge(graphdef, state)(x, pos), self.remat_policy)
      x_BTD, cycle_stats = jax.lax.scan(body, x_BTD, stacked)
      p = len(cycle_stats)
      for j, s in enumerate(cycle_stats):
        if s is not None:
          per_layer += [(c * p + j, jax.tree.map(lambda a: a[c], s)) for c in range(self.num_cycles)]
    first = self.num_cycles * (len(self.cycles.blocks) if self.cycles is not None else 0)
    for i, block in enumerate(self.tail):
      graphdef, state = nnx.split(block)
      x_BTD, s = remat(lambda x, st: nnx.merge(graphdef, st)(x, pos), self.remat_policy)(x_BTD, state)
      if s is not None:
        per_layer.append((first + i, s))
    per_layer.sort(key=lambda item: item[0])
    if not per_layer:
      e = self.num_experts
      return x_BTD, MoEStats(jnp.zeros((0, e)), jnp.zeros((0, e)), jnp.zeros((0,)))
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in per_layer])


class Llama4Text(nnx.Module):
  """Llama4ForCausalLM's math: embed → decoder → RMSNorm → untied lm_head, float32 logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, v, pd, std = cfg.hidden_size, cfg.vocab_size, cfg.param_dtype, cfg.initializer_range
    self.cfg = cfg
    self.embed = Embed(v, d, pd, std, rngs)
    self.pos_table_PD = (param(rngs, (cfg.max_position_embeddings, d), (None, ax.EMBED), pd, std)
                         if cfg.learned_pos_embedding else None)
    self.decoder = Decoder(cfg, rngs)
    self.final_norm = RMSNorm(d, cfg.rms_norm_eps, pd, rngs)
    self.lm_head_DV = None if cfg.tie_word_embeddings else param(rngs, (d, v), (ax.EMBED, ax.VOCAB), pd, std)

  def positions(self, batch: int, length: int, positions_BT: jax.Array | None = None,
                segment_ids_BT: jax.Array | None = None) -> Positions:
    """True positions (default 0..T-1, or restarting per segment) and their RoPE angles."""
    explicit = positions_BT is not None or segment_ids_BT is not None
    if positions_BT is None:
      positions_BT = (segment_positions(segment_ids_BT) if segment_ids_BT is not None else
                      jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))
    cfg = self.cfg
    cos, sin = rope_angles(positions_BT, inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    return Positions(positions_BT.astype(jnp.int32), segment_ids_BT, cos, sin, explicit)

  def embed_tokens(self, input_ids_BT: jax.Array) -> jax.Array:
    return self.embed(input_ids_BT, dtype_of(self.cfg.dtype))

  def forward(self, x_BTD: jax.Array, positions_BT: jax.Array | None = None,
              segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, MoEStats]:
    """Input embeddings [B, T, D] → (final-normed hidden states [B, T, D], router statistics)."""
    b, t, _ = x_BTD.shape
    pos = self.positions(b, t, positions_BT, segment_ids_BT)
    if self.pos_table_PD is not None:
      x_BTD = x_BTD + jnp.take(self.pos_table_PD[...], pos.positions_BT, axis=0).astype(x_BTD.dtype)
    x_BTD = ax.constrain(x_BTD, (ax.BATCH, ax.LENGTH, ax.ACT_EMBED))
    h_BTD, stats = self.decoder(x_BTD, pos)
    return self.final_norm(h_BTD), stats

  def hidden_states(self, x_BTD: jax.Array, positions_BT: jax.Array | None = None,
                    segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Input embeddings [B, T, D] → final-normed hidden states [B, T, D] (compute dtype)."""
    return self.forward(x_BTD, positions_BT, segment_ids_BT)[0]

  def lm_head_weight(self) -> jax.Array:
    """[D, V] output projection (the embedding table transposed when tied)."""
    return self.embed.table_VD[...].T if self.lm_head_DV is None else self.lm_head_DV[...]

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    w_DV = self.lm_head_weight()
    logits = jnp.einsum("BTD,DV->BTV", h_BTD, w_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)
    return ax.constrain(logits, (ax.BATCH, ax.LENGTH, ax.ACT_VOCAB))

  def __call__(self, input_ids_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """int32 token ids [B, T] → float32 logits [B, T, V]. Packed documents (segment ids) never
    attend across a boundary; their positions restart at 0 unless given."""
    h = self.hidden_states(self.embed_tokens(input_ids_BT), positions_BT, segment_ids_BT)
    return self.logits(h)


def create_model(cfg: ModelConfig, seed: int = 0) -> Llama4Text:
  return Llama4Text(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> Llama4Text:
  """Shapes and dtypes only (no allocation): parameter counts, sharding plans, restore targets."""
  return nnx.eval_shape(lambda: create_model(cfg))
