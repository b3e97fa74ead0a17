"""Chunked attention computed chunk by chunk vs an independent masked dense T×T reference."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from behemoth_jax.model.kernels import causal_attention, segment_positions
from sharding import axes as ax


def dense_reference(q, k, v, chunk, positions, segments):
  """Definition (docs/ARCHITECTURE.md §2.4) as a full T×T mask: j ≤ i, same position chunk, same segment."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bqnh,bknh->bnqk", q, k) * h**-0.5
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  mask = np.broadcast_to(j <= i, (b, t, t)).copy()
  if chunk is not None:
    mask &= positions[:, :, None] // chunk == positions[:, None, :] // chunk
  if segments is not None:
    mask &= segments[:, :, None] == segments[:, None, :]
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnqk,bknh->bqnh", p, v)


def _qkv(seed, b=2, t=23, n=6, kv=2, h=8):
  r = np.random.default_rng(seed)
  return [r.standard_normal(s).astype(np.float32) for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h))]


@pytest.mark.parametrize("chunk", [1, 4, 5, 23, 40, None])
def test_default_positions_match_dense(chunk):
  q, k, v = _qkv(0)
  pos = np.broadcast_to(np.arange(23), (2, 23))
  got = causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), chunk=chunk)
  np.testing.assert_allclose(got, dense_reference(q, k, v, chunk, pos, None), atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 5, 8])
def test_packed_segments_and_gapped_positions_match_dense(chunk):
  q, k, v = _qkv(1)
  seg = np.array([[0] * 7 + [1] * 10 + [2] * 6, [5] * 23])
  pos = np.array(segment_positions(jnp.asarray(seg)))
  pos[1] = np.cumsum(np.random.default_rng(2).integers(1, 3, 23))  # gaps; strictly increasing
  got = causal_attention(
    *map(jnp.asarray, (q, k, v)),
    chunk=chunk,
    positions_BT=jnp.asarray(pos),
    segment_ids_BT=jnp.asarray(seg),
    explicit_positions=True,
  )
  np.testing.assert_allclose(got, dense_reference(q, k, v, chunk, pos, seg), atol=1e-5)


def test_offset_positions_within_one_block_still_chunked():
  """T < chunk but positions straddle a chunk boundary (e.g. a continuation at position 6)."""
  q, k, v = _qkv(3, t=6)
  pos = np.broadcast_to(np.arange(6, 12), (2, 6))
  got = causal_attention(*map(jnp.asarray, (q, k, v)), chunk=8, positions_BT=jnp.asarray(pos), explicit_positions=True)
  np.testing.assert_allclose(got, dense_reference(q, k, v, 8, pos, None), atol=1e-5)


def test_causal_through_gradients():
  q, k, v = map(jnp.asarray, _qkv(4, b=1, t=12))
  t0 = 6
  f = lambda q, k, v: causal_attention(q, k, v, chunk=4)[0, t0].sum()
  gq, gk, gv = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  assert np.all(np.asarray(gk)[0, t0 + 1 :] == 0) and np.all(np.asarray(gv)[0, t0 + 1 :] == 0)
  assert np.all(np.asarray(gk)[0, :4] == 0)  # chunk [4, 8) never sees keys 0..3
  assert np.abs(np.asarray(gk)[0, 4 : t0 + 1]).sum() > 0


def test_memory_is_chunk_local():
  """The compiled chunked path holds no T×T score tensor."""
  t, c = 512, 32
  q = jnp.zeros((1, t, 2, 16))
  k = jnp.zeros((1, t, 1, 16))
  hlo = jax.jit(lambda q, k, v: causal_attention(q, k, v, chunk=c)).lower(q, k, k).compile().as_text()
  shapes = re.findall(r"\[([\d,]+)\]", hlo)
  assert not [s for s in shapes if f"{t},{t}" in s]
  assert [s for s in shapes if s.endswith(f"{c},{c}")]  # per-chunk [.., C, C] scores


def test_segment_positions():
  seg = jnp.array([[3, 3, 3, 1, 1, 7]])
  np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0]])


