"""Losses as pure functions: vocabulary-chunked cross-entropy and MoE auxiliary losses.

The cross-entropy never holds [B, T, V] logits: it scans over vocabulary chunks of `chunk` columns
with an online logsumexp, and recomputes each chunk's logits in the backward pass (jax.checkpoint).
A vocabulary that fits in one chunk keeps its logits instead (no second lm_head matmul).
At Behemoth's 202,048-token vocabulary that is the difference between 0.8 MB and 20 MB per token of
float32 logits.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from behemoth_jax.config import DISTILL_WEIGHTS
from behemoth_jax.model.moe import MoEStats
from sharding import axes as ax


def chunked_cross_entropy(
  h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
  """Σ mask · (logsumexp(h·W) − (h·W)[target]) and Σ mask · logsumexp², logits in float32.

  Returns (nll_sum, z_sum): sums, so callers normalise over the whole (accumulated) batch.
  On a mesh that splits the vocabulary (`sharding.axes.shards(VOCAB, V)` > 1) each device computes only its
  vocabulary shard's chunks (`_chunked_lse_and_target`).
  """
  h_BTD = h_BTD.astype(w_DV.dtype) if h_BTD.dtype != w_DV.dtype else h_BTD
  shards = ax.shards(ax.VOCAB, w_DV.shape[1])
  if shards == 1 and chunk >= w_DV.shape[1]:  # all logits fit in one chunk: keep them (no recompute)
    lse_BT, tgt_BT = _lse_and_target(_logits(h_BTD, w_DV), targets_BT)
  else:
    lse_BT, tgt_BT = _chunked_lse_and_target(h_BTD, w_DV, targets_BT, chunk, shards)
  mask_BT = mask_BT.astype(jnp.float32)
  return jnp.sum((lse_BT - tgt_BT) * mask_BT), jnp.sum(lse_BT**2 * mask_BT)


def _chunked_lse_and_target(h_BTD, w_DV, targets_BT, c: int, shards: int = 1):
  """(logsumexp, target logit) by a scan over vocabulary chunks of c columns with an online logsumexp;
  each chunk's logits are recomputed in the backward pass.

  The vocabulary is cut into `shards` contiguous parts (the mesh's vocab shards) and the scan runs over
  chunks of each part at once, carrying [S, B, T] per-shard statistics, combined over S only at the end:
  S is split over the devices that hold the head's columns, so each device's matmuls cover its V/S
  columns (not all V: its tokens are replicated over those devices) and the head is never gathered
  over the vocabulary. The hidden states are broadcast over S so that their gradient also accumulates
  per shard and is summed over the shards once, after the scan."""
  per = w_DV.shape[1] // shards
  c = even_chunk(per, c)
  w_NSDC = _chunks(w_DV, c, shards, constrain=True)
  h_SBTD = _by_shard(h_BTD, shards)

  @jax.checkpoint
  def body(carry, inp):
    m_SBT, s_SBT, tgt_SBT = carry
    w_SDC, j = inp
    _, col, valid = _columns(j, c, per, shards)
    logits = _on_shards(_chunk_logits(h_SBTD, w_SDC, valid))
    m_SBT, s_SBT, _, _ = _online_lse(m_SBT, s_SBT, logits)
    hit = (col == targets_BT[None, ..., None]) & valid  # a padding column is no target
    return (m_SBT, s_SBT, tgt_SBT + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)), None

  shape = (shards, *targets_BT.shape)
  init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
  init = tuple(_on_shards(a) for a in init)
  (m_SBT, s_SBT, tgt_SBT), _ = jax.lax.scan(body, init, (w_NSDC, jnp.arange(w_NSDC.shape[0])))
  return _lse_over_shards(m_SBT, s_SBT), tgt_SBT.sum(axis=0)


@jax.custom_vjp
def _logits(h_BTD: jax.Array, w_DV: jax.Array) -> jax.Array:
  """float32 `h · W`. Its backward pass is written out for XLA:CPU's sake: autodiff's dW = hᵀ·dlogits
  made XLA lay out a transposed copy of dlogits ([V, B·T]) for the dot, so the softmax gradient was
  computed twice (once per layout) from a materialised exp. Transposing h instead (B·T × D, V/D times
  smaller; the barrier keeps XLA from folding the transpose back into the dot) leaves one fused pass
  over dlogits (measured: 521 → 357 ms for bench-moe's cross-entropy forward + backward, [2048, 512]
  hidden states × [512, 8192] on 2 cores)."""
  return jnp.einsum("BTD,DV->BTV", h_BTD, w_DV, preferred_element_type=jnp.float32)


def _logits_fwd(h_BTD, w_DV):
  return _logits(h_BTD, w_DV), (h_BTD, w_DV)


def _logits_bwd(res, g_BTV):
  h_BTD, w_DV = res
  f32 = jnp.float32
  dh = jax.lax.dot_general(g_BTV, w_DV, (((2,), (1,)), ((), ())), preferred_element_type=f32)
  h_DN = jax.lax.optimization_barrier(h_BTD.reshape(-1, h_BTD.shape[-1]).T)
  dw = jax.lax.dot_general(
    h_DN, g_BTV.reshape(-1, g_BTV.shape[-1]), (((1,), (0,)), ((), ())), preferred_element_type=f32
  )
  return dh.astype(h_BTD.dtype), dw.astype(w_DV.dtype)


_logits.defvjp(_logits_fwd, _logits_bwd)


@jax.custom_vjp
def _lse_and_target(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(logsumexp over V, the target's logit). Written out so the backward pass is one fused pass over the
  logits (g_lse · softmax + g_tgt · one-hot) instead of autodiff's separate max/exp/scatter passes."""
  lse = jax.nn.logsumexp(logits_BTV, axis=-1)
  return lse, jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]


