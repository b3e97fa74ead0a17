"""compiled_flops vs. hand-derived matmul FLOPs (and vs. XLA's cost_analysis)."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from behemoth_jax.scale.flops import compiled_flops, executed_flops, hlo_text_flops

M, K, N = 128, 256, 256
MATMUL = 2 * M * K * N  # one [M,K] @ [K,N]


def _compile(f, *args):
  return jax.jit(f).lower(*args).compile()


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def _scan_matmuls(x, ws):
  return lax.scan(lambda c, w: (c @ w, None), x, ws)[0]


X = jnp.ones((M, K), jnp.float32)


def test_plain_matmul_matches_formula_and_cost_analysis():
  c = _compile(lambda x, w: x @ w, X, jnp.ones((K, N)))
  assert compiled_flops(c) == MATMUL
  assert _xla_flops(c) == MATMUL


def test_scan_multiplies_by_trip_count():
  c = _compile(_scan_matmuls, X, jnp.ones((10, K, N)))
  assert compiled_flops(c) == 10 * MATMUL  # 167.8M
  # Why this module exists: XLA counts the while body once (16.7M).
  assert _xla_flops(c) < compiled_flops(c)
  assert _xla_flops(c) == pytest.approx(MATMUL, rel=0.01)


def test_nested_scan():
  def f(x, ws):  # ws: [3 outer, 4 inner, K, N]
    return lax.scan(lambda c, w4: (_scan_matmuls(c, w4), None), x, ws)[0]

  c = _compile(f, X, jnp.ones((3, 4, K, N)))
  assert compiled_flops(c) == 12 * MATMUL


def test_trip_count_read_from_the_loop_condition_when_xla_prints_none():
  """TPU programs print no known_trip_count: the count comes from the condition's compare(i, N)."""
  import re

  def f(x, ws):
    return lax.scan(lambda c, w4: (_scan_matmuls(c, w4), None), x, ws)[0]

  hlo = _compile(f, X, jnp.ones((3, 4, K, N))).as_text()
  stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", hlo)
  assert "known_trip_count" in hlo and "known_trip_count" not in stripped
  assert hlo_text_flops(stripped) == hlo_text_flops(hlo) == 12 * MATMUL


def test_batched_einsum():
  b, i, j, k = 4, 8, 16, 32
  c = _compile(lambda a, w: jnp.einsum("bij,bjk->bik", a, w), jnp.ones((b, i, j)), jnp.ones((b, j, k)))
  assert compiled_flops(c) == 2 * b * i * j * k


def test_grad_of_scanned_loss_is_three_times_forward():
  # Per layer: fwd c@w, bwd dc = dy @ w.T and dw = c.T @ dy, each 2*M*K*N
  # (with K == N). dc is computed for every layer since the loop body is uniform.
  layers = 6
  loss = lambda ws, x: jnp.sum(_scan_matmuls(x, ws))  # noqa: E731
  ws = jnp.ones((layers, K, N)) * 0.01
  c = _compile(jax.grad(loss), ws, X)
  assert compiled_flops(c) == 3 * layers * MATMUL


def test_cond_in_scan_counts_max_branch():
  small = MATMUL  # c @ w1: [M,K]@[K,N]
  big = 2 * M * K * 512 + 2 * M * 512 * N  # (c @ w2) @ w3
  assert big > small

  def f(x, w1s, w2s, w3s):
    def body(c, ws):
      w1, w2, w3 = ws
      c = lax.cond(jnp.sum(c) > 0, lambda c: c @ w1, lambda c: (c @ w2) @ w3, c)
      return c, None

    return lax.scan(body, x, (w1s, w2s, w3s))[0]

  trips = 5
  c = _compile(f, X, jnp.ones((trips, K, N)), jnp.ones((trips, K, 512)), jnp.ones((trips, 512, N)))
  assert compiled_flops(c) == trips * big


def test_convolution():
  # NHWC input [2,16,16,8], HWIO kernel [3,3,8,32], SAME padding -> [2,16,16,32].
  def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  c = _compile(conv, jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 32)))
  # Taps on the SAME padding are not counted: along each spatial dim 16 outputs x 3 taps, less the 2
  # that fall off the edges.
  assert compiled_flops(c) == 2 * (2 * 32) * (16 * 3 - 2) ** 2 * 8


