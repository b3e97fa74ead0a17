"""What a train step computes from the final hidden states on: the loss (cross-entropy or distillation, plus
the auxiliary MoE losses) and the step's metrics. Shared by the ordinary step (train/step.py) and the
layer-by-layer one (train/layerwise.py)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from behemoth_jax.config import TrainConfig
from behemoth_jax.train.losses import (
  chunked_cross_entropy,
  chunked_distillation_terms,
  load_balancing_loss,
  router_z_loss,
  soft_weight,
)


def loss_of_hidden(model, h, stats, batch: dict, tc: TrainConfig, total_tokens, distill, teacher_params, progress):
  """`step.loss_and_stats` from the final-normed hidden states `h` and the router statistics onwards."""
  extra = {}
  if distill is None:
    nll, _ = chunked_cross_entropy(h, model.lm_head_weight(), batch["targets"], batch["loss_mask"], tc.ce_chunk)
  else:
    dc, teacher_graphdef = distill
    if teacher_graphdef is None:  # offline: the teacher's top-k from the batch
      teacher_terms = {"teacher_logp_BTK": batch["teacher_topk_logp"], "teacher_ids_BTK": batch["teacher_topk_ids"]}
    else:
      teacher = nnx.merge(teacher_graphdef, teacher_params)
      th, _, _ = teacher.forward(
        teacher.embed_inputs(batch["inputs"], batch.get("pixel_values")), batch["positions"], batch["segment_ids"]
      )
      teacher_terms = {"teacher_h_BTD": th, "teacher_w_DV": teacher.lm_head_weight()}
    ce, kl, margin, label_p = chunked_distillation_terms(
      h, model.lm_head_weight(), batch["targets"], dc.temperature, tc.ce_chunk, **teacher_terms
    )
    w = soft_weight(dc.weight, dc.alpha, margin, progress, label_p, ce)
    m = batch["loss_mask"].astype(jnp.float32)
    nll = jnp.sum(((1 - w) * ce + w * kl) * m)
    extra = {
      "hard_ce": jnp.sum(ce * m) / total_tokens,
      "soft_kl": jnp.sum(kl * m) / total_tokens,
      "soft_weight": jnp.sum(w * m) / total_tokens,
    }
  ce = nll / total_tokens
  aux = tc.moe_aux_loss * load_balancing_loss(stats) + tc.router_z_loss * router_z_loss(stats)
  return ce + aux / tc.grad_accum, (ce, stats, extra)


def step_metrics(loss, ce, grad_norm, lr, tokens, stats, skipped, extra: dict) -> dict:
  return {
    "loss": loss,
    "ce": ce,
    "grad_norm": grad_norm,
    "lr": lr,
    "tokens": tokens,
    "expert_load_min": stats.load_E.min(axis=-1, initial=1.0),
    "expert_load_max": stats.load_E.max(axis=-1, initial=0.0),
    "router_z": stats.z,
    "skipped": skipped,
    **extra,
  }