def _lse_and_target_fwd(logits_BTV, targets_BT):
  lse, tgt = _lse_and_target(logits_BTV, targets_BT)
  return (lse, tgt), (logits_BTV, lse, targets_BT)


def _lse_and_target_bwd(res, g):
  logits_BTV, lse_BT, targets_BT = res
  g_lse, g_tgt = g
  hit = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, logits_BTV.ndim - 1) == targets_BT[..., None]
  d = g_lse[..., None] * jnp.exp(logits_BTV - lse_BT[..., None]) + jnp.where(hit, g_tgt[..., None], 0.0)
  return d, None


_lse_and_target.defvjp(_lse_and_target_fwd, _lse_and_target_bwd)


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


def distillation_terms(
  student_logits_BTV: jax.Array,
  teacher_logp_BTK: jax.Array,
  targets_BT: jax.Array,
  temperature: float,
  teacher_ids_BTK: jax.Array | None = None,
):
  """Per-token (hard CE, soft KL, teacher margin max_v p_T(v) − p_T(label), p_T(label)), float32 [B, T].

  Teacher: log-probs over the whole vocabulary (online: `teacher_ids_BTK` None, K = V) or its top-k
  (offline records: `teacher_ids_BTK` the token ids). Soft targets are the teacher's distribution at
  temperature τ, softmax(log p_T / τ), renormalised over the top-k when sparse; the KL is scaled by τ²
  so its gradients keep their size as τ changes (Hinton et al. 2015).
  """
  s = student_logits_BTV.astype(jnp.float32)
  logp_s = jax.nn.log_softmax(s, axis=-1)
  ce = -jnp.take_along_axis(logp_s, targets_BT[..., None], axis=-1)[..., 0]
  t_logp = jax.lax.stop_gradient(teacher_logp_BTK.astype(jnp.float32))
  tau_s = jax.nn.log_softmax(s / temperature, axis=-1)
  tau_t = jax.nn.log_softmax(t_logp / temperature, axis=-1)
  if teacher_ids_BTK is None:
    label_p = jnp.exp(jnp.take_along_axis(t_logp, targets_BT[..., None], axis=-1)[..., 0])
  else:
    tau_s = jnp.take_along_axis(tau_s, teacher_ids_BTK, axis=-1)
    label_p = jnp.sum(jnp.where(teacher_ids_BTK == targets_BT[..., None], jnp.exp(t_logp), 0.0), axis=-1)
  # How far the teacher's favourite is ahead of the observed label (0 when it ranks the label top-1).
  margin = jnp.exp(jnp.max(t_logp, axis=-1)) - label_p
  kl = temperature**2 * jnp.sum(jnp.exp(tau_t) * (tau_t - tau_s), axis=-1)
  return ce, kl, margin, label_p


