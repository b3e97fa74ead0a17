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
