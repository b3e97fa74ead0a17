"""The pure parts of training: optimizer, the jitted train and eval steps, analytic FLOPs.

`train_step(state, batch) -> (state, metrics)` is one jit with the state donated. Batches are dicts of
[B, T] arrays (inputs, targets, segment_ids, positions, loss_mask) from `behemoth_jax.data`.
Gradient accumulation scans over micro-batches and normalises by the token count of the whole
batch, so it equals one large batch exactly (up to float summation order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from behemoth_jax.chips import chip_of
from behemoth_jax.config import ModelConfig, TrainConfig
from behemoth_jax.model.cost import analytic_forward_flops
from behemoth_jax.model.layers import EMBEDDING, WEIGHT
from behemoth_jax.train.layerwise import make_layerwise_train_step
from behemoth_jax.train.losses import (
  chunked_cross_entropy,
)
from behemoth_jax.train.objective import loss_of_hidden, step_metrics
from behemoth_jax.train.optim import clip_by_previous_norm, scale_by_adam_fp8
from behemoth_jax.train.state import State
from sharding import axes as ax


def make_schedule(tc: TrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
    0.0,
    tc.learning_rate,
    tc.warmup_steps,
    max(tc.steps, tc.warmup_steps + 1),
    end_value=tc.learning_rate * tc.min_lr_ratio,
  )


def decays(var: nnx.Variable) -> bool:
  """Whether AdamW decays a parameter, from what it is: weight matrices and embedding tables yes;
  norm scales, biases and any other parameter with one dimension (apart from the scanned `layers`
  axis: the vision class embedding) no."""
  axes = [a for a in var.get_metadata().get("out_sharding", ()) if a != ax.LAYERS]
  return var.get_metadata().get("kind") in (WEIGHT, EMBEDDING) and len(axes) >= 2


def decay_mask(params: nnx.State):
  """`decays` for every parameter: a tree of bools in the place of each nnx.Variable."""

  def mask(var):
    if not isinstance(var, nnx.Variable):
      raise TypeError(f"weight decay mask: expected nnx.Param leaves (their `kind` decides), got {type(var)}")
    return decays(var)

  return jax.tree.map(mask, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """AdamW with warmup + cosine, global-norm clipping, weight decay where `decays` says. With
  `train.layerwise_update` the clip reads the norm from its state, which the step sets (the norm it
  measured first, or the previous step's: train/layerwise.py)."""
  clip = clip_by_previous_norm if tc.layerwise_update else optax.clip_by_global_norm  # (train/layerwise.py)
  parts = [clip(tc.grad_clip)] if tc.grad_clip > 0 else []
  if tc.adam_moments == "fp8":  # optax.adamw's chain with 8-bit moments (train/optim.py)
    parts += [
      scale_by_adam_fp8(tc.adam_b1, tc.adam_b2),
      optax.add_decayed_weights(tc.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(make_schedule(tc)),
    ]
  else:
    parts.append(
      optax.adamw(make_schedule(tc), b1=tc.adam_b1, b2=tc.adam_b2, weight_decay=tc.weight_decay, mask=decay_mask)
    )
  return optax.chain(*parts)


def loss_and_stats(
  graphdef,
  params,
  batch: dict,
  tc: TrainConfig,
  total_tokens: jax.Array,
  distill=None,
  teacher_params=None,
  progress=None,
):
  """Loss of one micro-batch: its cross-entropy over the whole batch's token count, plus 1/grad_accum
  of the auxiliary losses, so summing over micro-batches gives the full-batch loss.

  With `distill` = (DistillConfig, teacher graphdef): (1 − w)·CE + w·τ²·KL per token against the
  frozen teacher's logits, computed in the same step, or (graphdef None) against the batch's offline
  teacher top-k; vocabulary-chunked like the cross-entropy (`losses.chunked_distillation_terms`): no
  [B, T, V] logits of either model.
  """
  model = nnx.merge(graphdef, params)
  h, stats, _ = model.forward(
    model.embed_inputs(batch["inputs"], batch.get("pixel_values")), batch["positions"], batch["segment_ids"]
  )
  return loss_of_hidden(model, h, stats, batch, tc, total_tokens, distill, teacher_params, progress)


def make_train_step(
  graphdef, tx: optax.GradientTransformation, tc: TrainConfig, schedule: optax.Schedule, distill=None
):
  """`train_step(state, batch[, teacher_params])`; with `distill` (DistillConfig, teacher graphdef)
  the teacher's parameters are the third argument (frozen: no gradient, no optimizer state).
  With `train.layerwise_update` the optimizer runs inside the backward pass (train/layerwise.py)."""
  if tc.layerwise_update:
    return make_layerwise_train_step(graphdef, tx, tc, schedule, distill)

  def train_step(state: State, batch: dict, teacher_params=None) -> tuple[State, dict]:
    params, n = state["params"], tc.grad_accum
    total = jnp.maximum(batch["loss_mask"].sum(), 1.0)
    progress = state["step"].astype(jnp.float32) / max(tc.steps, 1)
    grad_fn = jax.value_and_grad(
      lambda p, mb: loss_and_stats(graphdef, p, mb, tc, total, distill, teacher_params, progress), has_aux=True
    )
    micro = jax.tree.map(lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:]), batch)
    (loss, (ce, stats, extra)), grads = grad_fn(params, jax.tree.map(lambda a: a[0], micro))
    if n > 1:

      def body(acc, mb):
        (l, (c, s, e)), g = grad_fn(params, mb)
        return jax.tree.map(jnp.add, acc, (g, l, c, s, e)), None

      rest = jax.tree.map(lambda a: a[1:], micro)
      (grads, loss, ce, stats, extra), _ = jax.lax.scan(body, (grads, loss, ce, stats, extra), rest)
      stats = jax.tree.map(lambda a: a / n, stats)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update: parameters and optimizer state stay bitwise as
    # they were, the step (and the data) moves on, `skipped` counts it; train.py halts or logs by
    # `train.on_nonfinite`. (optax.apply_if_finite gates on gradients only and applies the update
    # anyway after max_consecutive_errors, so it is not used.) A cond, not a select over the whole
    # state: the skipped branch does no work and the taken one no extra pass (docs/PERFORMANCE.md).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params, opt_state):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    new_params, new_opt = jax.lax.cond(finite, update, lambda p, o: (p, o), params, state["opt_state"])
    new_state = {
      "params": new_params,
      "opt_state": new_opt,
      "step": state["step"] + 1,
      "skipped": state["skipped"] + (~finite).astype(jnp.int32),
    }
    metrics = step_metrics(loss, ce, grad_norm, schedule(state["step"]), total, stats, new_state["skipped"], extra)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, tc: TrainConfig):
  def eval_step(params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(Σ nll, Σ tokens) on one batch."""
    model = nnx.merge(graphdef, params)
    h, _, _ = model.forward(
      model.embed_inputs(batch["inputs"], batch.get("pixel_values")), batch["positions"], batch["segment_ids"]
    )
    nll, _ = chunked_cross_entropy(h, model.lm_head_weight(), batch["targets"], batch["loss_mask"], tc.ce_chunk)
    return nll, batch["loss_mask"].sum()

  return eval_step


def analytic_train_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
  """What MFU counts: 3 × the analytic forward (forward + two backward matmuls each)."""
  return 3.0 * sum(analytic_forward_flops(cfg, batch, seq).values())


def peak_flops_per_device() -> float | None:
  """The bf16 peak of this process's accelerator (behemoth_jax.chips), None if unknown (the CPU)."""
  chip = chip_of(jax.devices()[0].device_kind)
  return chip.peak_bf16_flops if chip else None
