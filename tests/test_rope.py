"""RoPE angles: exact values, and computed once per forward pass however many layers use them."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from behemoth_jax.model.rope import apply_rope, inv_frequencies, rope_angles


def test_angles_are_exact_cos_and_sin():
  inv = inv_frequencies(16, 500000.0, None)
  pos = np.array([[0, 1, 2, 700, 65535], [3, 3, 9, 10, 11]], np.int32)
  cos, sin = jax.jit(lambda p: rope_angles(p, inv))(jnp.asarray(pos))
  angles = pos.astype(np.float32)[..., None] * inv[None, None, :]
  # XLA's cos/sin against numpy's: a few ulp apart, never more (the identity matmul adds nothing)
  np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=2e-7)
  np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=2e-7)
  direct = jax.jit(
    lambda p: (
      jnp.cos(p.astype(jnp.float32)[..., None] * inv[None, None]),
      jnp.sin(p.astype(jnp.float32)[..., None] * inv[None, None]),
    )
  )
  for got, want in zip((cos, sin), direct(jnp.asarray(pos)), strict=True):
    np.testing.assert_array_equal(got, want)  # bitwise what a plain cos/sin gives


def test_angles_are_evaluated_once_for_every_layer():
  """Compiled forward + backward of four rotated q/k pairs: one cosine and one sine over [B, T, H/2]
  (XLA:CPU fused them into every consumer before, once per element of each q and k)."""
  b, t, n, h = 2, 64, 4, 16
  inv = inv_frequencies(h, 500000.0, None)
  x = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)

  def loss(q, k):
    cos, sin = rope_angles(jnp.broadcast_to(jnp.arange(t), (b, t)), inv)
    return sum((apply_rope(q * (i + 1), cos, sin) * apply_rope(k, cos, sin)).sum() for i in range(4))

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, x).compile().as_text()
  for op in ("cosine", "sine"):
    shapes = re.findall(rf"= f32\[([\d,]*)\]\S* {op}\(", hlo)
    assert [s for s in shapes if s] == [f"{b},{t},{h // 2}"], (op, shapes)
