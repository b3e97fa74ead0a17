"""Chunked cross-entropy vs full softmax, auxiliary losses, and gradient accumulation == one batch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batches import random_batch
from flax import nnx

from behemoth_jax.config import load_config
from behemoth_jax.model.moe import MoEStats
from behemoth_jax.model.transformer import create_model
from behemoth_jax.train.losses import (
  chunked_cross_entropy,
  chunked_distillation_terms,
  distillation_terms,
  load_balancing_loss,
  router_z_loss,
  soft_weight,
)
from behemoth_jax.train.step import make_optimizer, make_schedule, make_train_step


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
    return jnp.sum((lse - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]) * m), jnp.sum(lse**2 * m)

  got, want = chunked_cross_entropy(h, w, t, m, chunk), reference(h, w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  g = jax.grad(lambda h, w: chunked_cross_entropy(h, w, t, m, chunk)[0], argnums=(0, 1))(h, w)
  g_ref = jax.grad(lambda h, w: reference(h, w)[0], argnums=(0, 1))(h, w)
  for a, b in zip(g, g_ref, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("parallel", [dict(fsdp=2, tensor=4), dict(data=2, fsdp=2, tensor=2)])
def test_cross_entropy_on_vocabulary_shards_matches_one_device_and_splits_the_work(parallel):
  """With the vocabulary split over `tensor`, each device computes only its shard's chunks (per-device
  matmul FLOPs = one device's / every split: tokens over fsdp/data, columns over tensor) and the value
  and gradients equal one device's, including chunks that overrun a shard (100 / 4 = 25 columns per
  shard in 4 chunks of 7: 3 padding columns whose global ids belong to the next shard)."""
  from behemoth_jax.config import ParallelConfig
  from behemoth_jax.scale.flops import matmuls
  from sharding.api import use_mesh
  from sharding.mesh import make_mesh

  r = np.random.default_rng(0)
  b, t, d, v = 4, 6, 16, 100
  h = jnp.asarray(r.standard_normal((b, t, d)), jnp.float32)
  w = jnp.asarray(r.standard_normal((d, v)), jnp.float32)
  tg = jnp.asarray(r.integers(0, v, (b, t)), jnp.int32)
  m = jnp.asarray(r.random((b, t)) > 0.2)

  def run(c):  # (value and gradients, matmul FLOPs per device); traced afresh: the mesh is read at trace time
    step = jax.jit(jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, tg, m, c)[0], (0, 1)))
    return step(h, w), sum(mm.flops for mm in matmuls(step.lower(h, w).compile().as_text()))

  mesh = make_mesh(ParallelConfig(**parallel))
  for c in (5, 8, 500):
    want, one = run(c)
    with use_mesh(mesh):
      got, per_device = run(c)
    for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)
    if c == 5:  # no padding columns: the split is exact
      assert per_device == pytest.approx(one / 8), (per_device, one)


def test_one_chunk_cross_entropy_gradient_in_bfloat16_matches_autodiff():
  """The single-chunk path's hand-written lm_head backward (losses._logits) keeps autodiff's dtypes and
  values with bf16 hidden states and weights (float32 logits)."""
  r = np.random.default_rng(1)
  h = jnp.asarray(r.standard_normal((2, 6, 16)), jnp.bfloat16)
  w = jnp.asarray(r.standard_normal((16, 40)) * 0.3, jnp.bfloat16)
  t = jnp.asarray(r.integers(0, 40, (2, 6)))
  m = jnp.ones((2, 6), jnp.float32)

  def autodiff(h, w):
    logits = jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, -1)
    return jnp.sum((lse - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]) * m) + 1e-2 * jnp.sum(lse**2)

  got = jax.grad(lambda h, w: (lambda a: a[0] + 1e-2 * a[1])(chunked_cross_entropy(h, w, t, m, 64)), argnums=(0, 1))(
    h, w
  )
  want = jax.grad(autodiff, argnums=(0, 1))(h, w)
  for a, b in zip(got, want, strict=True):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)


def test_aux_losses():
  balanced = MoEStats(jnp.full((2, 4), 0.25), jnp.full((2, 4), 0.3), jnp.array([1.0, 3.0]))
  skewed = MoEStats(jnp.array([[1.0, 0, 0, 0]] * 2), jnp.array([[0.9, 0.1, 0.1, 0.1]] * 2), jnp.array([1.0, 3.0]))
  assert float(load_balancing_loss(balanced)) == pytest.approx(1.0)
  assert float(load_balancing_loss(skewed)) == pytest.approx(4 * 0.9 / 1.2)
  assert float(router_z_loss(balanced)) == pytest.approx(2.0)


def test_gradient_accumulation_equals_one_batch():
  cfg = load_config("configs/tiny.yaml", ["model.num_layers=2", "train.batch_size=4"])
  graphdef, params = nnx.split(create_model(cfg.model, seed=0))
  batch = random_batch(4, 32, drop=0.2)
  results = []
  for accum in (1, 2, 4):
    tc = cfg.train.__class__(**{**cfg.train.__dict__, "grad_accum": accum})  # aux losses: per micro-batch by design
    tx = make_optimizer(tc)
    step = jax.jit(make_train_step(graphdef, tx, tc, make_schedule(tc)))
    state = {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "skipped": jnp.zeros((), jnp.int32),
    }
    new, metrics = step(state, batch)
    results.append((metrics, new["params"]))
  for metrics, p in results[1:]:
    np.testing.assert_allclose(metrics["loss"], results[0][0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], results[0][0]["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(results[0][1]), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6)


def test_distillation_terms_match_numpy_and_topk_reduces_to_dense():
  r = np.random.default_rng(1)
  s = r.standard_normal((2, 3, 11)).astype(np.float32)
  t = r.standard_normal((2, 3, 11)).astype(np.float32)
  y = r.integers(0, 11, (2, 3))
  tau = 2.0
  t_logp = np.asarray(jax.nn.log_softmax(t, -1))
  ce, kl, margin, label_p = distillation_terms(jnp.asarray(s), jnp.asarray(t_logp), jnp.asarray(y), tau)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p_s, p_t = softmax(s / tau), softmax(t / tau)
  np.testing.assert_allclose(kl, tau**2 * (p_t * (np.log(p_t) - np.log(p_s))).sum(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ce, -np.log(np.take_along_axis(softmax(s), y[..., None], -1)[..., 0]), rtol=1e-5)
  p_t1 = softmax(t)
  np.testing.assert_allclose(margin, p_t1.max(-1) - np.take_along_axis(p_t1, y[..., None], -1)[..., 0], atol=1e-6)
  np.testing.assert_allclose(label_p, np.take_along_axis(p_t1, y[..., None], -1)[..., 0], rtol=1e-5)
  # top-k with k = V (any order) is the dense case; top-3 renormalises over its support
  order = np.argsort(-t_logp, -1)
  sparse = distillation_terms(
    jnp.asarray(s),
    jnp.asarray(np.take_along_axis(t_logp, order, -1)),
    jnp.asarray(y),
    tau,
    teacher_ids_BTK=jnp.asarray(order),
  )
  for a, b in zip(sparse, (ce, kl, margin, label_p), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  k3 = order[..., :3]
  _, kl3, _, _ = distillation_terms(
    jnp.asarray(s),
    jnp.asarray(np.take_along_axis(t_logp, k3, -1)),
    jnp.asarray(y),
    tau,
    teacher_ids_BTK=jnp.asarray(k3),
  )
  q = softmax(np.take_along_axis(t_logp, k3, -1) / tau)
  np.testing.assert_allclose(
    kl3, tau**2 * (q * (np.log(q) - np.log(np.take_along_axis(p_s, k3, -1)))).sum(-1), rtol=1e-5, atol=1e-6
  )


def test_soft_weights():
  p = jnp.asarray([[0.2, 0.9]])
  assert np.allclose(soft_weight("none", 0.5, p, 0.3), 0)
  assert np.allclose(soft_weight("fixed", 0.5, p, 0.3), 0.5)
  assert np.allclose(soft_weight("scheduled", 0.5, p, 0.3), 0.35)
  assert np.allclose(soft_weight("dynamic", 0.5, p, 0.3), [[0.4, 0.05]])  # p holds margins here
  # relative: α·p_T(y) / (p_T(y) + p_S(y)), p_S(y) = exp(−CE), no gradient through the student's CE
  p_t, ce = jnp.asarray([[0.6, 0.1]]), jnp.asarray([[-np.log(0.2), -np.log(0.3)]])
  assert np.allclose(soft_weight("relative", 0.5, p, 0.3, p_t, ce), [[0.5 * 0.6 / 0.8, 0.5 * 0.1 / 0.4]])
  assert np.allclose(jax.grad(lambda c: soft_weight("relative", 1.0, p, 0.3, p_t, c).sum())(ce), 0)


def test_distillation_step_from_itself_has_zero_soft_loss_and_gradient():
  """Teacher = student and w = 1: the KL and its gradient vanish; w = 0 gives the plain CE step."""
  from behemoth_jax.config import DistillConfig

  cfg = load_config("configs/tiny.yaml", ["model.num_layers=2", "train.batch_size=2"])
  graphdef, params = nnx.split(create_model(cfg.model, seed=0))
  batch = random_batch(2, 16)
  tx = make_optimizer(cfg.train)
  state = {
    "params": params,
    "opt_state": tx.init(params),
    "step": jnp.zeros((), jnp.int32),
    "skipped": jnp.zeros((), jnp.int32),
  }
  soft = make_train_step(
    graphdef, tx, cfg.train, make_schedule(cfg.train), (DistillConfig(weight="fixed", alpha=1.0), graphdef)
  )
  _, m = jax.jit(soft)(state, batch, params)
  assert abs(float(m["loss"])) < 1e-6 and float(m["grad_norm"]) < 1e-5 and float(m["hard_ce"]) > 1
  hard = make_train_step(graphdef, tx, cfg.train, make_schedule(cfg.train), (DistillConfig(weight="none"), graphdef))
  plain = make_train_step(graphdef, tx, cfg.train, make_schedule(cfg.train))
  _, a = jax.jit(hard)(state, batch, params)
  _, b = jax.jit(plain)(state, batch)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)


def test_offline_topk_targets_equal_the_online_teacher(tmp_path):
  """Records written with the teacher's full top-V, read back through the pipeline, give the online loss."""
  import json

  from behemoth_jax.config import DistillConfig
  from behemoth_jax.data import load_tokenizer, make_iterator
  from behemoth_jax.infer.generate import topk_logprobs
  from behemoth_jax.train.step import loss_and_stats

  cfg = load_config(
    "configs/tiny.yaml",
    [
      "model.num_layers=2",
      "model.vocab_size=264",
      f"data.source={tmp_path}/s.jsonl",
      "data.heldout_fraction=0.01",
      "data.prefetch=0",
    ],
  )
  teacher = create_model(cfg.model, seed=1)
  tok = load_tokenizer("bytes")
  texts = ["the teacher writes this", "and this one too", "short"]
  with open(tmp_path / "s.jsonl", "w") as f:
    for text in texts:
      ids = np.concatenate([[tok.bos_id], tok.encode(text), [tok.eos_id]]).astype(np.int32)
      top_ids, top_lp = topk_logprobs(teacher, ids[None], 264)
      f.write(
        json.dumps(
          {"text": text, "ids": ids.tolist(), "topk_ids": top_ids[0].tolist(), "topk_logprobs": top_lp[0].tolist()}
        )
        + "\n"
      )
  it = make_iterator(
    cfg.data, tok, split="train", seq_len=32, batch_size=2, seed=0, process_index=0, process_count=1, teacher_topk=264
  )
  batch = jax.tree.map(jnp.asarray, next(it))
  it.close()
  assert batch["teacher_topk_ids"].shape == (2, 32, 264)
  graphdef, student = nnx.split(create_model(cfg.model, seed=2))
  t_graphdef, t_params = nnx.split(teacher)
  dc = DistillConfig(weight="dynamic", temperature=2.0)
  total = batch["loss_mask"].sum()
  offline = loss_and_stats(graphdef, student, batch, cfg.train, total, (dc, None), None, 0.0)
  online = loss_and_stats(graphdef, student, batch, cfg.train, total, (dc, t_graphdef), t_params, 0.0)
  np.testing.assert_allclose(offline[0], online[0], rtol=1e-4)
  np.testing.assert_allclose(offline[1][2]["soft_kl"], online[1][2]["soft_kl"], rtol=1e-4)