@pytest.mark.parametrize("case", ["global", "chunked", "packed_chunked", "packed_global"])
def test_blocked_attention_equals_dense_values_and_gradients(case):
  """The memory-efficient path (key blocks, online softmax, FlashAttention backward) against the dense
  masked softmax, outputs and all three gradients, with GQA, padding, packed segments and chunks."""
  rng = np.random.default_rng(0)
  b, t, n, kv, h = 2, 64, 4, 2, 8
  q, k, v, w = (
    jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)]
  )
  seg = jnp.asarray(np.sort(rng.integers(1, 4, (b, t)), axis=1)).at[1, -5:].set(0)
  packed = dict(positions_BT=segment_positions(seg), segment_ids_BT=seg, explicit_positions=True)
  kw = {
    "global": dict(chunk=None),
    "chunked": dict(chunk=32),
    "packed_chunked": dict(chunk=16, **packed),
    "packed_global": dict(chunk=None, **packed),
  }[case]

  def loss(q, k, v, block):
    return (causal_attention(q, k, v, block=block, **kw) * w).sum()

  dense, dense_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, 0)
  blocked, blocked_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, 8)
  np.testing.assert_allclose(
    causal_attention(q, k, v, block=8, **kw), causal_attention(q, k, v, block=0, **kw), atol=2e-6
  )
  np.testing.assert_allclose(blocked, dense, rtol=1e-5)
  for got, want in zip(blocked_grads, dense_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blocked_attention_never_holds_a_full_score_matrix():
  """Compiled forward + backward at T = 4096, block 256: no buffer of T x T scores (or a chunk's)."""
  t, n, h = 4096, 2, 16
  x = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)
  f = jax.jit(jax.grad(lambda q, k, v: causal_attention(q, k, v, chunk=None, block=256).sum(), argnums=(0, 1, 2)))
  hlo = f.lower(x, x, x).compile().as_text()
  shapes = [tuple(int(d) for d in m.split(",")) for m in re.findall(r"f32\[([\d,]+)\]", hlo)]
  assert max(math.prod(s) for s in shapes) <= t * n * 256, max(shapes, key=math.prod)


@pytest.mark.parametrize("case", ["global", "chunked", "packed_chunked", "packed_global", "gapped_chunked"])
def test_query_blocks_skip_masked_keys_exactly(case, monkeypatch):
  """The dense path split into causal query blocks (each block sees only keys up to its end, or the
  chunk-wide window before it) equals the independent T×T reference, values and gradients, and its
  compiled matmul FLOPs shrink to (n+1)/2n of the unsplit square."""
  from behemoth_jax.model import kernels
  from behemoth_jax.scale.flops import compiled_flops

  rng = np.random.default_rng(5)
  b, t, n, kv, h = 2, 64, 4, 2, 8
  q, k, v, w = (
    jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)]
  )
  seg = np.sort(rng.integers(1, 4, (b, t)), axis=1)
  seg[1, -5:] = 0
  pos = np.array(segment_positions(jnp.asarray(seg)))
  chunk = {"global": None, "chunked": 32, "packed_chunked": 16, "packed_global": None, "gapped_chunked": 16}[case]
  kw, ref_pos, ref_seg = dict(chunk=chunk), np.broadcast_to(np.arange(t), (b, t)), None
  if case.startswith("packed"):
    kw.update(positions_BT=jnp.asarray(pos), segment_ids_BT=jnp.asarray(seg), explicit_positions=True)
    ref_pos, ref_seg = pos, seg
  if case == "gapped_chunked":  # strictly increasing with gaps: the windowed path, no segments
    ref_pos = np.cumsum(rng.integers(1, 3, (b, t)), axis=1)
    kw.update(positions_BT=jnp.asarray(ref_pos), explicit_positions=True)

  def loss(q, k, v):
    return (causal_attention(q, k, v, **kw) * w).sum()

  span = chunk or t
  qb = span // 4  # four query blocks per span (jitted: a Python loop of blocks is slow op by op)
  grads = {}
  for block in (qb, 1 << 20):
    monkeypatch.setattr(kernels, "QUERY_BLOCK", block)
    fwd = jax.jit(lambda q, k, v: causal_attention(q, k, v, **kw)).lower(q, k, v).compile()
    if block == qb:
      want = dense_reference(*map(np.asarray, (q, k, v)), chunk, ref_pos, ref_seg)
      np.testing.assert_allclose(fwd(q, k, v), want, atol=1e-5)
    grads[block] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    grads[block, "flops"] = compiled_flops(fwd)
  for got, want in zip(grads[qb], grads[1 << 20], strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)
  windowed = case in ("packed_chunked", "gapped_chunked")
  expect = (span + qb) / (2 * span) if windowed else 5 / 8  # (n+1)/2n of the square for n = 4 blocks
  assert grads[qb, "flops"] == pytest.approx(expect * grads[1 << 20, "flops"], rel=1e-6)


