"""`train.layerwise_update`: the optimizer inside the backward scan gives the ordinary step's parameters and
optimizer state (clipping aside, which uses the previous step's norm by design), on one device and on a
mesh; a non-finite loss leaves everything bitwise as it was."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from batches import random_batch
from flax import nnx

from behemoth_jax.config import ConfigError, ParallelConfig, load_config
from behemoth_jax.model.transformer import create_model
from behemoth_jax.train.layerwise import join_cycles, split_cycles
from behemoth_jax.train.state import abstract_sharded_model, make_init
from behemoth_jax.train.step import loss_and_stats, make_optimizer, make_schedule, make_train_step
from sharding.api import use_mesh
from sharding.mesh import make_mesh

# 9 layers of a 4-layer cycle: two stacked cycles and one unscanned tail layer; the aux losses on so
# that the router statistics' cotangents flow through the layer-by-layer backward too.
OVERRIDES = ["model.num_layers=9", "train.batch_size=4", "train.warmup_steps=0", "train.moe_aux_loss=0.01"]


def _config(*extra):
  return load_config("configs/tiny.yaml", [*OVERRIDES, *extra])


def _zero_state(tx, params):
  return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0), "skipped": jnp.int32(0)}


def _run(cfg, layerwise: bool, steps: int = 3, state=None):
  tc = dataclasses.replace(cfg.train, layerwise_update=layerwise)
  graphdef, params = nnx.split(create_model(cfg.model, seed=0))
  tx = make_optimizer(tc)
  step = jax.jit(make_train_step(graphdef, tx, tc, make_schedule(tc)))
  state = _zero_state(tx, params) if state is None else state
  metrics = []
  for k in range(steps):
    state, m = step(state, random_batch(4, 32, seed=k, drop=0.2))
    metrics.append(m)
  return state, metrics


def _assert_adam_close(a, b):
  """Parameters after Adam steps from gradients computed along two paths (order of sums, sharding): up
  to 3 elements in 10^4, all in expert weights, differ by up to ~2e-4 (Adam divides by the RMS: an
  expert's gradient near eps amplifies rounding; the ordinary step on a mesh vs one device does the
  same), the rest within 2e-6; a wrong update (clipping off, a layer missed) differs by ~1e-3 to 1e-2 in
  millions of elements. Adam's moments (linear in the gradient) are compared tightly elsewhere."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  far = total = 0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    diff = np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))
    assert diff.max() < 1e-3, diff.max()
    far, total = far + int((diff > 2e-6 + 1e-5 * np.abs(np.asarray(y, np.float32))).sum()), total + diff.size
  assert far <= 1e-3 * total, (far, total)


def _assert_trees_close(a, b, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=1e-5)


def test_split_and_join_cycles_round_trip():
  params = nnx.split(create_model(_config().model))[1]
  cycles, rest = split_cycles(params)
  assert list(cycles.keys()) == ["blocks"] and "cycles" not in rest["decoder"]
  joined = join_cycles(cycles, rest)
  assert jax.tree.structure(joined) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(joined), jax.tree.leaves(params), strict=True):
    assert x is y


