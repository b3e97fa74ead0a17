"""Whole-model properties: scan == loop (values and gradients), remat invariance, causality, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_utils import make_hf_model, save_hf

from behemoth_jax.config import load_config
from behemoth_jax.convert import load_hf
from behemoth_jax.convert.keymap import entries
from behemoth_jax.model.rope import inv_frequencies
from behemoth_jax.scale.params import count_params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt")
  # 10 layers: two scanned cycles of 4 + a tail of 2; interleave 2; top-2
  save_hf(make_hf_model(seed=7, num_hidden_layers=10, interleave_moe_layer_step=2, num_experts_per_tok=2), path)
  return path


def _loss_and_grads_by_hf_name(model, ids):
  graphdef, params = nnx.split(model)

  def loss(p):
    logits = nnx.merge(graphdef, p)(ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(ids.shape[1])[None, :])

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  flat = dict(nnx.to_flat_state(grads))
  out = {}
  for e in entries(model.cfg, model.decoder.num_cycles):
    g = np.asarray(flat[e.leaf].get_value())
    out[(e.hf_name, e.leaf[-1])] = g if e.stack is None else g[e.stack]
  return value, out


def _logits(model, ids):
  return np.asarray(jax.jit(lambda m, i: m(i))(model, ids))


@pytest.fixture(scope="module")
def looped(checkpoint):
  """(ids, logits, loss, grads) of the unscanned model, shared by the scan tests."""
  ids = np.random.default_rng(0).integers(0, 97, (2, 13))
  model = load_hf(checkpoint, scan_layers=False)
  assert model.decoder.num_cycles == 0 and len(model.decoder.tail) == 10
  return ids, _logits(model, ids), *_loss_and_grads_by_hf_name(model, ids)


@pytest.mark.parametrize("unroll", [1, 2])
def test_scan_equals_loop_values_and_gradients(checkpoint, looped, unroll):
  ids, looped_logits, ll, gl = looped
  scanned = load_hf(checkpoint, scan_layers=True, scan_unroll=unroll)
  assert scanned.decoder.num_cycles == 2 and len(scanned.decoder.tail) == 2
  np.testing.assert_allclose(_logits(scanned, ids), looped_logits, atol=1e-5)
  ls, gs = _loss_and_grads_by_hf_name(scanned, ids)
  np.testing.assert_allclose(ls, ll, rtol=1e-6)
  assert gs.keys() == gl.keys() and len(gs) > 50
  for key in gs:
    np.testing.assert_allclose(gs[key], gl[key], rtol=1e-5, atol=1e-6, err_msg=str(key))
  assert max(np.abs(g).max() for g in gs.values()) > 1e-3


def test_unstack_layers_is_the_same_model(checkpoint):
  """Generation's unscanned copy: every layer its own block, the same logits as the scanned model."""
  from behemoth_jax.model.transformer import unstack_layers

  ids = np.random.default_rng(2).integers(0, 97, (2, 9))
  scanned = load_hf(checkpoint, scan_layers=True)
  flat = unstack_layers(scanned)
  assert flat.decoder.num_cycles == 0 and len(flat.decoder.tail) == 10 and not flat.cfg.scan_layers
  got = _logits(flat, ids)
  np.testing.assert_array_equal(got, _logits(load_hf(checkpoint, scan_layers=False), ids))
  np.testing.assert_allclose(got, _logits(scanned, ids), atol=1e-5)


@pytest.fixture(scope="module")
def no_remat_grads(checkpoint):
  ids = np.random.default_rng(1).integers(0, 97, (1, 11))
  return ids, _loss_and_grads_by_hf_name(load_hf(checkpoint), ids)[1]


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_do_not_change_gradients(checkpoint, no_remat_grads, policy):
  ids, base = no_remat_grads
  _, got = _loss_and_grads_by_hf_name(load_hf(checkpoint, remat_policy=policy), ids)
  for key in base:
    np.testing.assert_allclose(got[key], base[key], rtol=1e-5, atol=1e-6, err_msg=str(key))