def test_padded_convolution_that_is_a_dot_counts_the_dot():
  """XLA:TPU writes some dots as a convolution whose window spans a whole dimension, padded by all
  but one on each side (Scout's q projection: window 40, pad 39_39): only the taps on data count."""
  hlo = """HloModule m

ENTRY %main (a: bf16[64,1,16], b: bf16[40,16,8]) -> bf16[64,40,8] {
  %a = bf16[64,1,16]{2,1,0} parameter(0)
  %b = bf16[40,16,8]{2,1,0} parameter(1)
  ROOT %c = bf16[64,40,8]{2,1,0} convolution(%a, %b), window={size=40 pad=39_39 rhs_reversal=1}, dim_labels=b0f_0io->b0f
}
"""
  # The input's spatial size is 1: output position o meets it at tap 39 - o only, 40 taps in all (a
  # [64, 16] x [16, 40 x 8] dot); whole windows would count 40 x 40.
  assert hlo_text_flops(hlo) == 2 * 64 * 8 * 40 * 16


def test_unknown_trip_count_raises():
  def f(x, w, n):
    return lax.fori_loop(0, n, lambda i, c: c @ w, x)

  c = _compile(f, X, jnp.ones((K, N)), jnp.int32(3))
  with pytest.raises(ValueError, match="while"):
    compiled_flops(c)


@pytest.mark.parametrize("scope,trips", [("moe_exchange_rounds", 1), ("moe_exchange_later_rounds", 0)])
def test_expert_exchange_rounds_count_as_under_balanced_routing(scope, trips):
  """The ragged exchange's loops (sharding/expert.py ROUND_LOOPS) run as often as routing needs:
  counted by their named scope, not refused."""

  def f(x, w, n):
    with jax.named_scope(scope):
      return lax.fori_loop(0, n, lambda i, c: c @ w, x)

  assert compiled_flops(_compile(f, X, jnp.ones((K, N)), jnp.int32(3))) == trips * MATMUL


def test_cublas_gemm_custom_call_in_while():
  # GPU dots become cuBLAS custom-calls (format from XLA's GPU tests); no GPU needed.
  hlo = """
HloModule m

%body (p: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %p = (s32[], f32[64,32]{1,0}) parameter(0)
  %x = f32[64,32]{1,0} get-tuple-element(%p), index=1
  %w = f32[32,32]{1,0} constant({...})
  %gemm = (f32[64,32]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %t = (s32[], f32[64,32]{1,0}) tuple(%i, %gemm)
}

%cond (p.1: (s32[], f32[64,32])) -> pred[] {
  %p.1 = (s32[], f32[64,32]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (a: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %a = (s32[], f32[64,32]{1,0}) parameter(0)
  ROOT %while = (s32[], f32[64,32]{1,0}) while(%a), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}
}
"""
  assert hlo_text_flops(hlo) == 7 * 2 * 64 * 32 * 32


_STEPPED_LOOP = """
HloModule m

%body (p: (u32[], f32[64,32])) -> (u32[], f32[64,32]) {
  %p = (u32[], f32[64,32]{1,0}) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %x = f32[64,32]{1,0} get-tuple-element(%p), index=1
  %w = f32[32,32]{1,0} constant({...})
  %a = f32[64,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %b = f32[64,32]{1,0} dot(%a, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = u32[] constant(STEP)
  %c = u32[] copy(%i)
  %next = u32[] add(COUNTER, %two)
  ROOT %t = (u32[], f32[64,32]{1,0}) tuple(%next, %b)
}

%cond (p.1: (u32[], f32[64,32])) -> pred[] {
  %p.1 = (u32[], f32[64,32]{1,0}) parameter(0)
  %n = u32[] constant(BOUND)
  %i.1 = u32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: (u32[], f32[64,32])) -> (u32[], f32[64,32]) {
  %a = (u32[], f32[64,32]{1,0}) parameter(0)
  ROOT %while = (u32[], f32[64,32]{1,0}) while(%a), condition=%cond, body=%body
}
"""


@pytest.mark.parametrize("counter", ["%i", "%c"])
@pytest.mark.parametrize("step,bound,trips", [(1, 16, 16), (2, 16, 8), (2, 15, 8), (4, 16, 4)])
def test_trip_count_follows_the_counters_step(step, bound, trips, counter):
  """XLA's bidirectional windowed einsums on TPU (collective matmuls under tensor / fsdp sharding) add 2
  to their counter each trip and compute two partial products: `while i < 16` runs 8 times. Counting 16
  doubled every sharded projection of Behemoth's v5p-512 program (3,173 vs 2,486 TFLOP per chip). The
  backward's loops add to a copy of the counter (%c)."""
  hlo = _STEPPED_LOOP.replace("STEP", str(step)).replace("BOUND", str(bound)).replace("COUNTER", counter)
  assert hlo_text_flops(hlo) == trips * 2 * (2 * 64 * 32 * 32)


def _executed(f, *args):
  compiled = _compile(f, *args)
  return executed_flops(lambda: jax.block_until_ready(compiled(*args)), compiled.as_text())


