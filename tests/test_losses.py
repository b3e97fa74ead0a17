"""Chunked cross-entropy vs full softmax, auxiliary losses, and gradient accumulation == one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from behemoth_jax.config import load_config
from behemoth_jax.losses import chunked_cross_entropy, load_balancing_loss, router_z_loss
from behemoth_jax.moe import MoEStats
from behemoth_jax.training import make_optimizer, make_schedule, make_train_step
from behemoth_jax.transformer import create_model


@pytest.mark.parametrize("chunk", [7, 16, 50, 1000])
def test_chunked_cross_entropy_matches_full_softmax(chunk):
  r = np.random.default_rng(0)
  h = jnp.asarray(r.standard_normal((2, 5, 8)), jnp.float32)
  w = jnp.asarray(r.standard_normal((8, 50)), jnp.float32)
  t = jnp.asarray(r.integers(0, 50, (2, 5)))
  m = jnp.asarray(r.integers(0, 2, (2, 5)), jnp.float32)

  def reference(h, w):
    logits = h @ w
    lse = jax.nn.logsumexp(logits, -1)
    return jnp.sum((lse - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]) * m), jnp.sum(lse ** 2 * m)

  got, want = chunked_cross_entropy(h, w, t, m, chunk), reference(h, w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  g = jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, m, chunk)[0], argnums=(0, 1))(h, w)
  g_ref = jax.grad(lambda h, w: reference(h, w)[0], argnums=(0, 1))(h, w)
  for a, b in zip(g, g_ref, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_aux_losses():
  balanced = MoEStats(jnp.full((2, 4), 0.25), jnp.full((2, 4), 0.3), jnp.array([1.0, 3.0]))
  skewed = MoEStats(jnp.array([[1.0, 0, 0, 0]] * 2), jnp.array([[0.9, 0.1, 0.1, 0.1]] * 2), jnp.array([1.0, 3.0]))
  assert float(load_balancing_loss(balanced)) == pytest.approx(1.0)
  assert float(load_balancing_loss(skewed)) == pytest.approx(4 * 0.9 / 1.2)
  assert float(router_z_loss(balanced)) == pytest.approx(2.0)


def test_gradient_accumulation_equals_one_batch():
  cfg = load_config("configs/tiny.yaml", ["model.num_layers=2", "train.batch_size=4"])
  graphdef, params = nnx.split(create_model(cfg.model, seed=0))
  r = np.random.default_rng(0)
  batch = {"inputs": r.integers(0, 259, (4, 32)), "targets": r.integers(0, 259, (4, 32)),
           "segment_ids": np.ones((4, 32), np.int32), "positions": np.tile(np.arange(32), (4, 1)),
           "loss_mask": (r.random((4, 32)) > 0.2).astype(np.float32)}
  batch = jax.tree.map(jnp.asarray, batch)
  results = []
  for accum in (1, 2, 4):
    tc = cfg.train.__class__(**{**cfg.train.__dict__, "grad_accum": accum})  # aux losses: per micro-batch by design
    tx = make_optimizer(tc)
    step = jax.jit(make_train_step(graphdef, tx, tc, make_schedule(tc)))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    new, metrics = step(state, batch)
    results.append((metrics, new["params"]))
  for metrics, p in results[1:]:
    np.testing.assert_allclose(metrics["loss"], results[0][0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], results[0][0]["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(results[0][1]), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6)
