"""Random tiny Hugging Face Llama 4 models, saved with save_pretrained, for parity tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

BASE = dict(
    vocab_size=97, hidden_size=24, intermediate_size=20, intermediate_size_mlp=28, num_hidden_layers=4,
    num_attention_heads=6, num_key_value_heads=2, head_dim=10, num_local_experts=5, num_experts_per_tok=1,
    attention_chunk_size=5, floor_scale=4, attn_scale=0.3, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=16384,
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