@pytest.mark.parametrize("case", ["global", "chunked", "packed_chunked"])
def test_blocked_path_visits_only_key_blocks_with_visible_keys(case):
  """The blocked kernel skips (query block, key block) pairs that causality (or, windowed, the chunk)
  masks entirely: with 4 query blocks per span it computes 5/8 of the matmul FLOPs of visiting every
  key block with every query, forward and forward + backward, with the same values and gradients. The
  reference is the kernel's own every-pair path, which it takes when the sequence is split over
  `context` (one query block)."""
  from behemoth_jax.scale.flops import compiled_flops

  rng = np.random.default_rng(9)
  b, t, n, kv, h = 2, 64, 4, 2, 8
  q, k, v, w = (
    jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)]
  )
  seg = np.sort(rng.integers(1, 4, (b, t)), axis=1)
  chunk = {"global": None, "chunked": 32, "packed_chunked": 32}[case]
  kw = dict(chunk=chunk, block=(chunk or t) // 4)
  if case == "packed_chunked":  # the windowed layout: each chunk's keys are the previous chunk and its own
    kw.update(
      positions_BT=segment_positions(jnp.asarray(seg)), segment_ids_BT=jnp.asarray(seg), explicit_positions=True
    )
  out, flops = {}, {}
  for name in ("skipping", "every pair"):
    # A sequence split over `context` keeps one query block: every pair (model/kernels.py).
    split = 2 if name == "every pair" else 1
    with ax.use_shard_count(lambda logical, split=split: split if logical == ax.LENGTH else 1):
      fwd = jax.jit(lambda q, k, v: causal_attention(q, k, v, **kw)).lower(q, k, v).compile()
      grad = jax.jit(jax.grad(lambda q, k, v: (causal_attention(q, k, v, **kw) * w).sum(), argnums=(0, 1, 2)))
      grad = grad.lower(q, k, v).compile()
    out[name] = (fwd(q, k, v), *grad(q, k, v))
    flops[name] = (compiled_flops(fwd), compiled_flops(grad))
  for got, want in zip(out["skipping"], out["every pair"], strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)
  for got, want in zip(flops["skipping"], flops["every pair"], strict=True):
    assert got == pytest.approx(5 / 8 * want, rel=0.02)  # the rest: softmax, masks, elementwise


def jnp_reference(q, k, v, chunk, positions, segments):
  """`dense_reference` in jax.numpy, differentiable: the plain T×T masked softmax attention whose
  `jax.grad` is the oracle for both hand-written backward passes."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  s = jnp.einsum("bqnh,bknh->bnqk", q, k) * h**-0.5
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  mask = np.broadcast_to(j <= i, (b, t, t)).copy()
  if chunk is not None:
    mask &= positions[:, :, None] // chunk == positions[:, None, :] // chunk
  if segments is not None:
    mask &= segments[:, :, None] == segments[:, None, :]
  p = jax.nn.softmax(jnp.where(mask[:, None], s, -1e30), axis=-1)
  return jnp.einsum("bnqk,bknh->bqnh", p, v)


ORACLE_CASES = ["global", "chunked", "packed_chunked", "packed_global", "gapped_chunked", "offset_chunked"]


@pytest.mark.parametrize("kernel", ["dense", "dense_query_blocks", "flash", "flash_padded_span"])
@pytest.mark.parametrize("case", ORACLE_CASES)
def test_both_kernels_gradients_equal_jax_grad_of_plain_attention(case, kernel, monkeypatch):
  """Values and dq, dk, dv of the dense kernel (`_dense_hm`, one query block or several) and the
  blocked kernel (`_flash`; key spans a multiple of the block, or padded up to one) against jax.grad
  of `jnp_reference`: GQA (3 query heads per KV head), packed segments with padding (segment 0),
  gapped positions, positions offset past a chunk boundary, chunked and global."""
  from behemoth_jax.model import kernels

  rng = np.random.default_rng(7)
  b, t, n, kv, h = 2, 48, 6, 2, 8
  q, k, v, w = (
    jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)]
  )
  seg = np.sort(rng.integers(1, 4, (b, t)), axis=1)
  seg[1, -5:] = 0  # padding at the end of row 1
  chunk = {"global": None, "packed_global": None}.get(case, 16)
  pos, ref_seg, kw = np.broadcast_to(np.arange(t), (b, t)), None, dict(chunk=chunk)
  if case.startswith("packed"):
    pos, ref_seg = np.array(segment_positions(jnp.asarray(seg))), seg
    kw.update(positions_BT=jnp.asarray(pos), segment_ids_BT=jnp.asarray(seg), explicit_positions=True)
  elif case in ("gapped_chunked", "offset_chunked"):
    pos = (
      np.cumsum(rng.integers(1, 3, (b, t)), axis=1)
      if case == "gapped_chunked"
      else np.broadcast_to(np.arange(t) + 13, (b, t))
    )  # a continuation: chunks start mid-sequence
    kw.update(positions_BT=jnp.asarray(pos), explicit_positions=True)
  if kernel == "dense_query_blocks":
    monkeypatch.setattr(kernels, "QUERY_BLOCK", 8)
  block = {"dense": 0, "dense_query_blocks": 0, "flash": 8, "flash_padded_span": 7}[kernel]

  def run(f):  # outputs and the gradients of a weighted sum of them
    grads = jax.grad(lambda q, k, v: (f(q, k, v) * w).sum(), argnums=(0, 1, 2))
    return jax.jit(lambda q, k, v: (f(q, k, v), grads(q, k, v)))(q, k, v)

  got, got_grads = run(lambda q, k, v: causal_attention(q, k, v, block=block, **kw))
  want, want_grads = run(lambda q, k, v: jnp_reference(q, k, v, chunk, pos, ref_seg))
  np.testing.assert_allclose(got, want, atol=1e-5)
  for name, g, r in zip("qkv", got_grads, want_grads, strict=True):
    np.testing.assert_allclose(g, r, atol=2e-5, err_msg=f"d{name}")
