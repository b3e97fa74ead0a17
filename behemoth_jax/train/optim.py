"""Adam with its two moments stored in 8 bits (`train.adam_moments: fp8`): a smaller training state.

Each moment is float8 e4m3 with one float32 scale per row (per slice along the last dimension, so the
scales shard like their parameter with that dimension whole, and the quantized moment has exactly its
parameter's shape and sharding): 1 byte per parameter instead of the parameter dtype's 2 or 4.
The second moment is stored as its square root (the RMS of the gradient): e4m3 spans 2^-9 .. 448 of a
row's scale, so the RMS keeps 2^18 of range within a row, where storing v would leave it 2^9. An RMS
below the row's smallest subnormal reads as half of it, never 0: a first moment that survived
quantization over a vanished RMS would otherwise divide by eps (the bound this gives: |update| <~ 1,
because |m| <~ RMS for Adam's betas).

The arithmetic is Adam's in float32 (bias-corrected, eps outside the square root, as optax's
`scale_by_adam`); only the stored state is rounded. torchao's AdamWFp8 stores both moments in e4m3
with block-wise scales; blocks along the last dimension alone keep our moments sharded exactly like the
parameters on any mesh (a block that straddled a shard boundary would need collectives every step).
optax has no 8-bit optimizer state, hence this module.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

F8 = jnp.float8_e4m3fn
F8_MAX = 448.0
F8_TINY = 2.0**-9  # e4m3's smallest subnormal


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QMoment:
  """One moment of one parameter: `q` (float8, the parameter's shape) × `scale` (float32, one per row:
  the parameter's shape with the last dimension 1)."""

  q: jax.Array
  scale: jax.Array

  def value(self) -> jax.Array:
    return self.q.astype(jnp.float32) * self.scale

  def shardings(self, param: NamedSharding) -> QMoment:
    """The shardings of this moment for a parameter sharded as `param`."""
    spec = tuple(param.spec) + (None,) * (len(self.q.shape) - len(param.spec))
    row = PartitionSpec(*spec[:-1], None) if spec else PartitionSpec()
    return QMoment(param, NamedSharding(param.mesh, row))


def quantize(x: jax.Array) -> QMoment:
  """float32 → e4m3 with one scale per row (the row's max |x| maps to 448; an all-zero row scale 0),
  rounded to nearest (stochastic rounding was tried: its noise cost more loss than the bias it removes,
  benchmarks/adam_moments.py, 2026-12-04)."""
  x = x.astype(jnp.float32)
  axes = (x.ndim - 1,) if x.ndim else ()
  scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True) / F8_MAX
  return QMoment((x / jnp.where(scale > 0, scale, 1.0)).astype(F8), scale)


class ScaleByAdamFp8State(NamedTuple):
  count: jax.Array
  mu: optax.Updates  # QMoment per parameter: the first moment
  nu: optax.Updates  # QMoment per parameter: sqrt of the second moment


def _is_moment(x) -> bool:
  return isinstance(x, QMoment)


def scale_by_adam_fp8(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
  """optax's `scale_by_adam`, its moments stored as `QMoment`s (module doc)."""

  def init_fn(params):
    def zeros(p):
      if not hasattr(p, "shape"):  # optax.tree_map_params' placeholder: mirror it (optimizer_shardings)
        return p
      return QMoment(jnp.zeros(p.shape, F8), jnp.zeros((*p.shape[:-1], 1) if p.ndim else (), jnp.float32))

    return ScaleByAdamFp8State(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    mus, treedef = jax.tree.flatten(state.mu, is_leaf=_is_moment)
    nus, gs = treedef.flatten_up_to(state.nu), treedef.flatten_up_to(updates)
    out_u, out_mu, out_nu = [], [], []
    for mu, nu, g in zip(mus, nus, gs, strict=True):
      g32 = g.astype(jnp.float32)
      m = b1 * mu.value() + (1 - b1) * g32
      rms = jnp.maximum(nu.value(), nu.scale * (F8_TINY / 2))
      v = b2 * rms * rms + (1 - b2) * g32 * g32
      out_u.append(((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype))
      out_mu.append(quantize(m))
      out_nu.append(quantize(jnp.sqrt(v)))
    new = ScaleByAdamFp8State(count, treedef.unflatten(out_mu), treedef.unflatten(out_nu))
    return treedef.unflatten(out_u), new

  return optax.GradientTransformation(init_fn, update_fn)


class PreviousNormState(NamedTuple):
  norm: jax.Array  # float32: the whole gradient's global norm at the previous step (0 before the first)


def clip_by_previous_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` with the norm of the previous step's gradient: for the layer-by-layer
  update (train/layerwise.py), which updates the first layers before the last gradient exists. The
  state only holds the norm; the step that knows the whole norm sets it (`set_previous_norm`)."""

  def init_fn(params):
    del params
    return PreviousNormState(jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    scale = jnp.where(state.norm > max_norm, max_norm / jnp.maximum(state.norm, 1e-30), 1.0)
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def previous_norm(opt_state) -> jax.Array | None:
  """The norm a `clip_by_previous_norm` state holds (None without one: no clipping)."""
  found = [x.norm for x in jax.tree.leaves(opt_state, is_leaf=_is_prev) if _is_prev(x)]
  return found[0] if found else None


def _is_prev(x) -> bool:
  return isinstance(x, PreviousNormState)


def set_previous_norm(opt_state, norm: jax.Array):
  """The optimizer state with every `PreviousNormState` holding `norm`."""
  return jax.tree.map(lambda x: PreviousNormState(norm) if _is_prev(x) else x, opt_state, is_leaf=_is_prev)


def moment_shardings(tx: optax.GradientTransformation, abstract_opt_state, shardings_p, replicated):
  """Shardings of an optimizer state: every leaf that mirrors a parameter takes its sharding (a
  `QMoment` takes it for its float8 values and, with the last dimension whole, for its row scales);
  the rest is replicated."""

  def f(leaf, s):
    return leaf.shardings(s) if _is_moment(leaf) else s

  return optax.tree_map_params(
    tx, f, abstract_opt_state, shardings_p, transform_non_params=lambda _: replicated, is_leaf=_is_moment
  )