@pytest.mark.parametrize("moments", ["auto", "fp8"])
def test_layerwise_equals_the_whole_gradient_step_without_clipping(moments):
  """Three steps, the parameters, Adam's moments and counts, loss and gradient norm equal the ordinary
  step's: the stacked cycles (updated in the reverse scan), the tail layer and the embeddings (after it)."""
  cfg = _config("train.grad_clip=0", f"train.adam_moments={moments}")
  (want, wm), (got, gm) = _run(cfg, False), _run(cfg, True)
  _assert_trees_close(got["params"], want["params"], atol=1e-6)
  _assert_trees_close(got["opt_state"], want["opt_state"], atol=1e-6)
  for a, b in zip(gm, wm, strict=True):
    for key in ("loss", "ce", "grad_norm", "expert_load_max"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
  moved = max(
    float(jnp.abs(x - y).max())
    for x, y in zip(
      jax.tree.leaves(got["params"]), jax.tree.leaves(nnx.split(create_model(cfg.model, seed=0))[1]), strict=True
    )
  )
  assert moved > 1e-3  # the steps did update


def _is_adam(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


@pytest.mark.parametrize("clip", ["exact", "previous"])
def test_layerwise_clips_exactly_where_clipping_may_act(clip):
  """grad_clip 0.5 under norms of 2-4: every step measures the whole norm first (a backward pass of its
  own; with `previous` because the previous norm is above the threshold) and equals the ordinary step's
  clipped update."""
  cfg = _config("train.grad_clip=0.5", f"train.layerwise_clip={clip}")
  (want, wm), (got, gm) = _run(cfg, False), _run(cfg, True)
  _assert_adam_close(got["params"], want["params"])
  for a, b in zip(gm, wm, strict=True):
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    assert b["grad_norm"] > 0.5
  np.testing.assert_allclose(got["opt_state"][0].norm, gm[-1]["grad_norm"], rtol=1e-6)
  adam = [x for x in jax.tree.leaves(got["opt_state"], is_leaf=_is_adam) if _is_adam(x)]
  assert [int(a.count) for a in adam] == [3] and int(got["skipped"]) == 0


def test_below_the_threshold_the_previous_norm_stands_in():
  """`train.layerwise_clip=previous`: a previous norm of 0.5 (< EXACT_ABOVE x grad_clip 1.0) stands in for this step's ~3.8: no clipping,
  Adam's first moment holds jax.grad's unclipped gradient (clipped, it would be 3.8x smaller), and the
  state then holds this step's norm."""
  from behemoth_jax.train.optim import set_previous_norm

  cfg = _config("train.grad_clip=1.0", "train.layerwise_clip=previous")
  tc = dataclasses.replace(cfg.train, layerwise_update=True)
  graphdef, params = nnx.split(create_model(cfg.model, seed=0))
  state = _zero_state(make_optimizer(tc), params)
  state["opt_state"] = set_previous_norm(state["opt_state"], jnp.float32(0.5))
  got, gm = _run(cfg, True, steps=1, state=state)
  plain = dataclasses.replace(cfg.train, grad_clip=0.0)
  tx = make_optimizer(plain)
  batch = random_batch(4, 32, seed=0, drop=0.2)
  total = jnp.maximum(batch["loss_mask"].sum(), 1.0)
  grads = jax.jit(jax.grad(lambda p: loss_and_stats(graphdef, p, batch, plain, total, None, None, 0.0)[0]))(params)
  updates, opt = tx.update(grads, tx.init(params), params)
  assert float(optax.tree.norm(grads)) > 3.0
  _assert_adam_close(got["params"], optax.apply_updates(params, updates))
  # Adam's first update is scale-free (sign-like); its first moment holds the gradient as clipped (or not)
  (mu_got,), (mu_want,) = (
    [a.mu for a in jax.tree.leaves(o, is_leaf=_is_adam) if _is_adam(a)] for o in (got["opt_state"], opt)
  )
  _assert_trees_close(mu_got, mu_want, atol=1e-7)
  np.testing.assert_allclose(got["opt_state"][0].norm, optax.tree.norm(grads), rtol=1e-5)


def test_layerwise_on_a_mesh_equals_the_ordinary_step_there_and_one_device():
  """On fsdp × expert and data × expert × tensor meshes: the parameters equal the ordinary step's on the
  same mesh, Adam's moments equal one device's."""
  cfg = _config("train.grad_clip=0")
  want, wm = _run(cfg, True, steps=2)
  for parallel in (dict(fsdp=2, expert=4), dict(data=2, expert=2, tensor=2, fsdp=1)):
    mesh = make_mesh(ParallelConfig(**parallel))
    runs = {}
    for layerwise in (False, True):
      tc = dataclasses.replace(cfg.train, layerwise_update=layerwise)
      tx = make_optimizer(tc)
      with use_mesh(mesh):
        _, _, shardings_p = abstract_sharded_model(cfg.model, mesh, tc.seed)
        runs[layerwise] = _run(cfg, layerwise, steps=2, state=make_init(cfg, tx, shardings_p, mesh)())
    (got, gm), (ordinary, _) = runs[True], runs[False]
    _assert_adam_close(got["params"], ordinary["params"])
    _assert_trees_close(got["opt_state"], want["opt_state"], atol=2e-6)
    np.testing.assert_allclose(gm[1]["loss"], wm[1]["loss"], rtol=1e-5)


def test_a_non_finite_loss_leaves_the_state_bitwise_and_counts_a_skip():
  cfg = _config()
  state, _ = _run(cfg, True, steps=1)
  bad = jax.tree.map(lambda a: a, state)
  cycles, rest = split_cycles(bad["params"])
  cycles["blocks"][0]["attn"]["wq_DNH"].set_value(
    cycles["blocks"][0]["attn"]["wq_DNH"][...].at[0, 0, 0, 0].set(jnp.nan)
  )
  bad["params"] = join_cycles(cycles, rest)
  after, metrics = _run(cfg, True, steps=1, state=bad)
  assert not np.isfinite(float(metrics[0]["loss"])) and int(after["skipped"]) == 1
  for x, y in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(bad["params"]), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(after["opt_state"]), jax.tree.leaves(bad["opt_state"]), strict=True):
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_layerwise_refuses_gradient_accumulation():
  with pytest.raises(ConfigError, match=r"train\.layerwise_update.*grad_accum"):
    _config("train.layerwise_update=true", "train.grad_accum=2")


def test_resuming_with_another_optimizer_layout_is_one_clear_error(tmp_path):
  """A run's checkpoints restore only into the optimizer state they were written with: the saved
  config.yaml is compared before orbax (which only says the tree structures differ)."""
  import yaml

  from behemoth_jax.config import to_dict
  from behemoth_jax.train.trainer import check_optimizer_layout

  cfg = _config()
  (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
  layerwise = dataclasses.replace(cfg.train, layerwise_update=True)
  check_optimizer_layout(tmp_path, layerwise)  # no checkpoints yet: nothing to resume
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  check_optimizer_layout(tmp_path, cfg.train)
  with pytest.raises(ConfigError, match=r"^train\.layerwise_update: true, but .* written with false"):
    check_optimizer_layout(tmp_path, layerwise)
  with pytest.raises(ConfigError, match=r"^train\.adam_moments: fp8, but .* written with auto"):
    check_optimizer_layout(tmp_path, dataclasses.replace(cfg.train, adam_moments="fp8"))
