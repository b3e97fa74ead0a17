"""Rotary position embeddings: 1D text RoPE with llama3 scaling, interleaved-pair layout (docs/ARCHITECTURE.md §2.3).

HF Llama 4 stores q/k projection rows with dims (2j, 2j+1) forming complex number j, so we rotate
interleaved pairs and convert checkpoints without any permutation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from behemoth_jax.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies [H/2], float32, computed as HF does (float32 arithmetic)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
  if scaling is None:
    return inv_freq
  old_ctx = scaling.original_max_position_embeddings
  low_wavelen = old_ctx / scaling.low_freq_factor
  high_wavelen = old_ctx / scaling.high_freq_factor
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(scaling.factor), inv_freq).astype(np.float32)
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  if medium.any():  # With high == low this set is (almost surely) empty: never divide by zero.
    denom = scaling.high_freq_factor - scaling.low_freq_factor
    smooth = ((old_ctx / wavelen - scaling.low_freq_factor) / denom).astype(np.float32) if denom else 0.0
    smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
    scaled = np.where(medium, smoothed, scaled).astype(np.float32)
  return scaled


def rope_angles(positions_BT: jax.Array, inv_freq_J: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos, sin of position × frequency: float32 [B, T, H/2], computed once per forward pass.

  They leave through a matmul with the identity (exact: HIGHEST precision, one product by 1.0 per
  output) so that they are materialised: otherwise XLA:CPU fused cos and sin into every consumer's
  loop (q and k, forward and backward, every RoPE layer), evaluating both transcendentals once per
  element of [B, T, heads, H] instead of once per angle (docs/PERFORMANCE.md). `optimization_barrier`
  does not prevent it (the CPU pipeline removes barriers before fusion), and a `cond` is folded away
  when positions are the default 0..T-1."""
  j = len(inv_freq_J)
  a = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_J, jnp.float32)[None, None, :]
  both = jnp.concatenate([jnp.cos(a), jnp.sin(a)], axis=-1)
  both = jnp.einsum("BTJ,JK->BTK", both, jnp.eye(2 * j, dtype=jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return both[..., :j], both[..., j:]


def apply_rope(x_BTNH: jax.Array, cos_BTJ: jax.Array, sin_BTJ: jax.Array) -> jax.Array:
  """Rotates interleaved pairs (x[2j], x[2j+1]) by angle j, in float32; returns x's dtype."""
  *lead, h = x_BTNH.shape
  x = x_BTNH.astype(jnp.float32).reshape(*lead, h // 2, 2)
  re, im = x[..., 0], x[..., 1]
  cos, sin = cos_BTJ[:, :, None, :], sin_BTJ[:, :, None, :]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(*lead, h).astype(x_BTNH.dtype)
