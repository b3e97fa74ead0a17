"""Every mesh computes what one device computes: logits and gradients within 1e-5 (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from behemoth_jax.config import ModelConfig, ParallelConfig, load_config
from behemoth_jax.model.transformer import abstract_model, create_model
from behemoth_jax.train.state import init_sharded
from sharding.api import logical_to_spec, param_shardings, place, replication_report, use_mesh
from sharding.mesh import ShardingError, make_mesh
from sharding.rules import MESH_AXES

CFG = ModelConfig(
  vocab_size=64,
  hidden_size=32,
  num_layers=4,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  intermediate_size=16,
  intermediate_size_mlp=24,
  num_experts=8,
  num_experts_per_tok=1,
  attention_chunk_size=6,
  floor_scale=4.0,
  attn_scale=0.3,
  param_dtype="float32",
  dtype="float32",
  initializer_range=0.2,
)

MESHES = {
  "fsdp8": dict(fsdp=8),
  "data2_fsdp4": dict(data=2, fsdp=4),
  "fsdp2_expert4": dict(fsdp=2, expert=4),
  "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2, fsdp=1),
  "fsdp2_context4": dict(fsdp=2, context=4),
  "expert8": dict(expert=8, fsdp=1),
  "fsdp4_tensor2": dict(fsdp=4, tensor=2),  # vocabulary split by tensor: the embedding looked up by shards
}


def _loss(graphdef, state, ids):
  logits = nnx.merge(graphdef, state)(ids)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(ids.shape[1])[None, :]), logits


_REFERENCES = {}


def _reference(cfg, ids):
  """One device's logits and gradients (jitted, computed once per config for the module's tests)."""
  if cfg not in _REFERENCES:
    graphdef, state = nnx.split(create_model(cfg, seed=3))
    step = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)
    (_, logits), grads = step(graphdef, state, ids)
    _REFERENCES[cfg] = graphdef, state, logits, grads
  return _REFERENCES[cfg]


def _sharded(graphdef, state, ids, parallel):
  mesh = make_mesh(ParallelConfig(**parallel))
  with use_mesh(mesh):
    step = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)
    (_, logits), grads = step(graphdef, place(state, mesh), ids)
  return logits, grads


@pytest.fixture(scope="module")
def ids():  # 2 x 24 tokens: 4 chunks of 6
  return jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)), jnp.int32)


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_matches_one_device(ids, name):
  graphdef, state, want_logits, want_grads = _reference(CFG, ids)
  logits, grads = _sharded(graphdef, state, ids, MESHES[name])
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_context_shards_not_aligned_with_chunks(ids):
  """T/context = 6 tokens per shard but chunk 5: chunks straddle shard boundaries."""
  cfg = ModelConfig(**{**CFG.__dict__, "attention_chunk_size": 5})
  graphdef, state, want_logits, want_grads = _reference(cfg, ids)
  logits, grads = _sharded(graphdef, state, ids, dict(fsdp=2, context=4))
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_scanned_layers_on_expert_mesh(ids):
  """8 layers = two scanned cycles: shard_map and all-to-all inside the layer scan, remat on."""
  cfg = ModelConfig(**{**CFG.__dict__, "num_layers": 8, "remat_policy": "full", "num_experts_per_tok": 2})
  graphdef, state, want_logits, want_grads = _reference(cfg, ids)
  logits, grads = _sharded(graphdef, state, ids, dict(fsdp=2, expert=4))
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_parameters_are_created_on_their_shards():
  mesh = make_mesh(ParallelConfig(fsdp=2, expert=4))
  model = init_sharded(CFG, mesh, seed=3)
  w = model.decoder.tail[0].ffn.w_gate_EDF[...]
  assert w.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", None)
  assert {s.data.shape for s in w.addressable_shards} == {(2, 16, 16)}
  ref = nnx.state(create_model(CFG, seed=3))
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)  # same numbers as the single-device init (jit vs eager: 1 ulp)


def test_mesh_errors_name_the_problem():
  with pytest.raises(ShardingError, match=r"parallel: mesh fsdp=4 x expert=4 needs 16 devices, but there are 8"):
    make_mesh(ParallelConfig(fsdp=4, expert=4))
  with pytest.raises(ShardingError, match=r"parallel.fsdp: -1 cannot fill 8 devices"):
    make_mesh(ParallelConfig(fsdp=-1, expert=3))
  mesh = make_mesh(ParallelConfig(fsdp=1, tensor=8))
  with pytest.raises(
    ShardingError,
    match=r"^decoder/tail/0/attn/wk_DKH: dim 1 \(kv_heads\) of size 2 is not divisible by mesh axes tensor=8 \(= 8\)$",
  ):
    init_sharded(CFG, mesh)
  with pytest.raises(ShardingError, match=r"w: dim 0 \(experts\) of size 6 is not divisible by mesh axes expert=4"):
    logical_to_spec(("experts", "embed"), make_mesh(ParallelConfig(fsdp=2, expert=4)), (6, 32), name="w")


def test_behemoth_replication_on_256_devices():
  cfg = load_config("configs/behemoth.yaml").model
  mesh = AbstractMesh((1, 16, 16, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 5)
  report = replication_report(nnx.state(abstract_model(cfg)), mesh)
  assert report["replicated_fraction"] <= 0.02
  assert report["per_device_bytes"] <= 1.1 * report["ideal_per_device_bytes"]
  assert report["total_bytes"] == 2 * 1_978_326_335_488  # bf16


def test_multimodal_scout_shards_on_256_devices():
  """The vision width (1408 = 2^7·11) takes the mesh axes that divide it instead of failing."""
  cfg = load_config("configs/scout.yaml", ["model.vision={}"]).model
  mesh = AbstractMesh((1, 16, 16, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 5)
  state = nnx.state(abstract_model(cfg))
  report = replication_report(state, mesh)
  assert report["per_device_bytes"] <= 1.1 * report["ideal_per_device_bytes"]
  shardings = dict(nnx.to_flat_state(param_shardings(state, mesh)))
  assert shardings[("vision", "layers", "fc1_DF")].get_value().spec == PartitionSpec(None, "fsdp", "expert")


@pytest.mark.parametrize("routing", ["all_to_expert_0", "expert_shard_3_empty", "top2_on_one_shard"])
def test_expert_parallel_with_extreme_routing(routing):
  """The routed experts on fsdp 2 x expert 4 (experts 0-1 on expert shard 0, ..., 6-7 on shard 3) equal
  one device's, values and gradients, when every token goes to one shard (expert 0; or experts 0 and 1
  with top-2) and when a shard receives nothing (no token to experts 6-7): the dropless exchange's
  buffers and offsets at their extremes."""
  from functools import partial

  from behemoth_jax.model.moe import routed_experts
  from sharding import axes as ax

  r = np.random.default_rng(0)
  t, d, f, e = 48, CFG.hidden_size, CFG.intermediate_size, CFG.num_experts
  k = 2 if routing == "top2_on_one_shard" else 1
  cfg = ModelConfig(**{**CFG.__dict__, "num_experts_per_tok": k})
  x = jnp.asarray(r.standard_normal((t, d)), jnp.float32)
  experts = {
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
  assert float(jnp.abs(want[0][1]).max()) > 0  # the experts did compute something
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
