"""RMSNorm, SwiGLU and embeddings; the parameter helper that attaches logical axis names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from behemoth_jax.model.fp8 import fp8_einsum
from sharding import axes as ax


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


# What a parameter is (its `kind` metadata), so behaviour such as weight decay is decided from it,
# never from a substring of its name.
WEIGHT = "weight"  # a matrix (or stacked/head-split tensor) that multiplies activations
EMBEDDING = "embedding"  # a looked-up or added table or vector: token, position, class embeddings
SCALE = "scale"  # a norm's per-channel scale
BIAS = "bias"  # an added per-channel offset
KINDS = (WEIGHT, EMBEDDING, SCALE, BIAS)


def param(
  rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: ax.Axes, dtype: str, std: float | None, kind: str = WEIGHT
) -> nnx.Param:
  """A parameter with logical axis names and its kind; `std=None` means ones (scales), `std=0`
  zeros (biases; no random key is drawn).

  `eager_sharding=False`: the model is mesh-agnostic single-device code; `sharding/` turns the
  names into placements (abstract init + jit with out_shardings).
  """
  assert len(shape) == len(axes), (shape, axes)
  assert kind in KINDS, kind
  if std is None:
    value = jnp.ones(shape, dtype_of(dtype))
  elif std == 0:
    value = jnp.zeros(shape, dtype_of(dtype))
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype_of(dtype))
  return nnx.Param(value, out_sharding=axes, eager_sharding=False, kind=kind)


REMAT_POLICIES = {
  "full": None,  # save nothing but the block inputs
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(fn, policy: str):
  return fn if policy == "none" else jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


def stack_modules(factory, n: int, key: jax.Array) -> nnx.Module:
  """n independently initialised `factory(rngs)` modules, parameters stacked on a leading `layers` axis
  (the carry of a `jax.lax.scan` over layers)."""
  graphdefs = []

  def make(k):
    graphdef, state = nnx.split(factory(nnx.Rngs(params=k)))
    graphdefs.append(graphdef)  # traced once; the structure is the same for every copy
    return state

  states = jax.vmap(make)(jax.random.split(key, n))
  module = nnx.merge(graphdefs[0], states)
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Variable):
      var.set_metadata("out_sharding", (ax.LAYERS, *var.get_metadata("out_sharding")))
  return module


# Weight-only quantization (a frozen teacher, generation): `model.weight_quant`.
_QMAX = {"fp8": 448.0, "int8": 127.0}  # the largest float8_e4m3fn and the symmetric int8 range
_QDTYPE = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}


def contracted_axes(axes: ax.Axes) -> tuple[int, ...]:
  """Positions of the axes a weight contracts with the activations (its input channels), from its
  logical names: after any stacked (`layers`) and `experts` axes, an input projection ([E,] D, …:
  q/k/v, gate, up) contracts `embed`; an output projection (N, H, D or [E,] F, D: o, down) every axis
  but its last."""
  start = 0
  while start < len(axes) and axes[start] in (ax.LAYERS, ax.EXPERTS):
    start += 1
  if axes[start] == ax.EMBED:
    return (start,)
  return tuple(range(start, len(axes) - 1))


def quantize_weight(w: jax.Array, axes: ax.Axes, quant: str) -> tuple[jax.Array, jax.Array]:
  """`w ≈ q * scale`, `scale` (float32) per output channel: the absolute maximum over the contracted
  axes (kept as size 1) maps to the format's largest value; fp8 rounds to float8_e4m3fn, int8 to the
  nearest integer in [-127, 127]. An all-zero channel gets scale 1 (zeros are exact)."""
  w32 = w.astype(jnp.float32)
  qmax = _QMAX[quant]
  amax = jnp.max(jnp.abs(w32), axis=contracted_axes(axes), keepdims=True)
  scale = jnp.where(amax > 0, amax / qmax, jnp.float32(1.0))
  x = jnp.clip(w32 / scale, -qmax, qmax)
  q = x.astype(_QDTYPE[quant]) if quant == "fp8" else jnp.round(x).astype(jnp.int8)
  return q, scale


class QuantizedWeight(nnx.Module):
  """A weight stored as `q` (float8_e4m3fn or int8, the weight's shape and logical axes) and `scale`
  (float32 per output channel, size 1 on the contracted axes): 1 byte per element, not 2 or 4, in
  device memory (it is made from a float checkpoint: `train.state.restore_model_params`). `w[...]` is
  the dequantized weight in the compute dtype, formed where it is used: one layer at a time inside the
  scan (whether XLA also fuses it into the matmul's operand is its choice; not checked here)."""

  def __init__(self, rngs, shape: tuple[int, ...], axes: ax.Axes, std: float, quant: str, dtype: str):
    assert quant in _QDTYPE, quant
    self.dtype = dtype
    q, scale = quantize_weight(std * jax.random.normal(rngs.params(), shape, jnp.float32), axes, quant)
    keep = set(range(len(axes))) - set(contracted_axes(axes))
    self.q = nnx.Param(q, out_sharding=axes, eager_sharding=False, kind=WEIGHT)
    scale_axes = tuple(a if i in keep else None for i, a in enumerate(axes))
    self.scale = nnx.Param(scale, out_sharding=scale_axes, eager_sharding=False, kind=SCALE)

  def __getitem__(self, key):
    assert key is Ellipsis, key
    return (self.q[...].astype(jnp.float32) * self.scale[...]).astype(self.dtype)


def weight(
  rngs: nnx.Rngs, shape: tuple[int, ...], axes: ax.Axes, param_dtype: str, std: float, quant: str = "none", dtype=None
):
  """A projection or expert weight: `param(...)`, or with `quant` (fp8 | int8) a `QuantizedWeight`
  dequantized to `dtype` at use. Both read as `w[...]`."""
  if quant == "none":
    return param(rngs, shape, axes, param_dtype, std)
  return QuantizedWeight(rngs, shape, axes, std, quant, dtype)


def matmul(eq: str, x: jax.Array, w: jax.Array, fp8: bool) -> jax.Array:
  """A weight matmul in x's dtype, or in fp8 (e4m3 forward, e5m2 gradients) when the policy says so."""
  if fp8:
    return fp8_einsum(eq, x, w.astype(x.dtype))
  return jnp.einsum(eq, x, w.astype(x.dtype))


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
  """`x * rsqrt(mean(x², -1) + eps)` in float32, cast back to x's dtype (docs/ARCHITECTURE.md §2.1)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype: str, rngs: nnx.Rngs):
    self.eps = eps
    self.weight_D = param(rngs, (dim,), (ax.EMBED,), param_dtype, None, SCALE)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    w_D = self.weight_D[...].astype(x_BTD.dtype)
    return rms_norm(x_BTD, self.eps) * w_D.reshape((1,) * (x_BTD.ndim - 1) + w_D.shape)


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, param_dtype: str, std: float, rngs: nnx.Rngs):
    self.table_VD = param(rngs, (vocab, dim), (ax.VOCAB, ax.EMBED), param_dtype, std, EMBEDDING)

  def __call__(self, ids_BT: jax.Array, dtype: jnp.dtype) -> jax.Array:
    table_VD = self.table_VD[...]
    v, d = table_VD.shape
    s = ax.shards(ax.VOCAB, v)
    if s == 1:
      return jnp.take(table_VD, ids_BT, axis=0).astype(dtype)
    # Vocabulary split over s devices (Megatron's parallel embedding): each looks its ids up in its own
    # rows, zero where an id is another shard's, and the s partial rows are summed (one all-reduce of
    # the embeddings over the vocabulary shards). The table's placement is left to XLA: constraining it
    # to [S, V/S, D whole] cost 0.25 GiB more peak on Behemoth (v5p-512, f8 e4 c2 t4) for equal traffic.
    table_SVD = table_VD.reshape(s, v // s, d)
    shard_BT, local_BT = jnp.divmod(ids_BT, v // s)
    x_SBTD = jax.vmap(lambda t_VD, k: jnp.where((shard_BT == k)[..., None], jnp.take(t_VD, local_BT, axis=0), 0))(
      table_SVD, jnp.arange(s)
    )
    x_SBTD = ax.constrain(x_SBTD.astype(dtype), (ax.VOCAB, ax.BATCH, ax.LENGTH, None))
    return x_SBTD.sum(axis=0)


class SwiGLU(nnx.Module):
  """`(silu(x @ Wg) * (x @ Wu)) @ Wd`: dense layers and the shared expert."""

  def __init__(
    self,
    dim: int,
    width: int,
    param_dtype: str,
    std: float,
    rngs: nnx.Rngs,
    fp8: bool = False,
    quant: str = "none",
    dtype: str | None = None,
  ):
    self.fp8 = fp8
    q = dict(quant=quant, dtype=dtype)
    self.w_gate_DF = weight(rngs, (dim, width), (ax.EMBED, ax.MLP), param_dtype, std, **q)
    self.w_up_DF = weight(rngs, (dim, width), (ax.EMBED, ax.MLP), param_dtype, std, **q)
    self.w_down_FD = weight(rngs, (width, dim), (ax.MLP, ax.EMBED), param_dtype, std, **q)

  def __call__(self, x_TD: jax.Array) -> jax.Array:
    gate = matmul("...D,DF->...F", x_TD, self.w_gate_DF[...], self.fp8)
    up = matmul("...D,DF->...F", x_TD, self.w_up_DF[...], self.fp8)
    return matmul("...F,FD->...D", jax.nn.silu(gate) * up, self.w_down_FD[...], self.fp8)
