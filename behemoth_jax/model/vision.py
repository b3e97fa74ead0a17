"""The Llama 4 vision encoder (HF `Llama4VisionModel`, docs/ARCHITECTURE.md §3) and early fusion into the text stream.

Per tile: unfold patches (c, kh, kw order) → linear → append CLS *last* → add the learned position
table → LayerNorm → pre-LN ViT layers (biases, exact GELU, non-causal attention with 2D RoPE, x
first, 1-based, CLS angle 0) → LayerNorm → drop CLS → pixel shuffle → adapter MLP with GELU after
both layers. The multimodal projector (vision_output_dim → text hidden) lives on the model.

Tiles are the batch dimension (sharded like text batch); the ViT layers are stacked and scanned.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from behemoth_jax.config import VisionConfig
from behemoth_jax.model.layers import (
  BIAS,
  EMBEDDING,
  SCALE,
  param,
  remat,
  stack_modules,
)
from behemoth_jax.model.rope import apply_rope
from sharding import axes as ax


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
  """LayerNorm with weight and bias, statistics in float32, x's dtype out."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * _lead(w.astype(jnp.float32), y.ndim) + _lead(b.astype(jnp.float32), y.ndim)).astype(x.dtype)


def _lead(a: jax.Array, ndim: int) -> jax.Array:
  """`a` with leading unit axes up to `ndim` (explicit broadcasting: tests forbid rank promotion)."""
  return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)  # exact erf GELU (torch nn.GELU()); tanh is a pitfall


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, pd: str, rngs: nnx.Rngs):
    self.eps = eps
    self.weight_D = param(rngs, (dim,), (ax.VISION_EMBED,), pd, None, SCALE)
    self.bias_D = param(None, (dim,), (ax.VISION_EMBED,), pd, 0, BIAS)

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.weight_D[...], self.bias_D[...], self.eps)