def soft_weight(
  kind: str,
  alpha: float,
  margin_BT: jax.Array,
  progress: jax.Array,
  teacher_label_p_BT: jax.Array | None = None,
  student_ce_BT: jax.Array | None = None,
) -> jax.Array:
  """Weight w of the soft term per token; the loss is (1 − w)·CE + w·KL.

  fixed: α. scheduled (default): α·(1 − progress), soft early, hard late. dynamic: α·(1 − (max_v p_T(v) −
  p_T(label))): the teacher's full distribution wherever it ranks the observed token first, giving way
  to the label by as much as the teacher's favourite beats it. relative: α·p_T(y) / (p_T(y) + p_S(y)),
  p_S(y) = exp(−CE) without gradient: the teacher counts where it gives the observed token more
  probability than the student does by now, so a teacher the student has caught up with fades out.
  """
  if kind == "relative":
    p_s = jnp.exp(-jax.lax.stop_gradient(student_ce_BT))
    return alpha * teacher_label_p_BT / (teacher_label_p_BT + p_s)
  if kind == "none":
    return jnp.zeros_like(margin_BT)
  if kind == "fixed":
    return jnp.full_like(margin_BT, alpha)
  if kind == "scheduled":
    return jnp.full_like(margin_BT, alpha) * (1.0 - progress)
  if kind == "dynamic":
    return alpha * (1.0 - margin_BT)
  raise ValueError(f"distill.weight: must be one of {DISTILL_WEIGHTS}, got {kind!r}")


