"""FP8 matmuls for training: e4m3 forward operands, e5m2 gradients, per-tensor *current* scaling.

Llama 4 Behemoth was pre-trained in FP8. `fp8_einsum` and `fp8_grouped_matmul` are drop-in,
differentiable replacements for the model's weight einsums and the MoE grouped matmul:
- forward: x and w are quantized to float8_e4m3fn (3 mantissa bits, range ±448), each with its own
  per-tensor scale `amax(|t|) / 448` computed in f32 from the tensor itself; the dot takes the f8
  operands with an f32 accumulator (`preferred_element_type`) and the product is rescaled by sx·sw;
- backward: the incoming gradient is quantized to float8_e5m2 (2 mantissa bits, range ±57344:
  gradients need range more than precision) with its own scale, and dx, dw are dots of f8 operands
  (e5m2 × e4m3 is a valid XLA dot). The gradient is the straight-through one: that of the exact
  einsum, evaluated on quantized tensors. Residuals are the f8 tensors, so they cost 1 byte/element.

Why this design (checked with jax 0.10.2, flax 0.12.8, qwix 0.1.8):
- google/qwix does have fp8 quantized training (`QtProvider`/`QtRule` with e4m3 forward, e5m2
  `bwd_qtype`, dynamic absmax scales, `ragged_dot_qt`). But its public entry point is
  `quantize_model`, which clones the NNX model, swaps its class for one whose `__call__` intercepts
  `jnp.einsum`/`lax.dot_general`/`ragged_dot` and picks a config by module-path regex; the plain
  functions (`dot_general_qt`, `ragged_dot_qt`) live in the private `qwix._src`. It would also not
  reach our CPU "blocked" grouped matmul (per-expert tile loops inside a custom_vjp), and it adds
  two dependencies (qwix, opt_einsum) for what is ~150 lines here.
- flax 0.12.8 has fp8 only in `flax.linen.fp8_ops` (`Fp8DotGeneralOp`, `Fp8Einsum`); there is no
  NNX equivalent. It uses *delayed* scaling: amax histories and scales are parameters of a special
  dtype whose "gradient" is the updated history (OVERWRITE_WITH_GRADIENT), so the optimizer must
  special-case them and every scanned layer must thread that state through `lax.scan`.
- Current scaling is stateless: one extra reduction (amax) per operand, no variables, no optimizer
  changes, so it composes with our pure train step, scanned layers, shard_map (each shard scales its
  own block and sums dequantized partial products; the bwd rules psum the cotangent of a replicated
  operand, so check_vma=True works too) and ragged_dot.

What XLA does with the f8 dots (jax 0.10.2): StableHLO always carries them, e.g.
`stablehlo.dot_general ... : (tensor<8x32xf8E4M3FN>, tensor<32x16xf8E4M3FN>) -> tensor<8x16xf32>`.
XLA:CPU has no fp8 GEMM: its optimized HLO converts each f8 operand to f32 (`f32[..] convert(%p)`
with `%p = f8e4m3fn[..]`) in front of an f32 `dot` (inside a `__ynn_fusion`), so on CPU fp8 is
an exact emulation of the f8 numerics and not faster. On fp8-capable hardware the same f8 dots are
meant to run natively (XLA:GPU rewrites f8 dots to cuBLASLt f8 GEMMs on Hopper); not verified here.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

E4M3 = jnp.float8_e4m3fn  # forward operands (activations and weights)
E5M2 = jnp.float8_e5m2  # gradients

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def quantize(t: jax.Array, dtype: DTypeLike) -> tuple[jax.Array, jax.Array]:
  """Per-tensor current scaling: `t ≈ q * scale` with `q` in `dtype`, `scale` an f32 scalar."""
  fmax = float(jnp.finfo(dtype).max)
  t32 = t.astype(jnp.float32)
  amax = jnp.max(jnp.abs(t32))
  # An all-zero tensor would give scale 0 and 0/0 = NaN; any scale quantizes zeros exactly.
  scale = jnp.where(amax > 0, amax / fmax, jnp.float32(1.0))
  # |t|/scale ≤ fmax up to one f32 rounding, which the f8 convert rounds back to fmax; the clip is
  # cheap insurance (fused) because e4m3fn has no inf and an out-of-range convert gives NaN.
  q = jnp.clip(t32 / scale, -fmax, fmax).astype(dtype)
  return q, scale


def _dot(eq: str, a: jax.Array, b: jax.Array, scale: jax.Array, dtype: DTypeLike) -> jax.Array:
  """f8 × f8 einsum accumulated in f32 (f8 outputs would overflow and lose all precision)."""
  return (jnp.einsum(eq, a, b, preferred_element_type=jnp.float32) * scale).astype(dtype)


def _tag(t: jax.Array) -> jax.Array:
  """Zero-size stand-in for a primal in the residuals: keeps its dtype and shard_map varying axes."""
  return t.reshape(-1)[:0]


def _sum_to_varying(ct: jax.Array, tag: jax.Array) -> jax.Array:
  """Under shard_map(check_vma=True) a cotangent must vary over exactly the mesh axes its primal
  does. A primal invariant over an axis (e.g. a replicated weight) was implicitly broadcast in the
  forward; the transpose of that broadcast is a psum, which JAX's own einsum vjp also inserts.
  Without shard_map, or with check_vma=False, both sets are empty and this is a no-op."""
  extra = jax.typeof(ct).manual_axis_type.varying - jax.typeof(tag).manual_axis_type.varying
  return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _resolve(eq: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> tuple[str, str, str]:
  """`eq` → explicit (x, w, out) subscripts, each `...` replaced by fresh letters.

  Supported: exactly two operands, an explicit `->` output, no letter repeated within one term
  (no diagonals), every letter of an operand also in the other operand or the output (an axis
  summed within one operand alone has no einsum transpose), `...` in the output iff in an operand,
  and equal sizes for a letter shared by both operands (no size-1 broadcasting).
  """
  eq = eq.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    raise ValueError(f"fp8_einsum: need 'x,w->out' with an explicit output, got {eq!r}")
  ins, out = eq.split("->")
  terms = ins.split(",")
  if ("..." in out) != ("..." in ins):
    raise ValueError(f"fp8_einsum: '...' must appear in the output iff in an input: {eq!r}")
  fresh = [c for c in string.ascii_letters if c not in eq]
  ell = [len(shape) - (len(t) - 3) if "..." in t else 0 for t, shape in zip(terms, (x_shape, w_shape))]
  if min(ell) < 0:
    raise ValueError(f"fp8_einsum: more subscripts than operand dimensions in {eq!r}")
  ell_n = max(ell)
  # Right-aligned like numpy: a shorter ellipsis takes the trailing ones of the fresh letters.
  terms = [t.replace("...", "".join(fresh[ell_n - n : ell_n])) for t, n in zip(terms, ell)]
  out = out.replace("...", "".join(fresh[:ell_n]))
  xs, ws = terms
  for term, shape in ((xs, x_shape), (ws, w_shape)):
    if len(term) != len(shape) or len(set(term)) != len(term) or not set(term).issubset(string.ascii_letters):
      raise ValueError(f"fp8_einsum: subscripts {term!r} do not fit an operand of shape {shape}")
  if len(set(out)) != len(out) or not set(out) <= set(xs) | set(ws):
    raise ValueError(f"fp8_einsum: bad output subscripts in {eq!r}")
  for mine, other in ((xs, ws), (ws, xs)):
    if not set(mine) <= set(other) | set(out):
      raise ValueError(f"fp8_einsum: an axis of {mine!r} is summed within that operand alone: {eq!r}")
  size = dict(zip(xs, x_shape))
  if any(size.get(c, n) != n for c, n in zip(ws, w_shape)):
    raise ValueError(f"fp8_einsum: mismatched sizes for {eq!r}: {x_shape} vs {w_shape}")
  return xs, ws, out


def fp8_einsum(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`jnp.einsum(eq, x, w)` computed with e4m3 operands (gradients e5m2); result in `x.dtype`."""
  xs, ws, out = _resolve(eq, x.shape, w.shape)
  return _fp8_einsum(f"{xs},{ws}->{out}", x, w)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_einsum(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
  return _fp8_einsum_fwd(eq, x, w)[0]


def _fp8_einsum_fwd(eq, x, w):
  (qx, sx), (qw, sw) = quantize(x, E4M3), quantize(w, E4M3)
  res = (qx, sx, qw, sw, _tag(x), _tag(w))
  return _dot(eq, qx, qw, sx * sw, x.dtype), res


def _fp8_einsum_bwd(eq, res, dy):
  qx, sx, qw, sw, x_tag, w_tag = res
  ins, out = eq.split("->")
  xs, ws = ins.split(",")
  qdy, sdy = quantize(dy, E5M2)
  # Every letter of x is in w or out (checked in _resolve), so both transposes are plain einsums.
  dx = _dot(f"{out},{ws}->{xs}", qdy, qw, sdy * sw, x_tag.dtype)
  dw = _dot(f"{xs},{out}->{ws}", qx, qdy, sx * sdy, w_tag.dtype)
  return _sum_to_varying(dx, x_tag), _sum_to_varying(dw, w_tag)


_fp8_einsum.defvjp(_fp8_einsum_fwd, _fp8_einsum_bwd)


def fp8_grouped_matmul(
  x_MK: jax.Array,
  w_EKN: jax.Array,
  group_sizes_E: jax.Array,
  gmm_fn: GroupedMatmul,
  carrier_dtype: DTypeLike | None = None,
) -> jax.Array:
  """Grouped `out[r] = x[r] @ w[expert(r)]` with e4m3 operands; result in `x_MK.dtype`.

  `gmm_fn(x, w, group_sizes)` computes the grouped product (rows of x sorted by expert). One scale
  per tensor: for w that is one scale for the whole expert stack.
  - `carrier_dtype=None`: gmm_fn receives the f8 arrays themselves, so it must accumulate into a
    wide type, e.g. `partial(jax.lax.ragged_dot, preferred_element_type=jnp.float32)`; this is the
    path that gives native f8 grouped matmuls on TPU/GPU.
  - `carrier_dtype=jnp.bfloat16` (or f32): the quantized values are handed over in that dtype,
    for implementations whose output dtype follows the operands, such as
    `behemoth_jax.model.gmm.grouped_matmul(..., impl="blocked")`. Exact: every e4m3/e5m2 value and every
    product of two of them is representable in bf16, so only the accumulation differs.
  Backward: dx = gmm_fn(q(dy) in e5m2, q(w)ᵀ), in f8 like the forward. dw[e] = x_eᵀ·dy_e: on the
  native path (carrier None) one `ragged_dot_general` contracting the ragged rows of q(x) (e4m3) and
  q(dy) (e5m2), f8 like the rest; with a carrier it is `jax.vjp` of gmm_fn w.r.t. w (the blocked loop
  on CPU) on the dequantized q(x), q(dy) in `x_MK.dtype`: the same quantized values, a wider matmul.
  """
  return _fp8_gmm(gmm_fn, carrier_dtype, x_MK, w_EKN, group_sizes_E)


def _carry(q: jax.Array, carrier_dtype: DTypeLike | None) -> jax.Array:
  return q if carrier_dtype is None else q.astype(carrier_dtype)


def _rescale(y: jax.Array, scale: jax.Array, dtype: DTypeLike) -> jax.Array:
  if jnp.dtype(y.dtype).itemsize == 1:
    # An f8-typed product has overflowed/rounded to 3 bits already; nothing downstream can fix it.
    raise ValueError(
      f"fp8_grouped_matmul: gmm_fn returned {y.dtype}; give it a wide "
      "preferred_element_type or pass carrier_dtype=jnp.bfloat16"
    )
  return (y.astype(jnp.float32) * scale).astype(dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fp8_gmm(gmm_fn, carrier_dtype, x_MK, w_EKN, group_sizes_E):
  return _fp8_gmm_fwd(gmm_fn, carrier_dtype, x_MK, w_EKN, group_sizes_E)[0]


def _fp8_gmm_fwd(gmm_fn, carrier_dtype, x_MK, w_EKN, group_sizes_E):
  (qx, sx), (qw, sw) = quantize(x_MK, E4M3), quantize(w_EKN, E4M3)
  y = gmm_fn(_carry(qx, carrier_dtype), _carry(qw, carrier_dtype), group_sizes_E)
  res = (qx, sx, qw, sw, group_sizes_E, _tag(x_MK), _tag(w_EKN))
  return _rescale(y, sx * sw, x_MK.dtype), res


def _fp8_gmm_bwd(gmm_fn, carrier_dtype, res, dy_MN):
  qx, sx, qw, sw, group_sizes_E, x_tag, w_tag = res
  qdy, sdy = quantize(dy_MN, E5M2)
  qw_ENK = jnp.swapaxes(qw, 1, 2)
  dx = _rescale(gmm_fn(_carry(qdy, carrier_dtype), _carry(qw_ENK, carrier_dtype), group_sizes_E), sdy * sw, x_tag.dtype)
  if carrier_dtype is None:  # native f8 (ragged_dot): dw[e] = x_eᵀ·dy_e is one f8 ragged contraction too
    dw = (_tgmm(qx, qdy, group_sizes_E) * (sx * sdy)).astype(w_tag.dtype)
    return _sum_to_varying(dx, x_tag), _sum_to_varying(dw, w_tag), None
  # dw: gmm_fn's own vjp on the dequantized x and dy (the quantized values, rounded to x's dtype). The
  # scales go in *before* the vjp: under shard_map each shard has its own scales, and the vjp sums
  # over shards itself when w is replicated. The primal output is dead code after jit.
  wide = x_tag.dtype
  x_dq = (qx.astype(jnp.float32) * sx).astype(wide)
  y, gmm_vjp = jax.vjp(lambda w: gmm_fn(x_dq, w, group_sizes_E), qw.astype(wide))
  (dw,) = gmm_vjp((qdy.astype(jnp.float32) * sdy).astype(y.dtype))
  dw = dw.astype(w_tag.dtype)
  return _sum_to_varying(dx, x_tag), _sum_to_varying(dw, w_tag), None


_fp8_gmm.defvjp(_fp8_gmm_fwd, _fp8_gmm_bwd)

# x [M, K] and dy [M, N] contracted over their rows, which are ragged by group: out [E, K, N].
_TGMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
  dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
)


def _tgmm(x_MK: jax.Array, dy_MN: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  """Per-group xᵀ·dy (the weight gradient of a grouped matmul), f32-accumulated from f8 operands."""
  return jax.lax.ragged_dot_general(
    x_MK, dy_MN, group_sizes_E.astype(jnp.int32), _TGMM_DIMS, preferred_element_type=jnp.float32
  )