def rope_2d_angles(cfg: VisionConfig) -> np.ndarray:
  """Angles [S+1, head_dim/2] of the vision 2D RoPE, float32 as HF computes them.

  Pair j < F rotates by (x+1)·f[j], pair F+j by (y+1)·f[j], f[j] = θ^(-2j/(2F)), F = head_dim/4,
  x = column, y = row of the patch; the CLS token (last) gets angle 0.
  """
  side, half = cfg.patches_per_side, cfg.head_dim // 2
  exps = np.arange(0, half, 2, dtype=np.int64)[: half // 2].astype(np.float32) / np.float32(half)
  freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exps)).astype(np.float32)
  idx = np.arange(side * side)
  x, y = (idx % side + 1).astype(np.float32), (idx // side + 1).astype(np.float32)
  angles = np.concatenate([x[:, None] * freq[None], y[:, None] * freq[None]], axis=-1).astype(np.float32)
  return np.concatenate([angles, np.zeros((1, half), np.float32)], axis=0)


class VisionLayer(nnx.Module):
  """Pre-LN ViT layer: x + attn(ln1(x)); x + fc2(gelu(fc1(ln2(x)))). Biases everywhere."""

  def __init__(self, cfg: VisionConfig, pd: str, rngs: nnx.Rngs):
    d, n, h, f, std = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, cfg.initializer_range
    self.eps = cfg.norm_eps
    self.ln1 = LayerNorm(d, cfg.norm_eps, pd, rngs)
    self.ln2 = LayerNorm(d, cfg.norm_eps, pd, rngs)
    self.wq_DNH = param(rngs, (d, n, h), (ax.VISION_EMBED, ax.VISION_HEADS, ax.HEAD_DIM), pd, std)
    self.wk_DNH = param(rngs, (d, n, h), (ax.VISION_EMBED, ax.VISION_HEADS, ax.HEAD_DIM), pd, std)
    self.wv_DNH = param(rngs, (d, n, h), (ax.VISION_EMBED, ax.VISION_HEADS, ax.HEAD_DIM), pd, std)
    self.wo_NHD = param(rngs, (n, h, d), (ax.VISION_HEADS, ax.HEAD_DIM, ax.VISION_EMBED), pd, std)
    self.bq_NH = param(None, (n, h), (ax.VISION_HEADS, ax.HEAD_DIM), pd, 0, BIAS)
    self.bk_NH = param(None, (n, h), (ax.VISION_HEADS, ax.HEAD_DIM), pd, 0, BIAS)
    self.bv_NH = param(None, (n, h), (ax.VISION_HEADS, ax.HEAD_DIM), pd, 0, BIAS)
    self.bo_D = param(None, (d,), (ax.VISION_EMBED,), pd, 0, BIAS)
    self.fc1_DF = param(rngs, (d, f), (ax.VISION_EMBED, ax.VISION_MLP), pd, std)
    self.fc1_b_F = param(None, (f,), (ax.VISION_MLP,), pd, 0, BIAS)
    self.fc2_FD = param(rngs, (f, d), (ax.VISION_MLP, ax.VISION_EMBED), pd, std)
    self.fc2_b_D = param(None, (d,), (ax.VISION_EMBED,), pd, 0, BIAS)

  def __call__(self, x_BSD: jax.Array, cos_SJ: jax.Array, sin_SJ: jax.Array) -> jax.Array:
    dt = x_BSD.dtype
    w = lambda p, ndim=0: _lead(p[...].astype(dt), ndim)  # noqa: E731
    h = self.ln1(x_BSD)
    q = jnp.einsum("BSD,DNH->BSNH", h, w(self.wq_DNH)) + w(self.bq_NH, 4)
    k = jnp.einsum("BSD,DNH->BSNH", h, w(self.wk_DNH)) + w(self.bk_NH, 4)
    v = jnp.einsum("BSD,DNH->BSNH", h, w(self.wv_DNH)) + w(self.bv_NH, 4)
    q = apply_rope(q, cos_SJ[None], sin_SJ[None])
    k = apply_rope(k, cos_SJ[None], sin_SJ[None])
    q = ax.constrain(q, (ax.BATCH, None, ax.ACT_HEADS, None))
    scores = jnp.einsum("BSNH,BsNH->BNSs", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # non-causal: every patch sees every patch
    attn = jnp.einsum("BNSs,BsNH->BSNH", probs, v)
    x_BSD = x_BSD + jnp.einsum("BSNH,NHD->BSD", attn, w(self.wo_NHD)) + w(self.bo_D, 3)
    h = gelu(jnp.einsum("BSD,DF->BSF", self.ln2(x_BSD), w(self.fc1_DF)) + w(self.fc1_b_F, 3))
    x_BSD = x_BSD + jnp.einsum("BSF,FD->BSD", h, w(self.fc2_FD)) + w(self.fc2_b_D, 3)
    return ax.constrain(x_BSD, (ax.BATCH, None, ax.ACT_EMBED))


def unfold_patches(pixels_NCHW: jax.Array, patch: int) -> jax.Array:
  """[N, C, H, W] → [N, (H/p)·(W/p), C·p·p]: row-major patches, features (c, kh, kw) with c slowest
  (torch.nn.Unfold's order)."""
  n, c, hgt, wid = pixels_NCHW.shape
  x = pixels_NCHW.reshape(n, c, hgt // patch, patch, wid // patch, patch)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (hgt // patch) * (wid // patch), c * patch * patch)


def pixel_shuffle(x_NPC: jax.Array, ratio: float) -> jax.Array:
  """HF's pixel shuffle, op for op: [N, s², C] → [N, (s·r)², C/r²]. Channel blocks come out in the
  order (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1) for r = 0.5 (docs/ARCHITECTURE.md §3)."""
  n, p, c = x_NPC.shape
  s = math.isqrt(p)
  x = x_NPC.reshape(n, s, s, c)
  x = x.reshape(n, s, int(s * ratio), int(c / ratio)).transpose(0, 2, 1, 3)
  x = x.reshape(n, int(s * ratio), int(s * ratio), int(c / ratio**2)).transpose(0, 2, 1, 3)
  return x.reshape(n, -1, x.shape[-1])


class VisionEncoder(nnx.Module):
  """Tiles [N, C, H, W] (normalised pixels) → image features [N, tokens_per_tile, vision_output_dim]."""

  def __init__(self, cfg: VisionConfig, param_dtype: str, remat_policy: str, rngs: nnx.Rngs):
    d, std, pd = cfg.hidden_size, cfg.initializer_range, param_dtype
    self.cfg = cfg
    self.remat_policy = remat_policy
    s = cfg.patches_per_side**2
    scale = d**-0.5
    self.patch_embed_PD = param(rngs, (cfg.num_channels * cfg.patch_size**2, d), (None, ax.VISION_EMBED), pd, std)
    self.class_embedding_D = param(rngs, (d,), (ax.VISION_EMBED,), pd, scale, EMBEDDING)
    self.pos_embedding_SD = param(rngs, (s + 1, d), (None, ax.VISION_EMBED), pd, scale, EMBEDDING)
    self.ln_pre = LayerNorm(d, cfg.norm_eps, pd, rngs)
    self.ln_post = LayerNorm(d, cfg.norm_eps, pd, rngs)
    self.layers = stack_modules(lambda r: VisionLayer(cfg, pd, r), cfg.num_layers, rngs.params())
    f_in, p_dim = int(d / cfg.pixel_shuffle_ratio**2), cfg.projector_output_dim
    self.adapter_fc1_FP = param(rngs, (f_in, cfg.projector_input_dim), (ax.MLP, ax.EMBED), pd, std)
    self.adapter_fc2_PP = param(rngs, (cfg.projector_input_dim, p_dim), (ax.EMBED, ax.MLP), pd, std)

  def __call__(self, pixels_NCHW: jax.Array, dtype: jnp.dtype) -> jax.Array:
    cfg = self.cfg
    n = pixels_NCHW.shape[0]
    want = (cfg.num_channels, cfg.image_size, cfg.image_size)
    if tuple(pixels_NCHW.shape[1:]) != want:
      raise ValueError(
        f"pixel_values: tiles of shape {tuple(pixels_NCHW.shape[1:])}, expected {want} "
        "(channels, height, width); see behemoth_jax.data.images.preprocess_image"
      )
    w = lambda p: p[...].astype(dtype)  # noqa: E731
    x = ax.constrain(pixels_NCHW.astype(dtype), (ax.BATCH, None, None, None))
    x = jnp.einsum("NSP,PD->NSD", unfold_patches(x, cfg.patch_size), w(self.patch_embed_PD))
    cls = jnp.broadcast_to(w(self.class_embedding_D), (n, 1, cfg.hidden_size))
    x = jnp.concatenate([x, cls], axis=1) + w(self.pos_embedding_SD)[None]  # CLS last (docs/ARCHITECTURE.md §3)
    x = ax.constrain(self.ln_pre(x), (ax.BATCH, None, ax.ACT_EMBED))
    angles = rope_2d_angles(cfg)
    cos, sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))
    graphdef, stacked = nnx.split(self.layers)
    body = remat(lambda h, st: (nnx.merge(graphdef, st)(h, cos, sin), None), self.remat_policy)
    x, _ = jax.lax.scan(body, x, stacked)
    x = self.ln_post(x)[:, :-1]  # drop CLS
    x = pixel_shuffle(x, cfg.pixel_shuffle_ratio)
    x = gelu(jnp.einsum("NSF,FP->NSP", x, w(self.adapter_fc1_FP)))
    return gelu(jnp.einsum("NSP,PQ->NSQ", x, w(self.adapter_fc2_PP)))


def fuse_image_features(
  x_BTD: jax.Array, input_ids_BT: jax.Array, features: jax.Array, image_token_id: int
) -> jax.Array:
  """Replaces the embeddings of `<|patch|>` tokens by image features, in order.

  features: [F, D] in row-major (batch, time) order over the whole batch (HF's layout), or
  [B, F, D] per row (row b's k-th image token takes features[b, k]; trailing rows of padding tiles
  are unused). With concrete ids a count mismatch raises ValueError.
  """
  mask = input_ids_BT == image_token_id
  per_row = features.ndim == 3
  if not isinstance(input_ids_BT, jax.core.Tracer):
    counts = np.asarray(mask).sum(axis=1)
    if per_row:
      bad = np.nonzero(counts > features.shape[1])[0]
      if bad.size:
        raise ValueError(
          f"pixel_values: row {bad[0]} has {counts[bad[0]]} image tokens (id {image_token_id}) "
          f"but only {features.shape[1]} image features"
        )
    elif counts.sum() != features.shape[0]:
      raise ValueError(
        f"pixel_values: the images give {features.shape[0]} image features but input_ids hold "
        f"{counts.sum()} image tokens (id {image_token_id}); each tile needs its placeholders"
      )
  if per_row:
    idx = jnp.cumsum(mask, axis=1) - 1
    gathered = jnp.take_along_axis(features, jnp.clip(idx, 0, features.shape[1] - 1)[..., None], axis=1)
  else:
    idx = (jnp.cumsum(mask.reshape(-1)) - 1).reshape(mask.shape)
    gathered = jnp.take(features, jnp.clip(idx, 0, features.shape[0] - 1), axis=0)
  return jnp.where(mask[..., None], gathered.astype(x_BTD.dtype), x_BTD)
