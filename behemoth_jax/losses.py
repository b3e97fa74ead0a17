"""Losses as pure functions: vocabulary-chunked cross-entropy and MoE auxiliary losses.

The cross-entropy never holds [B, T, V] logits: it scans over vocabulary chunks of `chunk` columns
with an online logsumexp, and recomputes each chunk's logits in the backward pass (jax.checkpoint).
At Behemoth's 202,048-token vocabulary that is the difference between 0.8 MB and 20 MB per token of
float32 logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from behemoth_jax.moe import MoEStats


def chunked_cross_entropy(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
  """Σ mask · (logsumexp(h·W) − (h·W)[target]) and Σ mask · logsumexp², logits in float32.

  Returns (nll_sum, z_sum): sums, so callers normalise over the whole (accumulated) batch.
  """
  d, v = w_DV.shape
  c = min(chunk, v)
  n = -(-v // c)
  w_NDC = jnp.pad(w_DV, ((0, 0), (0, n * c - v))).reshape(d, n, c).transpose(1, 0, 2)
  h_BTD = h_BTD.astype(w_DV.dtype) if h_BTD.dtype != w_DV.dtype else h_BTD

  @jax.checkpoint
  def body(carry, inp):
    m_BT, s_BT, tgt_BT = carry
    w_DC, j = inp
    logits = jnp.einsum("BTD,DC->BTC", h_BTD, w_DC.astype(h_BTD.dtype), preferred_element_type=jnp.float32)
    col_C = j * c + jnp.arange(c)
    logits = jnp.where(col_C[None, None, :] < v, logits, -jnp.inf)
    m_new = jnp.maximum(m_BT, logits.max(axis=-1))
    s_BT = s_BT * jnp.exp(m_BT - m_new) + jnp.exp(logits - m_new[..., None]).sum(axis=-1)
    tgt_BT = tgt_BT + jnp.sum(jnp.where(col_C[None, None, :] == targets_BT[..., None], logits, 0.0), axis=-1)
    return (m_new, s_BT, tgt_BT), None

  shape = targets_BT.shape
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
  (m_BT, s_BT, tgt_BT), _ = jax.lax.scan(body, init, (w_NDC, jnp.arange(n)))
  lse_BT = m_BT + jnp.log(s_BT)
  mask_BT = mask_BT.astype(jnp.float32)
  return jnp.sum((lse_BT - tgt_BT) * mask_BT), jnp.sum(lse_BT ** 2 * mask_BT)


def load_balancing_loss(stats: MoEStats) -> jax.Array:
  """Switch-style E · Σ_e f_e · P_e per MoE layer, averaged over layers (1.0 when perfectly balanced).

  f_e: share of assignments to expert e (not differentiable); P_e: expert e's share of the mean
  sigmoid router probability (differentiable; sigmoid routing has no softmax to take it from).
  """
  if stats.load_E.shape[0] == 0:
    return jnp.zeros((), jnp.float32)
  e = stats.load_E.shape[-1]
  p_LE = stats.prob_E / stats.prob_E.sum(axis=-1, keepdims=True)
  return jnp.mean(e * jnp.sum(jax.lax.stop_gradient(stats.load_E) * p_LE, axis=-1))


def router_z_loss(stats: MoEStats) -> jax.Array:
  """Mean over MoE layers of mean logsumexp(router logits)² (keeps router logits small)."""
  return jnp.mean(stats.z) if stats.z.shape[0] else jnp.zeros((), jnp.float32)
