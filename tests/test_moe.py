"""Sparse dropless MoE vs an independent dense all-experts reference: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from behemoth_jax.model.gmm import grouped_matmul
from behemoth_jax.model.moe import moe_dispatch, route


def dense_moe_reference(x, w_router, wg, wu, wd, k):
  """HF's formulation: every token through every expert, input scaled by sigmoid(score), 0 if unselected."""
  logits = x @ w_router
  kth = jnp.sort(logits, axis=-1)[:, -k][:, None]
  scores = jnp.where(logits >= kth, jax.nn.sigmoid(logits), 0.0)  # [T, E]
  xin = scores.T[:, :, None] * x[None]  # [E, T, D]
  h = jax.nn.silu(jnp.einsum("ETD,EDF->ETF", xin, wg)) * jnp.einsum("ETD,EDF->ETF", xin, wu)
  return jnp.einsum("ETF,EFD->TD", h, wd)


def sparse_moe(x, w_router, wg, wu, wd, k, impl, block):
  def experts(xs, gs):
    gmm = lambda a, w: grouped_matmul(a, w, gs, impl=impl, block=block)
    return gmm(jax.nn.silu(gmm(xs, wg)) * gmm(xs, wu), wd)

  r = route(x @ w_router, k)
  return moe_dispatch(x, r.experts_TA, r.scores_TA, wg.shape[0], experts)


def _weights(seed, t=37, d=12, f=10, e=7):
  r = np.random.default_rng(seed)
  return [
    jnp.asarray(r.standard_normal(s).astype(np.float32) * 0.5)
    for s in ((t, d), (d, e), (e, d, f), (e, d, f), (e, f, d))
  ]


@pytest.mark.parametrize("impl,block", [("blocked", 8), ("blocked", 4), ("blocked", 64), ("ragged", 0)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_values_and_gradients_match_dense(impl, block, k):
  args = _weights(k)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  sparse = lambda *a: sparse_moe(*a, k, impl, block)
  dense = lambda *a: dense_moe_reference(*a, k)
  np.testing.assert_allclose(sparse(*args), dense(*args), atol=1e-5, rtol=1e-5)
  g_sparse = jax.grad(loss(sparse), argnums=range(5))(*args)
  g_dense = jax.grad(loss(dense), argnums=range(5))(*args)
  for name, a, b in zip(("x", "router", "gate", "up", "down"), g_sparse, g_dense, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("sizes", [[0, 5, 0, 0, 12, 3], [20, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 15], [0, 1, 0, 0, 2, 0]])
def test_grouped_matmul_blocked_handles_empty_and_skewed_groups(sizes):
  """Values and both gradients against per-group numpy products: blocks of 1 and 4 rows put groups of
  12-20 rows through the full-tile loops (4b rows forward and dx, 8b rows dw) and the last tile."""
  r = np.random.default_rng(0)
  m, e = sum(sizes), len(sizes)
  x, dy = r.standard_normal((m, 6)), r.standard_normal((m, 9))
  w = r.standard_normal((e, 6, 9))
  groups = [slice(s, s + n) for s, n in zip(np.cumsum([0] + sizes[:-1]), sizes, strict=True)]
  want = np.concatenate([x[g] @ w[i] for i, g in enumerate(groups)])
  want_dx = np.concatenate([dy[g] @ w[i].T for i, g in enumerate(groups)])
  want_dw = np.stack([x[g].T @ dy[g] for g in groups])
  gs = jnp.asarray(sizes, jnp.int32)
  for block in (1, 4, 16):
    y, vjp = jax.vjp(
      lambda x, w: grouped_matmul(x, w, gs, impl="blocked", block=block), *(jnp.asarray(a, jnp.float32) for a in (x, w))
    )
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    for got, ref in ((y, want), (dx, want_dx), (dw, want_dw)):
      np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)


def test_grouped_matmul_with_fewer_rows_than_experts_matches_dense_with_gradients():
  """The decoding path (rows gather their expert's weight) agrees with the dense oracle, gradients too;
  rows past the group sizes' total (padding) give zeros."""
  r = np.random.default_rng(3)
  x = jnp.asarray(r.standard_normal((4, 6)), jnp.float32)
  w = jnp.asarray(r.standard_normal((8, 6, 5)), jnp.float32)
  gs = jnp.asarray([0, 2, 0, 0, 0, 1, 0, 0], jnp.int32)  # 3 of the 4 rows used
  loss = lambda impl: lambda x, w: jnp.sum(jnp.sin(grouped_matmul(x, w, gs, impl=impl)[:3]))
  got = grouped_matmul(x, w, gs, impl="blocked")
  np.testing.assert_allclose(got[:3], grouped_matmul(x, w, gs, impl="dense")[:3], atol=1e-5)
  np.testing.assert_array_equal(got[3], 0)
  for a, b in zip(jax.grad(loss("blocked"), (0, 1))(x, w), jax.grad(loss("dense"), (0, 1))(x, w), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_blocked_flops_are_sparse():
  """The CPU grouped matmul executes each expert's own rows (rounded up to b/2), forward and backward:
  matmul FLOPs counted over a profiled run of the compiled program, not E× like ragged_dot on CPU."""
  from behemoth_jax.scale.flops import executed_flops

  d, f, b = 64, 128, 16
  sizes = [0, 5, 64, 100, 17, 1, 300, 0, 33, 16, 80, 2, 0, 0, 48, 30]  # skewed, m = 696
  m, e = sum(sizes), len(sizes)
  x = jnp.ones((m, d))
  w = jnp.ones((e, d, f))
  dy = jnp.ones((m, f))
  gs = jnp.asarray(sizes, jnp.int32)
  step = 8  # tiles of 4b rows (8b for dw), then one of the rest rounded up to b/2 rows, at least 8
  rows = sum(-(-n // step) * step for n in sizes)
  assert m < rows <= m + e * (step - 1)
  gmm = lambda x, w, g: grouped_matmul(x, w, g, impl="blocked", block=b)

  def executed(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return executed_flops(lambda: jax.block_until_ready(compiled(*args)), compiled.as_text())

  assert executed(gmm, x, w, gs) == 2 * rows * d * f
  assert executed(lambda x, w, g, dy: jax.vjp(lambda x, w: gmm(x, w, g), x, w)[1](dy), x, w, gs, dy) == 2 * (
    2 * rows * d * f
  )  # dx and dw
  dense = executed(lambda x, w, g: grouped_matmul(x, w, g, impl="dense"), x, w, gs)
  assert dense == e * 2 * m * d * f  # the oracle does every expert for every row
