"""fp8_einsum / fp8_grouped_matmul: numerics against an exact fp8 emulation and against f32, HLO types.

Two references per quantity, because each catches different bugs:
- an emulation (numpy + ml_dtypes: quantize-dequantize each operand with the same per-tensor scale,
  then an f64/f32 product) must agree to ~1e-3: catches wrong scales, wrong dtypes (e4m3 vs e5m2),
  wrong transposed equations;
- the plain f32 result must be within what e4m3 (forward) and e5m2 (gradients) rounding allows, and
  *not* equal to it: catches a path that silently skips quantization.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from behemoth_jax.model.fp8 import fp8_einsum, fp8_grouped_matmul
from behemoth_jax.model.gmm import grouped_matmul

EQUATIONS = [  # (equation, x shape, w shape): the model's forms, then a broadcasting ellipsis
  ("BTD,DNH->BTNH", (2, 8, 64), (64, 4, 16)),
  ("TD,DE->TE", (32, 64), (64, 48)),
  ("...D,DF->...F", (2, 8, 64), (64, 96)),
  ("BTNH,NHD->BTD", (2, 8, 4, 16), (4, 16, 64)),
  ("...TD,...DE->...TE", (3, 8, 16), (2, 3, 16, 8)),  # ellipses of different ranks, right-aligned
]


def qdq(t: jax.Array, dtype: type) -> np.ndarray:
  """Reference per-tensor current scaling: quantize to `dtype` and back, in numpy."""
  t = np.asarray(t, np.float32)
  fmax = np.float32(ml_dtypes.finfo(dtype).max)
  amax = np.abs(t).max()
  scale = amax / fmax if amax > 0 else np.float32(1)
  return np.clip(t / scale, -fmax, fmax).astype(dtype).astype(np.float32) * scale


def rel(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@partial(jax.jit, static_argnums=0)
def _value_and_vjp(f, x: jax.Array, w: jax.Array, dy: jax.Array) -> tuple[jax.Array, ...]:
  """One compiled program per case: much faster than op-by-op dispatch of the quantize steps."""
  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(dy))


def data(*shapes: tuple[int, ...], seed: int = 0, scales: tuple[float, ...] = (1.0, 0.05)) -> list[jax.Array]:
  """Gaussian f32 arrays (numpy: no compile per shape). Default: activations, then weights at init
  scale, so the two operands' scales differ by orders of magnitude."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(s * rng.standard_normal(shape, np.float32)) for shape, s in zip(shapes, scales)]


@pytest.mark.parametrize("eq,x_shape,w_shape", EQUATIONS)
def test_einsum_values_and_grads(eq, x_shape, w_shape):
  x, w = data(x_shape, w_shape)
  y_shape = jax.eval_shape(partial(jnp.einsum, eq), x, w).shape
  (dy,) = data(y_shape, seed=1)
  y, dx, dw = _value_and_vjp(partial(fp8_einsum, eq), x, w, dy)
  assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype

  xq, wq, dyq = qdq(x, ml_dtypes.float8_e4m3fn), qdq(w, ml_dtypes.float8_e4m3fn), qdq(dy, ml_dtypes.float8_e5m2)
  # Emulation: the f32 einsum of the dequantized operands, and its own (independently derived) vjp.
  y_emu, dx_emu, dw_emu = _value_and_vjp(partial(jnp.einsum, eq), xq, wq, dyq)
  assert rel(y, y_emu) < 1e-3
  assert rel(dx, dx_emu) < 1e-3
  assert rel(dw, dw_emu) < 1e-3

  y32, dx32, dw32 = _value_and_vjp(partial(jnp.einsum, eq), x, w, dy)
  # e4m3 keeps 3 mantissa bits: ~2.5% rms relative error per operand, ~3.8% measured on the product.
  assert 0.01 < rel(y, y32) < 0.05
  # Gradients add e5m2 (2 mantissa bits) on dy: ~6% measured.
  assert 0.02 < rel(dx, dx32) < 0.08
  assert 0.02 < rel(dw, dw32) < 0.08


