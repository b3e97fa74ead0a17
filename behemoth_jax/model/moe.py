"""Llama 4 MoE feed-forward: sigmoid top-k router, sparse dropless dispatch, shared expert (docs/ARCHITECTURE.md §2.6).

`out = shared(x) + Σ_a expert_{e_a}(σ(logit_{e_a}) · x)`: the router score scales the expert's
*input* (SwiGLU is not homogeneous, so scaling the output would give other numbers). Tokens are
sorted by expert and run through a grouped matmul: each token-expert pair costs one expert's FLOPs.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from behemoth_jax.config import ModelConfig
from behemoth_jax.model.fp8 import fp8_grouped_matmul
from behemoth_jax.model.gmm import grouped_matmul, resolve_impl
from behemoth_jax.model.layers import SwiGLU, param, weight
from sharding import axes as ax


def _f8_ragged_dot(x_MK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  return jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E.astype(jnp.int32), preferred_element_type=jnp.float32)


class Routing(NamedTuple):
  experts_TA: jax.Array  # int32 chosen experts, best first
  scores_TA: jax.Array  # float32 sigmoid(logit) of each chosen expert
  logits_TE: jax.Array  # float32 router logits (for auxiliary losses and load statistics)


def route(logits_TE: jax.Array, k: int) -> Routing:
  """Top-k on raw logits; score = sigmoid(logit). No softmax, no renormalisation, no jitter."""
  logits_TE = logits_TE.astype(jnp.float32)
  top_TA, experts_TA = jax.lax.top_k(logits_TE, k)
  return Routing(experts_TA.astype(jnp.int32), jax.nn.sigmoid(top_TA), logits_TE)


def inverse_permutation(perm: jax.Array) -> jax.Array:
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


@jax.custom_vjp
def permute(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
  """`x[perm]` for a permutation; its gradient is the inverse gather, not a scatter-add."""
  return x[perm]


def _permute_fwd(x, perm, inverse):
  return x[perm], inverse


def _permute_bwd(inverse, g):
  return g[inverse], None, None


permute.defvjp(_permute_fwd, _permute_bwd)


def moe_dispatch(
  x_TD: jax.Array, experts_TA: jax.Array, scores_TA: jax.Array, num_experts: int, expert_fn
) -> jax.Array:
  """Sorts token-expert pairs by expert, applies `expert_fn(xs_MD, group_sizes_E)`, unsorts, sums over k.

  Each pair's input is the token scaled by its router score (docs/ARCHITECTURE.md §2.6)."""
  t, d = x_TD.shape
  k = experts_TA.shape[1]
  expert_M = experts_TA.reshape(-1)  # pair m = token * k + slot
  order_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)
  inverse_M = inverse_permutation(order_M)
  group_sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
  x_MD = jnp.repeat(x_TD, k, axis=0) if k > 1 else x_TD
  scores_M = scores_TA.reshape(-1, 1).astype(x_TD.dtype)
  xs_MD = permute(x_MD * scores_M, order_M, inverse_M)
  ys_MD = expert_fn(xs_MD, group_sizes_E)
  return permute(ys_MD, inverse_M, order_M).reshape(t, k, d).sum(axis=1)


class MoEStats(NamedTuple):
  """Per-layer router statistics (always computed; cheap): load balance, z-loss, logging."""

  load_E: jax.Array  # fraction of token-expert assignments per expert (sums to 1)
  prob_E: jax.Array  # mean sigmoid router probability per expert
  z: jax.Array  # mean over tokens of logsumexp(router logits)²


def routing_stats(routing: Routing, num_experts: int) -> MoEStats:
  counts = jnp.zeros((num_experts,), jnp.float32).at[routing.experts_TA.reshape(-1)].add(1.0)
  z = jnp.mean(jax.nn.logsumexp(routing.logits_TE, axis=-1) ** 2)
  return MoEStats(counts / counts.sum(), jnp.mean(jax.nn.sigmoid(routing.logits_TE), axis=0), z)