def chunked_distillation_terms(
  h_BTD: jax.Array,
  w_DV: jax.Array,
  targets_BT: jax.Array,
  temperature: float,
  chunk: int,
  teacher_h_BTD: jax.Array | None = None,
  teacher_w_DV: jax.Array | None = None,
  teacher_logp_BTK: jax.Array | None = None,
  teacher_ids_BTK: jax.Array | None = None,
):
  """`distillation_terms` without [B, T, V] logits of either model: (hard CE, τ²·KL, teacher margin,
  p_T(label)) per token, float32 [B, T], from the student's final hidden states and LM head and either the
  teacher's (online: `teacher_h_BTD`, `teacher_w_DV`) or its top-k log-probs and ids (offline).

  A scan over vocabulary chunks of `chunk` columns keeps online log-sum-exps of s, s/τ, t and t/τ and
  the sums the KL needs, Σ_v p_Tτ(v)·(t_v − s_v) = A / S_Tτ with A rescaled like S:
      KL = τ² · (E_pTτ[t − s] / τ − lse(t/τ) + lse(s/τ)).
  The backward pass (written out, no autodiff through the scan) recomputes each chunk's logits and
  gives the student dlogits = g_ce·(p_S − onehot(label)) + g_kl·τ·(p_Sτ − p_Tτ); the teacher is frozen
  (no gradient) and the margin and p_T(label), functions of the teacher alone, carry none.
  """
  online = teacher_h_BTD is not None
  h_BTD = h_BTD.astype(w_DV.dtype) if h_BTD.dtype != w_DV.dtype else h_BTD
  if online:
    teacher = (jax.lax.stop_gradient(teacher_h_BTD.astype(teacher_w_DV.dtype)), jax.lax.stop_gradient(teacher_w_DV))
  else:
    teacher = (jax.lax.stop_gradient(teacher_logp_BTK.astype(jnp.float32)), teacher_ids_BTK)
  # A chunk wider than the vocabulary would only add padding columns (and libtpu 0.0.42.1 fails with an
  # INTERNAL RET_CHECK on the slice of the all-reduced head gradient padded 16x: tiny config, v5p-8).
  shards = ax.shards(ax.VOCAB, w_DV.shape[1])
  chunk = even_chunk(w_DV.shape[1] // shards, int(chunk))
  return _distill(float(temperature), chunk, online, shards, h_BTD, w_DV, targets_BT, teacher)


def even_chunk(per: int, c: int) -> int:
  """As few chunks of at most c columns as cover `per`, evened out (202048 / 4 in 8192s: 13% padding)."""
  return -(-per // -(-per // c))


def _chunks(w_DV: jax.Array, c: int, shards: int | None = None, constrain: bool = False) -> jax.Array:
  """[D, V] → [N, D, c] column chunks, the last padded with zero columns (masked by the callers); with
  `shards`: [N, S, D, c], chunk j of each of S contiguous vocabulary parts (each padded alone), S placed
  on the vocabulary's mesh axes when `constrain` (and S > 1: one shard has nothing to place)."""
  d, v = w_DV.shape
  s = shards or 1
  n = -(-(v // s) // c)
  w_DSN = jnp.pad(w_DV.reshape(d, s, v // s), ((0, 0), (0, 0), (0, n * c - v // s)))
  w_NSDC = w_DSN.reshape(d, s, n, c).transpose(2, 1, 0, 3)
  if constrain and s > 1:
    w_NSDC = ax.constrain(w_NSDC, (None, ax.VOCAB, None, None))
  return w_NSDC if shards else w_NSDC[:, 0]


_LEAD = (ax.VOCAB, ax.BATCH, ax.LENGTH)  # [S, B, T, ...]: vocabulary shards, then the tokens


def _by_shard(x_BT_: jax.Array, shards: int) -> jax.Array:
  """[B, T, ...] → [S, B, T, ...] broadcast over the vocabulary shards (each device holds its own copy,
  so a gradient accumulates per shard and is summed over them once)."""
  return _on_shards(jnp.broadcast_to(x_BT_, (shards, *x_BT_.shape)))


def _on_shards(x_SBT_: jax.Array) -> jax.Array:
  """[S, B, T, ...] placed with S on the vocabulary's mesh axes and the tokens on theirs (one shard: left
  as it is)."""
  return ax.constrain(x_SBT_, _LEAD + (None,) * (x_SBT_.ndim - 3)) if x_SBT_.shape[0] > 1 else x_SBT_


def _scan_inputs(h_BTD, w_DV, teacher, c: int, online: bool, shards: int):
  """(student hidden states [S, B, T, D], teacher's or None, the scans' xs: head chunks [N, S, D, C],
  the teacher's or None, the chunk index)."""
  w_NSDC = _chunks(w_DV, c, shards, constrain=True)
  xs = (w_NSDC, _chunks(teacher[1], c, shards, constrain=True) if online else None, jnp.arange(w_NSDC.shape[0]))
  return _by_shard(h_BTD, shards), (_by_shard(teacher[0], shards) if online else None), xs


def _columns(j, c: int, per: int, shards: int):
  """Chunk j of every shard: (column within its shard [1, 1, 1, C], global column id [S, 1, 1, C],
  valid [1, 1, 1, C]: a shard's last chunk may overrun it, into ids that are the next shard's)."""
  local = (j * c + jnp.arange(c))[None, None, None, :]
  return local, (jnp.arange(shards) * per)[:, None, None, None] + local, local < per


def _student_chunk(h_BTD, w_DC, j, c: int, v: int):
  """(column ids [1, 1, C], the student's logits of chunk j, padding columns −inf)."""
  col_C = (j * c + jnp.arange(c))[None, None, :]
  return col_C, _chunk_logits(h_BTD, w_DC, col_C < v)


def _chunk_logits(h_BTD, w_DC, valid):
  """float32 logits of one chunk ([B, T, C], or [S, B, T, C] per shard), invalid columns −inf."""
  if h_BTD.ndim == 4:
    return jnp.where(valid, _per_shard("SBTD,SDC->SBTC", h_BTD, w_DC), -jnp.inf)
  logits = jnp.einsum("BTD,DC->BTC", h_BTD, w_DC, preferred_element_type=jnp.float32)
  return jnp.where(valid, logits, -jnp.inf)


def _per_shard(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """float32 einsum batched over the vocabulary shards S (both operands' first axis). One shard is
  squeezed out: a dot with a batch axis of size 1 made XLA keep an extra copy of the whole head (+8 GiB
  for a [8192, 262144] float32 head, tests/test_aot.py)."""
  if a.shape[0] == 1:
    return jnp.einsum(eq.replace("S", ""), a[0], b[0], preferred_element_type=jnp.float32)[None]
  return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def _online_lse(m_BT, s_BT, x_BTC):
  """One step of an online log-sum-exp: (running max, rescaled sum) after chunk x; also the rescale
  factor of the old sum and exp(x − new max), for sums that share the rescaling."""
  m_new = jnp.maximum(m_BT, x_BTC.max(axis=-1))
  scale = jnp.exp(m_BT - m_new)
  e_BTC = jnp.exp(x_BTC - m_new[..., None])
  return m_new, s_BT * scale + e_BTC.sum(axis=-1), scale, e_BTC


def _local_ids(ids_BTK, start, c, per=None, offset=0):
  """(ids relative to a chunk starting at `start`, 0 outside it; inside) — with `per`, a chunk at
  column `offset` of its shard holds only the ids before the shard's end."""
  local = ids_BTK - start
  inside = (local >= 0) & (local < c)
  if per is not None:
    inside = inside & (offset + local < per)
  return jnp.where(inside, local, 0), inside


def _lse_over_shards(m_SBT, s_SBT):
  return jax.nn.logsumexp(m_SBT + jnp.log(s_SBT), axis=0)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _distill(tau, c, online, shards, h_BTD, w_DV, targets_BT, teacher):
  return _distill_fwd(tau, c, online, shards, h_BTD, w_DV, targets_BT, teacher)[0]


def _distill_fwd(tau, c, online, shards, h_BTD, w_DV, targets_BT, teacher):
  """Per vocabulary shard (S, the mesh's: `_chunked_lse_and_target`), the scan's statistics [S, B, T],
  combined over the shards after it."""
  per = w_DV.shape[1] // shards
  shape, f32 = (shards, *targets_BT.shape), jnp.float32
  neg, zero = _on_shards(jnp.full(shape, -jnp.inf, f32)), _on_shards(jnp.zeros(shape, f32))
  h_SBTD, t_h, xs = _scan_inputs(h_BTD, w_DV, teacher, c, online, shards)
  t_logp, ids = (None, None) if online else teacher
  tgt = targets_BT[None, ..., None]

  def body(carry, x):
    st = dict(carry)
    w_SDC, tw_SDC, j = x
    _, col, valid = _columns(j, c, per, shards)
    s = _chunk_logits(h_SBTD, w_SDC, valid)
    st["m_s"], st["S_s"], _, _ = _online_lse(st["m_s"], st["S_s"], s)
    st["m_sT"], st["S_sT"], _, _ = _online_lse(st["m_sT"], st["S_sT"], s / tau)
    hit = (col == tgt) & valid
    st["s_lab"] = st["s_lab"] + jnp.sum(jnp.where(hit, s, 0.0), axis=-1)
    if online:
      t = _chunk_logits(t_h, tw_SDC, valid)
      st["m_t"], st["S_t"], _, _ = _online_lse(st["m_t"], st["S_t"], t)
      st["m_tT"], st["S_tT"], scale, e = _online_lse(st["m_tT"], st["S_tT"], t / tau)
      st["A"] = st["A"] * scale + jnp.sum(e * jnp.where(valid, t - s, 0.0), axis=-1)
      st["t_lab"] = st["t_lab"] + jnp.sum(jnp.where(hit, t, 0.0), axis=-1)
      st["t_max"] = jnp.maximum(st["t_max"], t.max(axis=-1))
    else:
      local, inside = _local_ids(ids[None], col[..., :1], c, per, j * c)
      st["s_ids"] = st["s_ids"] + jnp.where(inside, jnp.take_along_axis(s, local, axis=-1), 0.0)
    return st, None

  init = {"m_s": neg, "S_s": zero, "m_sT": neg, "S_sT": zero, "s_lab": zero}
  if online:
    init |= {"m_t": neg, "S_t": zero, "m_tT": neg, "S_tT": zero, "A": zero, "t_lab": zero, "t_max": neg}
  else:
    init["s_ids"] = _on_shards(jnp.zeros((*shape, ids.shape[-1]), f32))
  st, _ = jax.lax.scan(body, init, xs)
  lse_s = _lse_over_shards(st["m_s"], st["S_s"])
  lse_sT = _lse_over_shards(st["m_sT"], st["S_sT"])
  ce = lse_s - st["s_lab"].sum(axis=0)
  if online:
    lse_t = _lse_over_shards(st["m_t"], st["S_t"])
    lse_tT = _lse_over_shards(st["m_tT"], st["S_tT"])
    # E_pTτ[t − s]: each shard's A and S_Tτ are scaled by its own running max; bring them to one.
    rescale = jnp.exp(st["m_tT"] - st["m_tT"].max(axis=0, keepdims=True))
    mean_diff = jnp.sum(st["A"] * rescale, axis=0) / jnp.sum(st["S_tT"] * rescale, axis=0)
    kl = tau**2 * (mean_diff / tau - lse_tT + lse_sT)
    label_p = jnp.exp(st["t_lab"].sum(axis=0) - lse_t)
    margin = jnp.exp(st["t_max"].max(axis=0) - lse_t) - label_p
    teacher_res = lse_tT  # the backward pass rebuilds p_Tτ chunk by chunk from lse(t/τ)
  else:
    tau_t = jax.nn.log_softmax(t_logp / tau, axis=-1)
    tau_s = st["s_ids"].sum(axis=0) / tau - lse_sT[..., None]
    kl = tau**2 * jnp.sum(jnp.exp(tau_t) * (tau_t - tau_s), axis=-1)
    label_p = jnp.sum(jnp.where(ids == targets_BT[..., None], jnp.exp(t_logp), 0.0), axis=-1)
    margin = jnp.exp(jnp.max(t_logp, axis=-1)) - label_p
    teacher_res = jnp.exp(tau_t)  # p_Tτ over the top-k
  return (ce, kl, margin, label_p), (h_BTD, w_DV, targets_BT, teacher, lse_s, lse_sT, teacher_res)


def _distill_bwd(tau, c, online, shards, res, g):
  h_BTD, w_DV, targets_BT, teacher, lse_s, lse_sT, teacher_res = res
  g_ce, g_kl, _, _ = g  # the margin and p_T(label) depend on the teacher alone
  d, v = w_DV.shape
  per = v // shards
  h_SBTD, t_h, xs = _scan_inputs(h_BTD, w_DV, teacher, c, online, shards)
  n = xs[0].shape[0]
  nbt = targets_BT.size
  tgt, f32 = targets_BT[None, ..., None], jnp.float32

  def expand(x_BT):  # [B, T] → [1, B, T, 1]
    return x_BT[None, ..., None]

  def body(dh_SBTD, x):
    w_SDC, tw_SDC, j = x
    _, col, valid = _columns(j, c, per, shards)
    s = _chunk_logits(h_SBTD, w_SDC, valid)
    p_s = jnp.exp(s - expand(lse_s))
    p_sT = jnp.exp(s / tau - expand(lse_sT))
    if online:
      p_t = jnp.exp(_chunk_logits(t_h, tw_SDC, valid) / tau - expand(teacher_res))
    else:
      local, inside = _local_ids(teacher[1][None], col[..., :1], c, per, j * c)
      rows = jnp.arange(nbt)[:, None]
      p_res = jnp.where(inside, teacher_res[None], 0.0)
      p_t = jax.vmap(  # per shard: each scatters the top-k ids that fall in its chunk
        lambda loc, p: jnp.zeros((nbt, c), f32).at[rows, loc.reshape(nbt, -1)].add(p.reshape(nbt, -1))
      )(local, p_res).reshape(*s.shape)
    hit = (col == tgt) & valid
    dlogits = expand(g_ce) * (p_s - hit) + expand(g_kl * tau) * (p_sT - p_t)
    dlogits = jnp.where(valid, dlogits, 0.0)
    dh_SBTD = dh_SBTD + _per_shard("SBTC,SDC->SBTD", dlogits, w_SDC.astype(f32))
    return dh_SBTD, _per_shard("SBTD,SBTC->SDC", h_SBTD.astype(f32), dlogits)

  dh0 = _on_shards(jnp.zeros(h_SBTD.shape, f32))
  dh_SBTD, dw_NSDC = jax.lax.scan(body, dh0, xs)
  dw_DV = dw_NSDC.transpose(2, 1, 0, 3).reshape(d, shards, n * c)[:, :, :per].reshape(d, v)
  return dh_SBTD.sum(axis=0).astype(h_BTD.dtype), dw_DV.astype(w_DV.dtype), None, None


_distill.defvjp(_distill_fwd, _distill_bwd)


def chunked_topk_logprobs(h_BTD: jax.Array, w_DV: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  """(ids int32 [B, T, k], log-probs float32 [B, T, k]) of the k most likely next tokens, by a scan over
  vocabulary chunks (an online log-sum-exp and a running top-k merged with each chunk's), so no
  [B, T, V] logits exist: what scoring a long sequence of a 202K-vocabulary teacher needs (`generate
  --score`). Ties are broken toward the lower id, as `lax.top_k` over the whole vocabulary does."""
  v = w_DV.shape[1]
  c = min(int(chunk), v)
  k = min(int(k), v)
  w_NDC = _chunks(w_DV, c)
  shape = h_BTD.shape[:-1]

  def body(carry, x):
    m, s, top_v, top_i = carry
    w_DC, j = x
    col_C, logits = _student_chunk(h_BTD, w_DC, j, c, v)
    m, s, _, _ = _online_lse(m, s, logits)
    cv, ci = jax.lax.top_k(logits, min(k, c))
    # Running entries come from lower ids than this chunk's: listed first, top_k keeps them on ties.
    vals = jnp.concatenate([top_v, cv], axis=-1)
    ids = jnp.concatenate([top_i, (j * c + ci).astype(jnp.int32)], axis=-1)
    top_v, pick = jax.lax.top_k(vals, k)
    return (m, s, top_v, jnp.take_along_axis(ids, pick, axis=-1)), None

  init = (
    jnp.full(shape, -jnp.inf, jnp.float32),
    jnp.zeros(shape, jnp.float32),
    jnp.full((*shape, k), -jnp.inf, jnp.float32),
    jnp.zeros((*shape, k), jnp.int32),
  )
  (m, s, top_v, top_i), _ = jax.lax.scan(body, init, (w_NDC, jnp.arange(w_NDC.shape[0])))
  return top_i, top_v - (m + jnp.log(s))[..., None]