def _distill_loss(terms, w_BT, mask_BT):
  ce, kl, margin, label_p = terms
  return jnp.sum(((1 - w_BT) * ce + w_BT * kl) * mask_BT) + 0.0 * jnp.sum(margin + label_p)


@pytest.mark.parametrize("chunk", [7, 16, 64])
@pytest.mark.parametrize("offline", [False, True])
@pytest.mark.parametrize("mesh", [None, dict(fsdp=4, tensor=2)])
def test_chunked_distillation_equals_the_full_vocabulary_terms(chunk, offline, mesh):
  """Values (CE, KL, margin) and the student's gradients (hidden states and LM head) of the chunked
  terms equal `distillation_terms` on full logits, for a vocabulary (50) not divisible by the chunk,
  online (teacher hidden states and head) and offline (teacher top-k, with a label outside the top-k);
  also with the vocabulary split over `tensor` 2 (25 columns per shard: chunks of 7 and 13 overrun a
  shard into the next one's ids)."""
  import contextlib

  from behemoth_jax.config import ParallelConfig
  from sharding.api import use_mesh
  from sharding.mesh import make_mesh

  rng = np.random.default_rng(chunk)
  b, t, d, dt, v, k, tau = 2, 5, 8, 6, 50, 4, 2.0
  h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
  th = jnp.asarray(rng.standard_normal((b, t, dt)), jnp.float32)
  tw = jnp.asarray(2 * rng.standard_normal((dt, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  weight = jnp.asarray(rng.uniform(0, 1, (b, t)), jnp.float32)
  mask = jnp.asarray(rng.uniform(0, 1, (b, t)) > 0.2, jnp.float32)
  t_logp_full = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", th, tw), axis=-1)
  if offline:
    ids = jax.lax.top_k(t_logp_full, k)[1].astype(jnp.int32)
    t_logp = jnp.take_along_axis(t_logp_full, ids, axis=-1)
    targets = targets.at[0, 0].set(int(jnp.argsort(t_logp_full[0, 0])[0]))  # a label outside the top-k

    def ref(h, w):
      return distillation_terms(jnp.einsum("btd,dv->btv", h, w), t_logp, targets, tau, ids)

    def ours(h, w):
      return chunked_distillation_terms(h, w, targets, tau, chunk, teacher_logp_BTK=t_logp, teacher_ids_BTK=ids)
  else:

    def ref(h, w):
      return distillation_terms(jnp.einsum("btd,dv->btv", h, w), t_logp_full, targets, tau)

    def ours(h, w):
      return chunked_distillation_terms(h, w, targets, tau, chunk, teacher_h_BTD=th, teacher_w_DV=tw)

  with use_mesh(make_mesh(ParallelConfig(**mesh))) if mesh else contextlib.nullcontext():
    got = jax.jit(ours)(h, w)
    g_ours = jax.jit(jax.grad(lambda h, w: _distill_loss(ours(h, w), weight, mask), argnums=(0, 1)))(h, w)
  for a, b_ in zip(got, ref(h, w), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-6)
  g_ref = jax.grad(lambda h, w: _distill_loss(ref(h, w), weight, mask), argnums=(0, 1))(h, w)
  for a, b_ in zip(g_ours, g_ref, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-6)


def test_chunked_distillation_holds_no_vocabulary_sized_buffer_and_runs_vocabulary_sharded():
  """Compiled forward + backward at B·T = 64 tokens, V = 1000, chunk 128: no buffer of B·T·V elements
  (64,000) in the optimized HLO; on a mesh with the LM heads sharded over the vocabulary (8 devices)
  the values and gradients equal one device's."""
  from jax.sharding import NamedSharding, PartitionSpec

  rng = np.random.default_rng(0)
  b, t, d, v, tau, chunk = 4, 16, 32, 1000, 1.5, 128
  h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  w = jnp.asarray(0.3 * rng.standard_normal((d, v)), jnp.float32)
  th = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  tw = jnp.asarray(0.3 * rng.standard_normal((d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)

  def loss(h, w, th, tw):
    ce, kl, _, _ = chunked_distillation_terms(h, w, targets, tau, chunk, teacher_h_BTD=th, teacher_w_DV=tw)
    return jnp.sum(0.5 * ce + 0.5 * kl)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  hlo = step.lower(h, w, th, tw).compile().as_text()
  sizes = [int(np.prod([int(x) for x in dims.split(",") if x])) for dims in re.findall(r"f32\[([\d,]*)\]", hlo)]
  assert max(sizes) < b * t * v, max(sizes)
  assert max(sizes) >= d * v  # the heads themselves (and their gradient) are in the program: the check sees them
  want = step(h, w, th, tw)
  mesh = jax.make_mesh((8,), ("vocab",), axis_types=(jax.sharding.AxisType.Auto,))  # as sharding/mesh.py
  shard = NamedSharding(mesh, PartitionSpec(None, "vocab"))
  w8, tw8 = jax.device_put(w, shard), jax.device_put(tw, shard)  # 125 columns per device; chunks of 128
  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, w8, th, tw8)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b_ in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_chunked_topk_logprobs_equal_the_full_vocabulary_top_k(chunk):
  """Scoring's top-k over vocabulary chunks: the same ids (ties included: duplicated head columns give
  equal logits, broken toward the lower id as lax.top_k does) and log-probs as log_softmax + top_k."""
  from behemoth_jax.train.losses import chunked_topk_logprobs

  r = np.random.default_rng(0)
  h = jnp.asarray(r.standard_normal((2, 5, 8)), jnp.float32)
  w = r.standard_normal((8, 50))
  w[:, [3, 8, 9, 31]] = 0.0  # equal (zero) logits, across chunks and within one, near the middle
  w = jnp.asarray(w, jnp.float32)
  want_lp, want_ids = jax.lax.top_k(jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", h, w), axis=-1), 30)
  assert np.any(np.isin(np.asarray(want_ids), 3) & np.isin(np.asarray(want_ids), 31).any(-1, keepdims=True))
  ids, lp = chunked_topk_logprobs(h, w, 30, chunk)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
  np.testing.assert_allclose(np.asarray(lp), np.asarray(want_lp), rtol=1e-5, atol=1e-5)
