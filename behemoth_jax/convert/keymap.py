"""The key table between Hugging Face Llama 4 tensors and our parameter leaves, with named transforms.

Each `Rule` maps one HF tensor (or one slice of it, for the fused expert `gate_up_proj`) to one of our
leaves. HF `nn.Linear` weights are `[out, in]`; ours are `x @ W` with heads split out. RoPE layout
needs no transform: both sides use interleaved pairs (see rope.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from behemoth_jax.config import LayerKind, ModelConfig

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Rule:
  ours: Path  # leaf path relative to the owner (model or block)
  hf: str  # HF tensor name relative to the owner's prefix
  to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
  to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
  part: tuple[int, int] | None = None  # (index, count): slice of the HF tensor's last axis


def _t(w, c):
  return w.T


def _heads_in(n_attr: str):
  """HF [n·H, D] → ours [D, n, H]."""
  return lambda w, c: w.T.reshape(c.hidden_size, getattr(c, n_attr), c.head_dim)


def _heads_in_inv(w, c):
  return w.reshape(w.shape[0], -1).T


def _o_in(w, c):  # HF [D, N·H] → ours [N, H, D]
  return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_in_inv(w, c):
  return w.reshape(-1, w.shape[-1]).T


def same(w, c):
  return w


def _half(index: int):
  return lambda w, c: np.split(w, 2, axis=-1)[index]


TOP_RULES = (
  Rule(("embed", "table_VD"), "model.embed_tokens.weight", same, same),
  Rule(("final_norm", "weight_D"), "model.norm.weight", same, same),
)
LM_HEAD = Rule(("lm_head_DV",), "lm_head.weight", _t, _t)

ATTN_RULES = (
  Rule(("input_norm", "weight_D"), "input_layernorm.weight", same, same),
  Rule(("post_attn_norm", "weight_D"), "post_attention_layernorm.weight", same, same),
  Rule(("attn", "wq_DNH"), "self_attn.q_proj.weight", _heads_in("num_heads"), _heads_in_inv),
  Rule(("attn", "wk_DKH"), "self_attn.k_proj.weight", _heads_in("num_kv_heads"), _heads_in_inv),
  Rule(("attn", "wv_DKH"), "self_attn.v_proj.weight", _heads_in("num_kv_heads"), _heads_in_inv),
  Rule(("attn", "wo_NHD"), "self_attn.o_proj.weight", _o_in, _o_in_inv),
)
MOE_RULES = (
  Rule(("ffn", "w_router_DE"), "feed_forward.router.weight", _t, _t),
  Rule(("ffn", "w_gate_EDF"), "feed_forward.experts.gate_up_proj", _half(0), same, part=(0, 2)),
  Rule(("ffn", "w_up_EDF"), "feed_forward.experts.gate_up_proj", _half(1), same, part=(1, 2)),
  Rule(("ffn", "w_down_EFD"), "feed_forward.experts.down_proj", same, same),
  Rule(("ffn", "shared", "w_gate_DF"), "feed_forward.shared_expert.gate_proj.weight", _t, _t),
  Rule(("ffn", "shared", "w_up_DF"), "feed_forward.shared_expert.up_proj.weight", _t, _t),
  Rule(("ffn", "shared", "w_down_FD"), "feed_forward.shared_expert.down_proj.weight", _t, _t),
)
DENSE_RULES = (
  Rule(("ffn", "w_gate_DF"), "feed_forward.gate_proj.weight", _t, _t),
  Rule(("ffn", "w_up_DF"), "feed_forward.up_proj.weight", _t, _t),
  Rule(("ffn", "w_down_FD"), "feed_forward.down_proj.weight", _t, _t),
)


# Vision tower (HF `vision_model.`), docs/ARCHITECTURE.md §4. Transforms read the vision config (`c.vision`).
def _vheads_in(w, c):  # HF [N·H, Dv] → ours [Dv, N, H]
  v = c.vision
  return w.T.reshape(v.hidden_size, v.num_heads, v.head_dim)


def _vbias_in(w, c):  # HF [N·H] → ours [N, H]
  return w.reshape(c.vision.num_heads, -1)


def _vbias_out(w, c):
  return w.reshape(-1)


def _vo_in(w, c):  # HF [Dv, N·H] → ours [N, H, Dv]
  v = c.vision
  return w.T.reshape(v.num_heads, v.head_dim, v.hidden_size)


VISION_TOP_RULES = (
  Rule(("patch_embed_PD",), "patch_embedding.linear.weight", _t, _t),
  Rule(("class_embedding_D",), "class_embedding", same, same),
  Rule(("pos_embedding_SD",), "positional_embedding_vlm", same, same),
  Rule(("ln_pre", "weight_D"), "layernorm_pre.weight", same, same),
  Rule(("ln_pre", "bias_D"), "layernorm_pre.bias", same, same),
  Rule(("ln_post", "weight_D"), "layernorm_post.weight", same, same),
  Rule(("ln_post", "bias_D"), "layernorm_post.bias", same, same),
  Rule(("adapter_fc1_FP",), "vision_adapter.mlp.fc1.weight", _t, _t),
  Rule(("adapter_fc2_PP",), "vision_adapter.mlp.fc2.weight", _t, _t),
)
VISION_LAYER_RULES = (
  Rule(("ln1", "weight_D"), "input_layernorm.weight", same, same),
  Rule(("ln1", "bias_D"), "input_layernorm.bias", same, same),
  Rule(("ln2", "weight_D"), "post_attention_layernorm.weight", same, same),
  Rule(("ln2", "bias_D"), "post_attention_layernorm.bias", same, same),
  Rule(("wq_DNH",), "self_attn.q_proj.weight", _vheads_in, _heads_in_inv),
  Rule(("wk_DNH",), "self_attn.k_proj.weight", _vheads_in, _heads_in_inv),
  Rule(("wv_DNH",), "self_attn.v_proj.weight", _vheads_in, _heads_in_inv),
  Rule(("bq_NH",), "self_attn.q_proj.bias", _vbias_in, _vbias_out),
  Rule(("bk_NH",), "self_attn.k_proj.bias", _vbias_in, _vbias_out),
  Rule(("bv_NH",), "self_attn.v_proj.bias", _vbias_in, _vbias_out),
  Rule(("wo_NHD",), "self_attn.o_proj.weight", _vo_in, _o_in_inv),
  Rule(("bo_D",), "self_attn.o_proj.bias", same, same),
  Rule(("fc1_DF",), "mlp.fc1.weight", _t, _t),
  Rule(("fc1_b_F",), "mlp.fc1.bias", same, same),
  Rule(("fc2_FD",), "mlp.fc2.weight", _t, _t),
  Rule(("fc2_b_D",), "mlp.fc2.bias", same, same),
)
PROJECTOR = Rule(("projector_PD",), "multi_modal_projector.linear_1.weight", _t, _t)


def block_rules(kind: LayerKind) -> tuple[Rule, ...]:
  return ATTN_RULES + (MOE_RULES if kind.moe else DENSE_RULES)


def layer_location(cfg: ModelConfig, num_cycles: int, i: int) -> tuple[Path, int | None]:
  """Where layer i lives in our tree: (path of its Block, index on the stacked layers axis or None)."""
  p = cfg.cycle_length
  if i < num_cycles * p:
    return ("decoder", "cycles", "blocks", i % p), i // p
  return ("decoder", "tail", i - num_cycles * p), None


@dataclass(frozen=True)
class Entry:
  """One HF tensor's contribution to one of our leaves (at `stack` on the layers axis, if stacked)."""

  hf_name: str
  leaf: Path
  stack: int | None
  rule: Rule


