"""Random tiny Hugging Face Llama 4 models, saved with save_pretrained, for parity tests."""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch
from flax import nnx
from transformers import Llama4ForCausalLM, Llama4TextConfig

BASE = dict(
  vocab_size=97,
  hidden_size=24,
  intermediate_size=20,
  intermediate_size_mlp=28,
  num_hidden_layers=4,
  num_attention_heads=6,
  num_key_value_heads=2,
  head_dim=10,
  num_local_experts=5,
  num_experts_per_tok=1,
  attention_chunk_size=5,
  floor_scale=4,
  attn_scale=0.3,
  rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
  max_position_embeddings=16384,
)


def make_hf_model(seed: int = 0, **overrides) -> Llama4ForCausalLM:
  torch.manual_seed(seed)
  cfg = Llama4TextConfig(**{**BASE, **overrides})
  cfg._attn_implementation = "eager"
  model = Llama4ForCausalLM(cfg).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:  # larger than HF's 0.02 init so every path moves the logits
        p.copy_(0.15 * torch.randn_like(p))
  return model


def save_hf(model, path) -> None:
  model.save_pretrained(str(path), safe_serialization=True)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


VISION = dict(
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=128,
  image_size=28,
  patch_size=7,
  pixel_shuffle_ratio=0.5,
  projector_input_dim=40,
  projector_output_dim=40,
  vision_output_dim=40,
  rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# Image-layout token ids inside the tiny vocabulary (97): <|patch|> 96, <|image_start|> 90, <|image_end|> 91.
MM_IDS = dict(image_token_index=96, boi_token_index=90, eoi_token_index=91)


def make_hf_mm_model(seed: int = 0, vision: dict | None = None, **text_overrides):
  """A random tiny Llama4ForConditionalGeneration (float32, eager attention)."""
  from transformers import Llama4Config, Llama4ForConditionalGeneration

  torch.manual_seed(seed)
  cfg = Llama4Config(text_config={**BASE, **text_overrides}, vision_config={**VISION, **(vision or {})}, **MM_IDS)
  cfg._attn_implementation = "eager"
  cfg.text_config._attn_implementation = "eager"
  cfg.vision_config._attn_implementation = "eager"
  model = Llama4ForConditionalGeneration(cfg).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def hf_mm_logits(model, ids: np.ndarray, pixel_values: np.ndarray | None) -> np.ndarray:
  with torch.no_grad():
    pv = None if pixel_values is None else torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32)
    return model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long), pixel_values=pv).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _our_logits(graphdef, state, ids, kwargs):
  return nnx.merge(graphdef, state)(ids, **kwargs)


def our_logits(model, ids, **kwargs) -> np.ndarray:
  """Our model's logits, jitted (eager dispatch of a whole model costs the suite minutes)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_our_logits(graphdef, state, np.asarray(ids), kwargs))