def routed_experts(
  cfg: ModelConfig,
  x_TD: jax.Array,
  experts_TA: jax.Array,
  scores_TA: jax.Array,
  w_gate_EDF: jax.Array,
  w_up_EDF: jax.Array,
  w_down_EFD: jax.Array,
  exchange=None,
) -> jax.Array:
  """Sparse experts on the tokens at hand (weights may hold only this device's experts).

  `exchange(xs_MD, group_sizes_E, fn, weights, permute, kind=, capacity=)`, when given, moves the
  expert-sorted rows to the devices that own their experts, applies `fn(rows, local_group_sizes,
  *weights)` there and brings the results back (sharding/expert.py).
  """
  dt = x_TD.dtype

  def gmm(x, w, group_sizes):
    run = lambda a, b, gs: grouped_matmul(a, b, gs, impl=cfg.moe_impl, block=cfg.moe_block_size)
    if cfg.fp8 and resolve_impl(cfg.moe_impl) == "ragged":  # TPU / GPU: f8 operands into the grouped GEMMs
      return fp8_grouped_matmul(x, w.astype(dt), group_sizes, _f8_ragged_dot).astype(dt)
    if cfg.fp8:  # f8 values carried exactly in bf16 so every grouped-matmul backend accepts them
      return fp8_grouped_matmul(x, w.astype(dt), group_sizes, run, carrier_dtype=jnp.bfloat16).astype(dt)
    return run(x, w.astype(dt), group_sizes)

  def swiglu(xs_MD, group_sizes, w_gate, w_up, w_down):
    return gmm(jax.nn.silu(gmm(xs_MD, w_gate, group_sizes)) * gmm(xs_MD, w_up, group_sizes), w_down, group_sizes)

  weights = (w_gate_EDF, w_up_EDF, w_down_EFD)
  if exchange is None:
    expert_fn = lambda xs, gs: swiglu(xs, gs, *weights)  # noqa: E731
  else:
    kw = dict(kind=cfg.moe_exchange, capacity=cfg.moe_capacity)
    expert_fn = lambda xs, gs: exchange(xs, gs, swiglu, weights, permute, **kw)  # noqa: E731
  return moe_dispatch(x_TD, experts_TA, scores_TA, cfg.num_experts, expert_fn)


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    std, pd = cfg.initializer_range, cfg.param_dtype
    self.cfg = cfg
    q = dict(quant=cfg.weight_quant, dtype=cfg.dtype)
    self.w_router_DE = param(rngs, (d, e), (ax.EMBED, None), pd, std)
    self.w_gate_EDF = weight(rngs, (e, d, f), (ax.EXPERTS, ax.EMBED, ax.MLP), pd, std, **q)
    self.w_up_EDF = weight(rngs, (e, d, f), (ax.EXPERTS, ax.EMBED, ax.MLP), pd, std, **q)
    self.w_down_EFD = weight(rngs, (e, f, d), (ax.EXPERTS, ax.MLP, ax.EMBED), pd, std, **q)
    self.shared = SwiGLU(d, cfg.shared_intermediate_size, pd, std, rngs, fp8=cfg.fp8, **q)

  def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, MoEStats]:
    b, t, d = x_BTD.shape
    x_TD = x_BTD.reshape(b * t, d)
    logits_TE = jnp.einsum(
      "TD,DE->TE", x_TD, self.w_router_DE[...].astype(x_TD.dtype), preferred_element_type=jnp.float32
    )
    routing = route(logits_TE, self.cfg.num_experts_per_tok)
    routed = ax.run_experts(
      partial(routed_experts, self.cfg),
      x_TD,
      routing.experts_TA,
      routing.scores_TA,
      self.w_gate_EDF[...],
      self.w_up_EDF[...],
      self.w_down_EFD[...],
    )
    y = (self.shared(x_TD) + routed).reshape(b, t, d)
    return y, routing_stats(routing, self.cfg.num_experts)