def test_bf16_inputs_keep_dtype():
  x, w = data((16, 32), (32, 8))
  x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  y, dx, dw = _value_and_vjp(partial(fp8_einsum, "TD,DE->TE"), x, w, jnp.ones((16, 8), jnp.bfloat16))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
  assert rel(y.astype(jnp.float32), x.astype(jnp.float32) @ w.astype(jnp.float32)) < 0.05


def test_zero_inputs_give_zeros_not_nan():
  f = partial(fp8_einsum, "TD,DE->TE")
  y, dx, dw = _value_and_vjp(f, jnp.zeros((4, 8)), jnp.zeros((8, 3)), jnp.zeros((4, 3)))  # dy too
  for t in (y, dx, dw):
    assert np.all(np.asarray(t) == 0)
  # Zero weights with non-zero x and dy: the zero operand must not poison the other's scale.
  y, dx, dw = _value_and_vjp(f, jnp.ones((4, 8)), jnp.zeros((8, 3)), jnp.ones((4, 3)))
  assert np.all(np.asarray(y) == 0) and np.all(np.asarray(dx) == 0)
  np.testing.assert_allclose(dw, 4.0, rtol=1e-6)


@pytest.mark.parametrize("eq", ["TD,DE", "TD,DE,EF->TF", "TT,TE->TE", "TD,DE->E", "TD,DE->TEE", "T...,DE->TE"])
def test_unsupported_equations_raise(eq):
  with pytest.raises(ValueError):
    fp8_einsum(eq, jnp.ones((4, 8)), jnp.ones((8, 3)))


def _operand_types(hlo: str, op: str) -> set[str]:
  """Element types of the operands of every `op` in optimized HLO text (names are module-unique)."""
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  calls = re.findall(rf" {re.escape(op)}\(([^)]*)\)", hlo)
  return {types.get(name) for args in calls for name in re.findall(r"%([\w.\-]+)", args)}


def test_hlo_has_f8_dots_under_scan():
  """The quantized dots reach XLA as f8 dots, also inside lax.scan (how the layers are stacked)."""
  x, w = data((16, 32), (3, 32, 32))

  def loss(x, w_LDE):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(fp8_einsum("TD,DE->TE", h, w)), None), x, w_LDE)
    return jnp.sum(h**2)

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w)
  # StableHLO (backend-independent): the forward dot is e4m3 x e4m3, the backward ones mix in e5m2.
  tensor = r"tensor<[\dx]+x(\w+)>"
  dots = re.findall(rf"stablehlo\.dot_general .*: \({tensor}, {tensor}\) -> {tensor}", lowered.as_text())
  # y = x·w, dx = dy·wᵀ, dw = xᵀ·dy; every dot has f8 operands and an f32 accumulator.
  assert set(dots) == {("f8E4M3FN", "f8E4M3FN", "f32"), ("f8E5M2", "f8E4M3FN", "f32"), ("f8E4M3FN", "f8E5M2", "f32")}, (
    dots
  )

  compiled = lowered.compile().as_text()
  if jax.default_backend() == "cpu":
    # XLA:CPU has no fp8 GEMM: each f8 operand is converted to f32 right in front of an f32 dot
    # (in a `__ynn_fusion`). The quantization itself survives: XLA does not fold
    # convert(convert(x, f8), f32) away, so the numbers are those of an f8 matmul.
    assert _operand_types(compiled, "dot") == {"f32"}
    assert {"f8e4m3fn", "f8e5m2"} <= _operand_types(compiled, "convert")
  else:
    # GPU/TPU: f8 operands feed a dot or an fp8 GEMM custom call (cuBLASLt f8 on Hopper).
    assert {"f8e4m3fn", "f8e5m2"} & (_operand_types(compiled, "dot") | _operand_types(compiled, "custom-call"))


