"""The expert-parallel exchanges (sharding/expert.py): padded all-to-all and ragged rounds, against one device.

XLA:CPU does not implement `ragged_all_to_all`; `reference_ragged_all_to_all` below implements its
documented semantics with an all-gather (and poisons the result with NaN when a receiver's sizes
disagree with its senders'), and the tests substitute it for the collective. The TPU program is
checked by compiling it (tests/test_aot.py)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sharding import CFG  # the tiny MoE of the sharding tests

import sharding.expert
from behemoth_jax.config import ModelConfig, ParallelConfig
from behemoth_jax.model.moe import routed_experts
from sharding import axes as ax
from sharding.api import use_mesh
from sharding.mesh import make_mesh


def reference_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all`'s semantics (its docstring), for one mapped axis under shard_map."""
  ops = jax.lax.all_gather(operand, axis_name)  # [S, M, ...]
  s_n, m = ops.shape[:2]
  per = input_offsets.shape[0] // s_n
  me = jax.lax.axis_index(axis_name)
  mine = lambda a: jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(a, axis_name), me * per, per, axis=1)  # noqa: E731
  in_off, sizes, out_off = mine(input_offsets), mine(send_sizes), mine(output_offsets)  # [S, per] bound for me
  t = jnp.arange(m)[None, None, :]
  valid = t < sizes[:, :, None]
  src = jnp.minimum(in_off[:, :, None] + t, m - 1)
  dst = jnp.where(valid, out_off[:, :, None] + t, output.shape[0])  # out of bounds: dropped
  rows = ops[jnp.arange(s_n)[:, None, None], src]  # [S, per, M, ...]
  result = output.at[dst.reshape(-1)].set(rows.reshape(-1, *ops.shape[2:]), mode="drop")
  agree = jnp.all(recv_sizes.reshape(s_n, per) == sizes)
  return jnp.where(agree, result, jnp.nan)


@pytest.fixture
def ragged(monkeypatch):
  monkeypatch.setattr(sharding.expert, "ragged_all_to_all", reference_ragged_all_to_all)


EXCHANGES = {
  "padded": ("padded", 2.0),
  "ragged": ("ragged", 2.0),
  "ragged_in_rounds": ("ragged", 0.3),
  "ragged_worst_case": ("ragged", 4.0),  # room for every row on one shard: one round, no loops
}


@pytest.mark.parametrize("exchange", list(EXCHANGES))
@pytest.mark.parametrize("routing", ["spread", "all_to_expert_0", "expert_shard_3_empty", "top2_on_one_shard"])
def test_exchange_with_extreme_routing(routing, exchange, ragged):
  """The routed experts on fsdp 2 x expert 4 (experts 0-1 on expert shard 0, ..., 6-7 on shard 3) equal
  one device's, values and gradients, when every token goes to one shard (expert 0; or experts 0 and 1
  with top-2) and when a shard receives nothing (no token to experts 6-7): the exchange's buffers and
  offsets at their extremes. `ragged_in_rounds` holds 0.3 x the local rows per round: 2 rounds when
  routing is spread, 14 when one shard receives everything."""
  kind, capacity = EXCHANGES[exchange]
  r = np.random.default_rng(0)
  t, d, f, e = 48, CFG.hidden_size, CFG.intermediate_size, CFG.num_experts
  k = 2 if routing == "top2_on_one_shard" else 1
  cfg = ModelConfig(**{**CFG.__dict__, "num_experts_per_tok": k, "moe_exchange": kind, "moe_capacity": capacity})
  x = jnp.asarray(r.standard_normal((t, d)), jnp.float32)
  experts = {
    "spread": r.integers(0, e, (t, 1)),
    "all_to_expert_0": np.zeros((t, 1)),
    "expert_shard_3_empty": r.integers(0, 6, (t, 1)),
    "top2_on_one_shard": np.tile([[0, 1]], (t, 1)),
  }[routing]
  experts = jnp.asarray(experts, jnp.int32)
  scores = jnp.asarray(r.uniform(0.1, 1.0, (t, k)), jnp.float32)
  w = [jnp.asarray(0.3 * r.standard_normal(s), jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]

  def loss(x, scores, wg, wu, wd):
    y = ax.run_experts(partial(routed_experts, cfg), x, experts, scores, wg, wu, wd)
    return jnp.sum(y * jnp.arange(d, dtype=jnp.float32)[None, :]), y

  def run():
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, scores, *w)

  want = run()
  with use_mesh(make_mesh(ParallelConfig(fsdp=2, expert=4))):
    got = run()
    lowered = jax.jit(loss).lower(x, scores, *w)
  hlo, named = lowered.as_text(), lowered.as_text(debug_info=True)
  assert ("all_to_all" in hlo) == (kind == "padded") and (kind == "ragged") == ("all_gather" in hlo)
  assert ("moe_exchange_rounds" in named) == (exchange in ("ragged", "ragged_in_rounds"))
  assert float(jnp.abs(want[0][1]).max()) > 0  # the experts did compute something
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):  # rounds sum weight gradients
    np.testing.assert_allclose(a, b, rtol=1e-4 if capacity < 1 else 1e-5, atol=1e-5)  # in another order


@pytest.mark.parametrize(
  "parallel", [dict(fsdp=2, expert=4), dict(data=2, expert=2, tensor=2, fsdp=1)], ids=["fsdp2_expert4", "d2_e2_t2"]
)
def test_model_with_ragged_rounds_matches_one_device(parallel, ragged):
  """The whole model, 8 layers scanned with full remat and top-2 routing, the ragged exchange in rounds
  of 0.5 x the local rows (data x tensor: the round count agreed across exchange groups)."""
  from test_sharding import _reference, _sharded

  cfg = ModelConfig(
    **{**CFG.__dict__, "num_layers": 8, "remat_policy": "full", "num_experts_per_tok": 2}
    | dict(moe_exchange="ragged", moe_capacity=0.5)
  )
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)), jnp.int32)
  graphdef, state, want_logits, want_grads = _reference(cfg, ids)
  logits, grads = _sharded(graphdef, state, ids, parallel)
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