def test_causality_through_gradients(checkpoint):
  model = load_hf(checkpoint)
  x = model.embed_tokens(jnp.asarray(np.random.default_rng(2).integers(0, 97, (1, 12))))
  t0 = 5
  g = jax.jit(jax.grad(lambda x: model.logits(model.hidden_states(x))[0, t0].sum()))(x)
  g = np.abs(np.asarray(g))[0].sum(-1)
  assert np.all(g[t0 + 1 :] == 0) and np.all(g[: t0 + 1] > 0)


def test_bf16_compute_close_to_f32(checkpoint):
  ids = np.random.default_rng(3).integers(0, 97, (2, 9))
  f32 = _logits(load_hf(checkpoint), ids)
  bf16 = _logits(load_hf(checkpoint, compute_dtype="bfloat16"), ids)
  assert bf16.dtype == jnp.float32  # logits stay float32
  assert np.abs(np.asarray(bf16) - f32).max() < 0.1 * np.abs(f32).max()


def _text_params(d, layers, heads, kv, hd, vocab, experts, routed, shared, moe_every=1, dense=0) -> tuple[int, int]:
  """(total, active) of a Llama 4 text decoder by hand: docs/ARCHITECTURE.md §2, untied embeddings, no biases."""
  moe = layers // moe_every
  attention = layers * (2 * d * heads * hd + 2 * d * kv * hd)
  norms = layers * 2 * d + d
  ffn_unit = 3 * d  # gate, up and down: 3·D parameters per unit of width
  routed_total = moe * experts * ffn_unit * routed
  fixed = (
    2 * vocab * d + attention + norms + moe * d * experts + moe * ffn_unit * shared + (layers - moe) * ffn_unit * dense
  )
  return fixed + routed_total, fixed + routed_total // experts


def test_parameter_counts_exact():
  """Totals and active counts to the parameter: Scout and Maverick against HF's meta-device counts
  (docs/ARCHITECTURE.md §1), all three against the arithmetic of their shapes."""
  counts = {n: count_params(load_config(f"configs/{n}.yaml").model) for n in ("scout", "maverick", "behemoth")}
  assert counts["scout"]["total"] == 107_769_861_120 and counts["maverick"]["total"] == 400_711_848_960  # HF
  want = {
    "scout": _text_params(5120, 48, 40, 8, 128, 202048, 16, 8192, 8192),
    "maverick": _text_params(5120, 48, 40, 8, 128, 202048, 128, 8192, 8192, moe_every=2, dense=16384),
    "behemoth": _text_params(16384, 160, 128, 8, 128, 202048, 16, 14336, 9728),
  }
  for name, (total, active) in want.items():
    assert (counts[name]["total"], counts[name]["active"]) == (total, active), name
  assert counts["behemoth"]["total"] == 1_978_326_335_488 and counts["behemoth"]["active"] == 287_182_962_688
  assert counts["scout"]["active"] == 17_172_894_720 and counts["maverick"]["active"] == 17_184_691_200


@pytest.mark.parametrize("scaling", [None, (16.0, 1.0, 1.0, 8192), (8.0, 1.0, 4.0, 8192), (8.0, 2.0, 3.0, 64)])
def test_rope_frequencies_match_hf(scaling):
  from transformers import Llama4TextConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  from behemoth_jax.config import RopeScaling

  rope = {"rope_type": "default", "rope_theta": 500000.0}
  ours_scaling = None
  if scaling:
    f, lo, hi, ctx = scaling
    rope = {
      "rope_type": "llama3",
      "rope_theta": 500000.0,
      "factor": f,
      "low_freq_factor": lo,
      "high_freq_factor": hi,
      "original_max_position_embeddings": ctx,
    }
    ours_scaling = RopeScaling(f, lo, hi, ctx)
  hf_cfg = Llama4TextConfig(head_dim=128, rope_parameters=rope, max_position_embeddings=1 << 20)
  if scaling:
    want = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)[0].numpy()
  else:
    want = 1.0 / (500000.0 ** (np.arange(0, 128, 2, dtype=np.float32) / 128))
  got = inv_frequencies(128, 500000.0, ours_scaling)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.all(np.isfinite(got))