def test_executed_flops_equal_compiled_flops_without_data_dependent_control_flow():
  ws = jnp.ones((10, K, N), jnp.float32)
  f = lambda x, ws: jnp.tanh(_scan_matmuls(x, ws)) @ ws[0]  # a loop of 10 + one more outside it
  assert _executed(f, X, ws) == compiled_flops(_compile(f, X, ws)) == 11 * MATMUL


@pytest.mark.parametrize("n", [0, 3, 7])
def test_executed_flops_count_the_real_trips_of_a_data_dependent_loop(n):
  f = lambda x, w, n: lax.fori_loop(0, n, lambda i, c: jnp.tanh(c @ w), x)
  assert _executed(f, X, jnp.ones((K, N)), jnp.int32(n)) == n * MATMUL


@pytest.mark.parametrize("take", [True, False])
def test_executed_flops_count_only_the_branch_that_ran(take):
  def f(x, w, take):
    return lax.cond(take, lambda: (x @ w) @ w.T, lambda: x * 2.0)

  c = _compile(f, X, jnp.ones((K, N)), jnp.bool_(take))
  assert compiled_flops(c) == 2 * MATMUL  # the static count: the most expensive branch
  assert _executed(f, X, jnp.ones((K, N)), jnp.bool_(take)) == (2 * MATMUL if take else 0)


def test_tpu_ragged_dot_kernels_are_counted():
  """Compiled for a TPU v5p chip (libtpu), ragged_dot is a Mosaic kernel (a custom call, not a dot):
  the input gradient counts the useful 2·M·K·N; the weight gradient is an input-dilated
  convolution whose taps on the inserted zeros are not counted, leaving E × the useful FLOPs: XLA
  computes it densely over every expert (docs/SCALE.md)."""
  from behemoth_jax.scale import aot
  from behemoth_jax.scale.flops import matmuls

  sh = jax.sharding.SingleDeviceSharding(aot.parse_topology("v5p-8").devices[0])
  m, k, n, e = 4096, 256, 512, 8
  args = [
    jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=sh),
    jax.ShapeDtypeStruct((e, k, n), jnp.bfloat16, sharding=sh),
    jax.ShapeDtypeStruct((e,), jnp.int32, sharding=sh),
  ]

  def loss(x, w, g):
    return jnp.sum(lax.ragged_dot(x, w, g, preferred_element_type=jnp.float32))

  with jax.default_matmul_precision("default"):  # TPU kernels take bf16 operands as bf16 (as scale.aot)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
  useful = 2 * m * k * n
  kernels = [mm.flops for mm in matmuls(hlo) if mm.op_name.startswith("ragged-dot")]
  others = [mm.flops for mm in matmuls(hlo) if not mm.op_name.startswith("ragged-dot")]
  assert kernels == [useful]  # dx = dy · wᵀ, row by row (the loss is linear: no forward kernel needed)
  assert others == [e * useful]


@pytest.mark.parametrize("block", [16, 32])
def test_attention_core_matmuls_are_found_by_scope_and_match_the_visited_block_pairs(block):
  """The scores/values matmuls of blocked causal attention carry `ATTENTION_CORE` in their name stack
  (inside XLA:CPU's fusions too: the calling fusion's), forward and backward: compiled FLOPs = the
  causal count × the visited (query block, key block) pairs' share of it × 3.5 (forward 2 matmuls per
  pair, FlashAttention's backward 5), what scale/aot.py's report divides by."""
  from behemoth_jax.model.kernels import ATTENTION_CORE, causal_attention
  from behemoth_jax.scale.flops import in_scope, matmuls

  b, t, n, h = 1, 64, 2, 8
  q, k = jnp.ones((b, t, n, h)), jnp.ones((b, t, 1, h))
  f = jax.grad(lambda q, k, v: causal_attention(q, k, v, chunk=None, block=block).sum(), argnums=(0, 1, 2))
  found = [mm for mm in matmuls(jax.jit(f).lower(q, k, k).compile().as_text()) if in_scope(mm.op_name, ATTENTION_CORE)]
  nb = t // block
  visited = nb * (nb + 1) // 2 * block * block  # query-key pairs in the blocks on or below the diagonal
  causal = 4.0 * b * n * h * t * (t + 1) / 2  # cost.analytic_forward_flops' attention term
  assert sum(mm.flops for mm in found) == pytest.approx(3.5 * causal * visited / (t * (t + 1) / 2))
  assert in_scope("jit(f)/transpose(jvp(attention_core))/while", ATTENTION_CORE)
  assert not in_scope("jit(f)/attention_core_x/dot", ATTENTION_CORE)
