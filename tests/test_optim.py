"""8-bit Adam moments (train/optim.py): quantizer error bounds, Adam's updates, sharded state, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from behemoth_jax.config import Config, ModelConfig, ParallelConfig, TrainConfig
from behemoth_jax.train.optim import F8_TINY, QMoment, quantize, scale_by_adam_fp8
from behemoth_jax.train.state import abstract_train_state
from behemoth_jax.train.step import make_optimizer
from sharding.api import per_device_bytes
from sharding.mesh import make_mesh


def test_quantizer_error_is_within_e4m3_rounding_per_row():
  """Each element within half an e4m3 step of itself: 2^-4 relative (3 mantissa bits) above the row's
  normal range, half the smallest subnormal (scale x 2^-10) below it; one scale per row, its max |x|
  exact; an all-zero row stays zero with scale 0."""
  r = np.random.default_rng(0)
  x = r.standard_normal((6, 300)) * np.exp(4 * r.standard_normal((6, 300)))  # ~8 decades per row
  x[3] = 0.0
  m = quantize(jnp.asarray(x, jnp.float32))
  assert m.q.dtype == jnp.float8_e4m3fn and m.q.shape == x.shape and m.scale.shape == (6, 1)
  got, scale = np.asarray(m.value()), np.asarray(m.scale)
  bound = np.abs(x) * 2.0**-4 + scale * F8_TINY / 2
  assert np.all(np.abs(got - x) <= bound * (1 + 1e-6))
  np.testing.assert_allclose(np.abs(got).max(axis=1), np.abs(x).max(axis=1), rtol=1e-6)
  assert scale[3, 0] == 0 and np.all(got[3] == 0)
  assert np.abs(got - x).max() > 0  # rounded for real (the bound is not met by an identity)


def test_adam_fp8_first_step_is_adams_and_later_steps_stay_close():
  """Step 1 reads no stored moment: equal to optax.scale_by_adam. Over 50 steps of heavy-tailed
  gradients the updates stay within 10% (relative norm) of float32 Adam's: only the stored moments are
  rounded. No update is ever larger than 2 (the bound the RMS floor gives)."""
  r = np.random.default_rng(1)
  params = {"w": jnp.zeros((16, 64), jnp.float32), "b": jnp.zeros((64,), jnp.float32)}
  ref, ours = optax.scale_by_adam(0.9, 0.95), scale_by_adam_fp8(0.9, 0.95)
  s_ref, s_ours = ref.init(params), ours.init(params)
  update = jax.jit(ours.update)
  for i in range(50):
    g = {k: jnp.asarray(r.standard_normal(p.shape) * np.exp(2 * r.standard_normal(p.shape)), jnp.float32)
         for k, p in params.items()}  # fmt: skip
    u_ref, s_ref = ref.update(g, s_ref)
    u, s_ours = update(g, s_ours)
    for k in params:
      a, b = np.asarray(u[k]), np.asarray(u_ref[k])
      if i == 0:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
      assert np.linalg.norm(a - b) <= 0.1 * np.linalg.norm(b), (i, k)
      assert np.abs(a).max() <= 2.0
  assert isinstance(s_ours.mu["w"], QMoment) and s_ours.nu["w"].q.dtype == jnp.float8_e4m3fn


def test_fp8_moments_shard_like_their_parameters_and_take_a_quarter_of_float32():
  """On an 8-device mesh every moment's float8 values take its parameter's sharding and its scales
  the same with the last dimension whole; per device the optimizer state is a quarter of float32
  Adam's plus the row scales (one float32 per row)."""
  mc = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   intermediate_size=16, intermediate_size_mlp=24, num_experts=8, param_dtype="float32")  # fmt: skip
  mesh = make_mesh(ParallelConfig(fsdp=2, expert=4))
  sizes = {}
  for moments in ("auto", "fp8"):
    cfg = Config(model=mc, train=TrainConfig(adam_moments=moments))
    _, abstract = abstract_train_state(cfg, mesh, make_optimizer(cfg.train))
    sizes[moments] = per_device_bytes(abstract["opt_state"])
    if moments == "fp8":
      state = abstract["opt_state"][1]  # chain(clip, adam_fp8, decay, lr): the adam state
      params = jax.tree.leaves(abstract["params"])
      scales = 0
      for p, mu in zip(params, jax.tree.leaves(state.mu, is_leaf=lambda x: isinstance(x, QMoment)), strict=True):
        assert mu.q.sharding == p.sharding and mu.q.shape == p.shape
        spec = tuple(p.sharding.spec) + (None,) * (p.ndim - len(p.sharding.spec))
        assert tuple(mu.scale.sharding.spec) == (*spec[:-1], None), p.sharding.spec
        scales += per_device_bytes(mu.scale)
  want_fp8 = sizes["auto"] / 4 + 2 * scales  # two moments: f32 → 1 byte each, plus their row scales
  assert sizes["fp8"] == pytest.approx(want_fp8, abs=64), sizes
