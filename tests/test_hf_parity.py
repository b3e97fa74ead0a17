"""Our text decoder vs transformers.Llama4ForCausalLM on random tiny configs, float32, max |Δ| ≤ 1e-4."""

import numpy as np
import pytest
from hf_utils import hf_logits, make_hf_model, our_logits, save_hf

from behemoth_jax.convert import load_hf

TOL = 1e-4
LLAMA3_16_1_1 = {
  "rope_type": "llama3",
  "rope_theta": 500000.0,
  "factor": 16.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 1.0,
  "original_max_position_embeddings": 8192,
}
LLAMA3_8_4_1 = {
  "rope_type": "llama3",
  "rope_theta": 500000.0,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8192,
}

CONFIGS = {
  # every layer MoE, qk-norm, no rope scaling, T=17 > 3 chunks of 5, temperature active (floor 4)
  "scout_like": dict(),
  # Maverick-like: dense/MoE interleave 2, no qk-norm, llama3 16-1-1 (high == low)
  "maverick_like": dict(
    interleave_moe_layer_step=2, use_qk_norm=False, num_hidden_layers=8, rope_parameters=LLAMA3_16_1_1
  ),
  # llama3 8-4-1 (smooth band active), 6 layers: one scanned cycle pair + tail
  "llama3_8_4_1": dict(rope_parameters=LLAMA3_8_4_1, num_hidden_layers=6),
  # top-2 routing, irregular explicit layer lists, head_dim != hidden / heads
  "irregular_top2": dict(
    num_hidden_layers=5, moe_layers=[0, 2, 3], no_rope_layers=[1, 0, 1, 1, 0], num_experts_per_tok=2, head_dim=8
  ),
  # dense only, 1 kv head (MQA), temperature tuning off
  "dense_mqa": dict(moe_layers=[], num_key_value_heads=1, attn_temperature_tuning=False, num_hidden_layers=3),
  # 8 layers (two cycles scanned), chunk 3 so a T=17 prompt spans 6 chunks, top-1, MoE every layer
  "two_cycles_small_chunk": dict(num_hidden_layers=8, attention_chunk_size=3, rope_parameters=LLAMA3_8_4_1),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = {}
  for i, (name, overrides) in enumerate(CONFIGS.items()):
    model = make_hf_model(seed=i, **overrides)
    path = tmp_path_factory.mktemp(name)
    save_hf(model, path)
    out[name] = (model, path)
  return out


def _ids(seed, b, t, v=97):
  return np.random.default_rng(seed).integers(0, v, size=(b, t))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_logits_match_hf(saved, name, scan):
  hf_model, path = saved[name]
  ours = load_hf(path, dtype="float32", scan_layers=scan)
  ids = _ids(1, 2, 17)
  diff = np.abs(our_logits(ours, ids) - hf_logits(hf_model, ids)).max()
  assert diff <= TOL, f"{name}: max |ours - HF| = {diff:.2e}"


@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_moe_impls_match_hf(saved, impl):
  hf_model, path = saved["irregular_top2"]
  ours = load_hf(path, dtype="float32", moe_impl=impl)
  ids = _ids(2, 2, 13)
  assert np.abs(our_logits(ours, ids) - hf_logits(hf_model, ids)).max() <= TOL


def test_packed_segments_equal_separate_hf_runs(saved):
  """Two documents packed in one row (segment ids, positions restarting) == HF on each alone."""
  hf_model, path = saved["scout_like"]
  ours = load_hf(path, dtype="float32")
  doc_a, doc_b = _ids(3, 1, 9), _ids(4, 1, 12)
  packed = np.concatenate([doc_a, doc_b], axis=1)
  seg = np.array([[1] * 9 + [2] * 12])
  got = our_logits(ours, packed, segment_ids_BT=seg)
  want = np.concatenate([hf_logits(hf_model, doc_a), hf_logits(hf_model, doc_b)], axis=1)
  assert np.abs(got - want).max() <= TOL


def test_blocked_attention_path_matches_hf_and_the_dense_path(tmp_path):
  """`model.attention_block` small enough that every layer takes the blocked (flash) kernel: chunked
  layers visit their 8-key chunk 4 keys at a time, global layers a 21-key span padded to 24. Logits
  against HF; loss gradients of every parameter against the dense path (attention_block 0)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  hf_model = make_hf_model(seed=9, num_hidden_layers=4, attention_chunk_size=8)
  save_hf(hf_model, tmp_path)
  ids = _ids(5, 2, 21)
  blocked, dense = (load_hf(tmp_path, dtype="float32", attention_block=b) for b in (4, 0))
  assert np.abs(np.asarray(jax.jit(lambda m, i: m(i))(blocked, ids)) - hf_logits(hf_model, ids)).max() <= TOL

  def grads(model):
    graphdef, params = nnx.split(model)
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(ids))[..., 3])
    return jax.jit(jax.grad(loss))(params)

  got, want = grads(blocked), grads(dense)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(got)) > 1e-3