GS = np.array([5, 0, 7, 4], np.int32)  # includes an empty expert
GMM_FNS = {
  # f8 operands straight into ragged_dot: it must accumulate wide.
  "ragged_f8": (partial(jax.lax.ragged_dot, preferred_element_type=jnp.float32), None),
  # The CPU blocked gmm returns its operands' dtype, so the f8 values travel as bf16.
  "blocked_bf16": (partial(grouped_matmul, impl="blocked", block=8), jnp.bfloat16),
}


@pytest.mark.parametrize("name", GMM_FNS)
def test_grouped_matmul_values_and_grads(name):
  gmm_fn, carrier = GMM_FNS[name]
  x, w = data((16, 32), (4, 32, 24))
  gs = jnp.asarray(GS)
  dense = lambda x, w: grouped_matmul(x, w, gs, impl="dense")
  (dy,) = data((16, 24), seed=1)
  y, dx, dw = _value_and_vjp(lambda x, w: fp8_grouped_matmul(x, w, gs, gmm_fn, carrier), x, w, dy)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32

  xq, wq = qdq(x, ml_dtypes.float8_e4m3fn), qdq(w, ml_dtypes.float8_e4m3fn)
  dyq = qdq(dy, ml_dtypes.float8_e5m2)
  y_emu, dx_emu, dw_emu = _value_and_vjp(dense, xq, wq, dyq)
  tol = 1e-3 if carrier is None else 5e-3  # bf16 outputs of the blocked gmm round to 8 bits
  assert rel(y, y_emu) < tol and rel(dx, dx_emu) < tol and rel(dw, dw_emu) < tol
  assert not np.any(np.asarray(dw[1])), "the empty expert gets no gradient"

  y32, dx32, dw32 = _value_and_vjp(dense, x, w, dy)
  assert 0.01 < rel(y, y32) < 0.05
  assert 0.02 < rel(dx, dx32) < 0.08 and 0.02 < rel(dw, dw32) < 0.08


@pytest.mark.parametrize("op", ["einsum", "grouped"])
@pytest.mark.parametrize("check_vma", [True, False])
def test_shard_map_per_shard_scales(op, check_vma):
  """Stateless scaling runs inside shard_map: each shard scales its own block of T-sharded x, so
  the replicated w's cotangent must be summed over shards *after* each shard applied its scales
  (with check_vma by the bwd rules and gmm_fn's vjp, without it by shard_map)."""
  mesh = jax.make_mesh((len(jax.devices()),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec
  gs = jnp.asarray(GS)
  ragged = partial(jax.lax.ragged_dot, preferred_element_type=jnp.float32)
  if op == "einsum":
    (x, w), fp8, f32 = data((64, 32), (32, 16)), partial(fp8_einsum, "TD,DE->TE"), jnp.matmul
  else:  # every shard's 16 rows are grouped by GS
    (x, w) = data((8 * 16, 32), (4, 32, 24))
    fp8 = lambda x, w: fp8_grouped_matmul(x, w, gs, ragged)
    f32 = lambda x, w: grouped_matmul(x, w, gs, impl="dense")

  def loss(matmul, x, w):
    return jax.lax.psum(jnp.sum(matmul(x, w) ** 2), "d")

  def grads(matmul):
    f = jax.shard_map(partial(loss, matmul), mesh=mesh, in_specs=(P("d"), P()), out_specs=P(), check_vma=check_vma)
    return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)

  (dx, dw), (dx32, dw32) = grads(fp8), grads(f32)
  assert 0.01 < rel(dx, dx32) < 0.1 and 0.01 < rel(dw, dw32) < 0.1


def test_grouped_matmul_rejects_f8_outputs():
  x, w = data((16, 32), (4, 32, 24))
  with pytest.raises(ValueError, match="gmm_fn returned"):
    fp8_grouped_matmul(x, w, jnp.asarray(GS), jax.lax.ragged_dot)  # would return e4m3 products