def entries(cfg: ModelConfig, num_cycles: int, prefix: str = "") -> Iterator[Entry]:
  """Every (HF tensor, our leaf) pair; `prefix` ('language_model.' for the multimodal class) applies
  to the text part."""
  for rule in TOP_RULES:
    yield Entry(prefix + rule.hf, rule.ours, None, rule)
  if not cfg.tie_word_embeddings:
    yield Entry(prefix + LM_HEAD.hf, LM_HEAD.ours, None, LM_HEAD)
  for i, kind in enumerate(cfg.layer_kinds):
    where, stack = layer_location(cfg, num_cycles, i)
    for rule in block_rules(kind):
      yield Entry(f"{prefix}model.layers.{i}.{rule.hf}", where + rule.ours, stack, rule)
  if cfg.vision is not None:
    yield from vision_entries(cfg)


def vision_entries(cfg: ModelConfig) -> Iterator[Entry]:
  """The vision tower and projector of a multimodal model (HF names are not prefixed)."""
  for rule in VISION_TOP_RULES:
    yield Entry("vision_model." + rule.hf, ("vision", *rule.ours), None, rule)
  for i in range(cfg.vision.num_layers):
    for rule in VISION_LAYER_RULES:
      yield Entry(f"vision_model.model.layers.{i}.{rule.hf}", ("vision", "layers", *rule.ours), i, rule)
  yield Entry(PROJECTOR.hf, PROJECTOR.ours, None, PROJECTOR)
