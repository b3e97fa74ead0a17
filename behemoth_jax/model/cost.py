"""What a model costs on paper, from its config alone: the matmul FLOPs of a forward pass (MFU divides
by it; docs/PERFORMANCE.md compares compiled programs with it) and the bytes of its KV caches."""

from __future__ import annotations

from behemoth_jax.config import ModelConfig


def analytic_forward_flops(cfg: ModelConfig, batch: int, seq: int) -> dict[str, float]:
  """Forward FLOPs a perfect sparse implementation must do: 2 · active matmul parameters · tokens
  (router, routed top-k and shared experts, dense MLPs, attention projections, lm_head) and attention
  over the keys each query really attends (causal, chunk-local). Training is 3× this."""
  d, h, n, kv, k = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.num_experts_per_tok
  params, attended = d * cfg.vocab_size, 0
  for i in range(cfg.num_layers):
    params += d * (n + 2 * kv) * h + n * h * d
    if cfg.is_moe_layer(i):
      params += d * cfg.num_experts + 3 * d * (cfg.intermediate_size * k + cfg.shared_intermediate_size)
    else:
      params += 3 * d * cfg.intermediate_size_mlp
    c = min(cfg.attention_chunk_size or seq, seq) if cfg.is_chunked_layer(i) else seq
    attended += c * (c + 1) // 2 * (seq // c) + (seq % c) * (seq % c + 1) // 2
  return {"matmul_params": 2.0 * params * batch * seq, "attention": 4.0 * batch * n * h * attended}


def kv_cache_bytes(cfg, context: int, batch: int = 1, kv_bytes: float = 2) -> float:
  """Keys and values for `context` tokens: chunked layers keep one chunk (a ring, attention.KVCache),
  global (NoPE) layers every token."""
  mc = cfg.model
  per_token_layer = 2 * mc.num_kv_heads * mc.head_dim * kv_bytes
  total = 0.0
  for i in range(mc.num_layers):
    kind = mc.layer_kind(i)
    kept = min(context, mc.attention_chunk_size) if kind.chunked and mc.attention_chunk_size else context
    total += kept * per_token_layer
  return total * batch
