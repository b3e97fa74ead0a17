"""Hugging Face `Llama4TextConfig` / `Llama4Config` dicts (config.json) ⇄ our `ModelConfig`.

HF class defaults fill keys absent from config.json, because that is what `transformers` itself does
with such a file. Errors are `ConfigError`s naming the HF field.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from behemoth_jax.config import (
  ConfigError,
  ModelConfig,
  RopeScaling,
  VisionConfig,
  check,
)

# HF Llama4TextConfig class defaults, for keys a config.json leaves out.
_HF_DEFAULTS = dict(
  vocab_size=202048,
  hidden_size=5120,
  intermediate_size=8192,
  intermediate_size_mlp=16384,
  num_hidden_layers=48,
  num_attention_heads=40,
  num_key_value_heads=8,
  head_dim=128,
  hidden_act="silu",
  max_position_embeddings=4096 * 32,
  initializer_range=0.02,
  rms_norm_eps=1e-5,
  tie_word_embeddings=False,
  num_experts_per_tok=1,
  num_local_experts=16,
  moe_layers=None,
  interleave_moe_layer_step=1,
  use_qk_norm=True,
  no_rope_layers=None,
  no_rope_layer_interval=4,
  attention_chunk_size=8192,
  layer_types=None,
  attn_temperature_tuning=True,
  floor_scale=8192,
  attn_scale=0.1,
  attention_bias=False,
  router_jitter_noise=0.0,
  rope_theta=500000.0,
)


def from_hf_config(hf: dict, **overrides: Any) -> ModelConfig:
  """Any valid HF Llama4 config → ModelConfig. A multimodal `Llama4Config` (model_type llama4) gives
  its `text_config` plus `vision` from `vision_config` and the image token ids."""
  vision = None
  if hf.get("model_type") == "llama4" or "text_config" in hf:
    # HF's vision class defaults do not fit together (vision_output_dim 7680 vs projector 4096), so a
    # wrapper without vision_config is read as text only.
    vision = _vision_from_hf(hf) if hf.get("vision_config") else None
    hf = hf.get("text_config") or {}
  mt = hf.get("model_type", "llama4_text")
  check(mt == "llama4_text", "model_type", f"expected llama4_text, got {mt!r}")
  c = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k in ("attention_chunk_size",)}}
  check(c["hidden_act"] == "silu", "hidden_act", f"only silu is supported, got {c['hidden_act']!r}")
  check(not c["attention_bias"], "attention_bias", "attention biases are not part of Llama 4")
  check(not c["router_jitter_noise"], "router_jitter_noise", "router jitter is not supported")
  n = c["num_hidden_layers"]
  head_dim = c["head_dim"] or c["hidden_size"] // c["num_attention_heads"]
  moe_layers = c["moe_layers"]
  if moe_layers is None:
    step = c["interleave_moe_layer_step"]
    moe_layers = list(range(step - 1, n, step))
  no_rope = c["no_rope_layers"] or [int((i + 1) % c["no_rope_layer_interval"] != 0) for i in range(n)]
  check(len(no_rope) >= n, "no_rope_layers", f"needs >= {n} entries, got {len(no_rope)}")
  nope_layers = [i for i in range(n) if not no_rope[i]]
  layer_types = c["layer_types"] or ["chunked_attention" if no_rope[i] else "full_attention" for i in range(n)]
  global_layers = [i for i in range(n) if layer_types[i] != "chunked_attention"]

  rope = dict(c.get("rope_parameters") or {})
  if not rope:
    rope = dict(c.get("rope_scaling") or {})
    rope.setdefault("rope_theta", c["rope_theta"])
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  scaling = None
  if rope_type == "llama3":
    scaling = RopeScaling(
      factor=float(rope["factor"]),
      low_freq_factor=float(rope["low_freq_factor"]),
      high_freq_factor=float(rope["high_freq_factor"]),
      original_max_position_embeddings=int(rope.get("original_max_position_embeddings", c["max_position_embeddings"])),
    )
  else:
    check(rope_type == "default", "rope_parameters.rope_type", f"unsupported RoPE type {rope_type!r}")
  eos = c.get("eos_token_id")
  eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
  fields = dict(
    vocab_size=c["vocab_size"],
    hidden_size=c["hidden_size"],
    num_layers=n,
    num_heads=c["num_attention_heads"],
    num_kv_heads=c["num_key_value_heads"] or c["num_attention_heads"],
    head_dim=head_dim,
    intermediate_size=c["intermediate_size"],
    intermediate_size_mlp=c["intermediate_size_mlp"],
    num_experts=c["num_local_experts"],
    num_experts_per_tok=c["num_experts_per_tok"],
    moe_layers=tuple(moe_layers),
    nope_layers=tuple(nope_layers),
    global_attn_layers=tuple(global_layers),
    attention_chunk_size=c["attention_chunk_size"],
    use_qk_norm=bool(c["use_qk_norm"]),
    rope_theta=float(rope.get("rope_theta", c["rope_theta"])),
    rope_scaling=scaling,
    rms_norm_eps=float(c["rms_norm_eps"]),
    attn_temperature_tuning=bool(c["attn_temperature_tuning"]),
    attn_scale=float(c["attn_scale"]),
    floor_scale=float(c["floor_scale"]),
    max_position_embeddings=c["max_position_embeddings"],
    tie_word_embeddings=bool(c["tie_word_embeddings"]),
    initializer_range=float(c["initializer_range"]),
    bos_token_id=c.get("bos_token_id") if c.get("bos_token_id") is not None else 200000,
    eos_token_ids=eos,
    pad_token_id=c.get("pad_token_id"),  # absent: no padding token, as in HF
  )
  fields["vision"] = vision
  fields.update(overrides)
  return ModelConfig(**fields)


# HF Llama4VisionConfig class defaults (they differ from the released values: docs/ARCHITECTURE.md §4).
_HF_VISION_DEFAULTS = dict(
  hidden_size=768,
  hidden_act="gelu",
  num_hidden_layers=34,
  num_attention_heads=16,
  num_channels=3,
  intermediate_size=5632,
  vision_output_dim=7680,
  image_size=448,
  patch_size=14,
  norm_eps=1e-5,
  pixel_shuffle_ratio=0.5,
  projector_input_dim=4096,
  projector_output_dim=4096,
  multi_modal_projector_bias=False,
  initializer_range=0.02,
  rope_theta=10000.0,
)


def _vision_from_hf(top: dict) -> VisionConfig:
  v = {**_HF_VISION_DEFAULTS, **{k: x for k, x in (top.get("vision_config") or {}).items() if x is not None}}
  check(v["hidden_act"] == "gelu", "vision_config.hidden_act", f"only exact gelu is supported, got {v['hidden_act']!r}")
  check(
    not v["multi_modal_projector_bias"],
    "vision_config.multi_modal_projector_bias",
    "projector biases are not part of Llama 4",
  )
  for name in ("image_size", "patch_size"):
    if isinstance(v[name], (list, tuple)):
      check(len(set(v[name])) == 1, f"vision_config.{name}", f"non-square {v[name]} is not supported")
      v[name] = v[name][0]
  theta = (v.get("rope_parameters") or {}).get("rope_theta", v["rope_theta"])
  ids = {
    k: top[hf_key]
    for k, hf_key in (
      ("image_token_id", "image_token_index"),
      ("boi_token_id", "boi_token_index"),
      ("eoi_token_id", "eoi_token_index"),
    )
    if top.get(hf_key) is not None
  }
  return VisionConfig(
    hidden_size=v["hidden_size"],
    num_layers=v["num_hidden_layers"],
    num_heads=v["num_attention_heads"],
    intermediate_size=v["intermediate_size"],
    image_size=v["image_size"],
    patch_size=v["patch_size"],
    num_channels=v["num_channels"],
    norm_eps=float(v["norm_eps"]),
    pixel_shuffle_ratio=float(v["pixel_shuffle_ratio"]),
    projector_input_dim=v["projector_input_dim"],
    projector_output_dim=v["projector_output_dim"],
    vision_output_dim=v["vision_output_dim"],
    rope_theta=float(theta),
    initializer_range=float(v["initializer_range"]),
    **ids,
  )


def to_hf_config(cfg: ModelConfig) -> dict:
  """ModelConfig → HF `Llama4TextConfig` dict (explicit layer lists, v5 `rope_parameters`), or with
  `cfg.vision` a multimodal `Llama4Config` dict (text_config + vision_config + image token ids)."""
  text = _to_hf_text_config(cfg)
  if cfg.vision is None:
    return text
  v = cfg.vision
  text.pop("architectures")
  vision = dict(
    model_type="llama4_vision_model",
    hidden_size=v.hidden_size,
    hidden_act="gelu",
    num_hidden_layers=v.num_layers,
    num_attention_heads=v.num_heads,
    num_channels=v.num_channels,
    intermediate_size=v.intermediate_size,
    vision_output_dim=v.vision_output_dim,
    image_size=v.image_size,
    patch_size=v.patch_size,
    norm_eps=v.norm_eps,
    vision_feature_select_strategy="default",
    initializer_range=v.initializer_range,
    pixel_shuffle_ratio=v.pixel_shuffle_ratio,
    projector_input_dim=v.projector_input_dim,
    projector_output_dim=v.projector_output_dim,
    multi_modal_projector_bias=False,
    rope_parameters={"rope_type": "default", "rope_theta": v.rope_theta},
  )
  return dict(
    model_type="llama4",
    architectures=["Llama4ForConditionalGeneration"],
    text_config=text,
    vision_config=vision,
    image_token_index=v.image_token_id,
    boi_token_index=v.boi_token_id,
    eoi_token_index=v.eoi_token_id,
    tie_word_embeddings=cfg.tie_word_embeddings,
  )


def _to_hf_text_config(cfg: ModelConfig) -> dict:
  check(
    cfg.shared_intermediate_size == cfg.intermediate_size,
    "model.shared_intermediate_size",
    "HF Llama4 has one width for routed and shared experts; cannot export differing widths",
  )
  check(not cfg.learned_pos_embedding, "model.learned_pos_embedding", "HF Llama4 has no text position table")
  n = cfg.num_layers
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
  moe_layers = [i for i in range(n) if cfg.is_moe_layer(i)]
  step = moe_layers[1] - moe_layers[0] if len(moe_layers) > 1 else 1
  return dict(
    model_type="llama4_text",
    architectures=["Llama4ForCausalLM"],
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    intermediate_size_mlp=cfg.intermediate_size_mlp,
    num_hidden_layers=n,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    hidden_act="silu",
    max_position_embeddings=cfg.max_position_embeddings,
    initializer_range=cfg.initializer_range,
    rms_norm_eps=cfg.rms_norm_eps,
    bos_token_id=cfg.bos_token_id,
    eos_token_id=list(cfg.eos_token_ids),
    pad_token_id=hf_pad_token_id(cfg),
    tie_word_embeddings=cfg.tie_word_embeddings,
    num_experts_per_tok=cfg.num_experts_per_tok,
    num_local_experts=cfg.num_experts,
    moe_layers=moe_layers,
    interleave_moe_layer_step=step,
    use_qk_norm=cfg.use_qk_norm,
    rope_parameters=rope,
    no_rope_layers=[int(cfg.uses_rope(i)) for i in range(n)],
    layer_types=["chunked_attention" if cfg.is_chunked_layer(i) else "full_attention" for i in range(n)],
    attention_chunk_size=cfg.attention_chunk_size,
    attn_temperature_tuning=cfg.attn_temperature_tuning,
    floor_scale=int(cfg.floor_scale) if float(cfg.floor_scale).is_integer() else cfg.floor_scale,
    attn_scale=cfg.attn_scale,
    attention_bias=False,
    dtype=cfg.param_dtype,
  )


def hf_pad_token_id(cfg: ModelConfig) -> int | None:
  """Our pad id if it is a token of the vocabulary, else None: transformers makes it the embedding's
  `padding_idx`, and `from_pretrained` asserts it lies inside the table."""
  pad = cfg.pad_token_id
  return pad if pad is not None and 0 <= pad < cfg.vocab_size else None


_DTYPE_KEYS = ("dtype", "torch_dtype")


def export_config(cfg: ModelConfig, source: dict | None, dtype: str | None) -> dict:
  """The config.json to write for `cfg`'s tensors, stored in `dtype` (None: mixed dtypes).

  With the `source` config.json this model was converted from, that file is kept as it was and only
  what our config changed is written over it (fields HF has and we do not model stay; values we
  would spell differently but that mean the same stay as the source spelled them). Without one, or
  when the model gained or lost its vision tower, the config is `to_hf_config(cfg)`."""
  ours = to_hf_config(cfg)
  before = None
  if source is not None:
    try:
      before = from_hf_config(source, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
    except ConfigError:
      before = None
  if before is None or (before.vision is None) != (cfg.vision is None):
    out = ours
    for key in _DTYPE_KEYS:
      out.pop(key, None)
      out.get("text_config", {}).pop(key, None)
    if dtype is not None:
      out["dtype"] = dtype
    return out
  out = copy.deepcopy(source)
  _write_changes(out, to_hf_config(before), ours)
  if dtype is not None:
    for tree in (out, out.get("text_config") or {}):
      present = [k for k in _DTYPE_KEYS if k in tree]
      for key in present:
        tree[key] = dtype
    if not any(k in out for k in _DTYPE_KEYS):
      out["dtype"] = dtype
  return out


def _write_changes(out: dict, before: dict, after: dict) -> None:
  """out[k] = after[k] wherever after differs from before (recursing into nested configs)."""
  for key, value in after.items():
    if key in _DTYPE_KEYS:
      continue
    old = before.get(key)
    if isinstance(value, dict) and isinstance(old, dict) and isinstance(out.get(key), dict):
      _write_changes(out[key], old, value)
    elif value != old:
      out[key] = value
