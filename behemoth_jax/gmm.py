"""Grouped matmul for sparse MoE: rows sorted by expert, `out[r] = x[r] @ w[expert(r)]`.

Implementations (SPEC §2.6):
- `ragged`: `jax.lax.ragged_dot`, native on TPU (and the GPU lowering of XLA).
- `blocked`: on CPU `ragged_dot` lowers to one masked dense matmul per expert (measured with jax 0.10.2:
  16 experts cost 16× the useful FLOPs), so this path pads each expert's rows to a multiple of a block
  size `b` and scans over blocks, each multiplied by its own expert's weight (megablox's idea in plain
  XLA). Blocks past the last used one are skipped at run time with `lax.cond`. The backward pass is
  two more blocked loops (dx = dy·wᵀ per block, dw[e] += xᵀ·dy per block): no E×-dense work and no
  scatter-add over tokens.
- `dense`: every expert on every row, then select; a test oracle only (E× the FLOPs).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

IMPLS = ("ragged", "blocked", "dense")


def resolve_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return "blocked" if jax.default_backend() == "cpu" else "ragged"


def default_block_size(rows: int, experts: int) -> int:
  """Power of two near rows/(4·E), in [8, 256]: padding costs at most E·(b-1) rows."""
  target = max(rows // (4 * experts), 1)
  return int(min(256, max(8, 1 << (target.bit_length() - 1))))


def grouped_matmul(x_MK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array, *, impl: str,
                   block: int = 0) -> jax.Array:
  """Rows of `x_MK` are sorted by expert; `group_sizes_E` (int32, sums to M) counts rows per expert."""
  impl = resolve_impl(impl)
  if impl == "ragged":
    return jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E.astype(jnp.int32))
  if impl == "dense":
    expert_M = row_experts(group_sizes_E, x_MK.shape[0])
    every_EMN = jnp.einsum("MK,EKN->EMN", x_MK, w_EKN)
    return jnp.take_along_axis(every_EMN, expert_M[None, :, None], axis=0)[0]
  if impl == "blocked":
    b = block or default_block_size(x_MK.shape[0], w_EKN.shape[0])
    return _blocked_gmm(x_MK, w_EKN, group_sizes_E.astype(jnp.int32), b)
  raise ValueError(f"moe_impl: unknown grouped matmul {impl!r} (valid: {IMPLS})")


def row_experts(group_sizes_E: jax.Array, m: int) -> jax.Array:
  ends = jnp.cumsum(group_sizes_E)
  return jnp.minimum(jnp.searchsorted(ends, jnp.arange(m), side="right"), group_sizes_E.shape[0] - 1)


def _layout(group_sizes_E: jax.Array, m: int, b: int):
  """Padded layout: row r → padded row dest[r]; block j → its expert and whether it is used."""
  e = group_sizes_E.shape[0]
  nb = (m + e * (b - 1)) // b  # static bound on Σ ceil(n_e / b)
  starts = jnp.cumsum(group_sizes_E) - group_sizes_E
  padded = (group_sizes_E + b - 1) // b * b
  pad_ends = jnp.cumsum(padded)
  expert_M = row_experts(group_sizes_E, m)
  dest_M = (pad_ends - padded)[expert_M] + jnp.arange(m) - starts[expert_M]
  block_starts = jnp.arange(nb) * b
  block_expert = jnp.minimum(jnp.searchsorted(pad_ends, block_starts, side="right"), e - 1)
  block_used = block_starts < pad_ends[-1]
  return nb, dest_M, block_expert, block_used


def _to_blocks(x_MK: jax.Array, dest_M: jax.Array, nb: int, b: int) -> jax.Array:
  z = jnp.zeros((nb * b, x_MK.shape[1]), x_MK.dtype)
  return z.at[dest_M].set(x_MK, unique_indices=True).reshape(nb, b, x_MK.shape[1])


def _block_products(x_nbK, w_EKN, block_expert, block_used, transpose_w: bool):
  n_out = w_EKN.shape[1] if transpose_w else w_EKN.shape[2]
  eq = "bN,KN->bK" if transpose_w else "bK,KN->bN"

  def body(_, inp):
    xb, e, used = inp
    yb = jax.lax.cond(used, lambda: jnp.einsum(eq, xb, w_EKN[e]).astype(xb.dtype),
                      lambda: jnp.zeros((xb.shape[0], n_out), xb.dtype))
    return None, yb

  return jax.lax.scan(body, None, (x_nbK, block_expert, block_used))[1]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_gmm(x_MK, w_EKN, group_sizes_E, b):
  return _blocked_fwd(x_MK, w_EKN, group_sizes_E, b)[0]


def _blocked_fwd(x_MK, w_EKN, group_sizes_E, b):
  m = x_MK.shape[0]
  nb, dest, be, used = _layout(group_sizes_E, m, b)
  y = _block_products(_to_blocks(x_MK, dest, nb, b), w_EKN, be, used, transpose_w=False)
  return y.reshape(nb * b, -1)[dest], (x_MK, w_EKN, group_sizes_E)


def _blocked_bwd(b, res, dy_MN):
  x_MK, w_EKN, group_sizes_E = res
  m = x_MK.shape[0]
  nb, dest, be, used = _layout(group_sizes_E, m, b)
  dy_blocks = _to_blocks(dy_MN, dest, nb, b)
  dx = _block_products(dy_blocks, w_EKN, be, used, transpose_w=True).reshape(nb * b, -1)[dest]
  x_blocks = _to_blocks(x_MK, dest, nb, b)

  def body(dw, inp):
    xb, dyb, e, u = inp
    upd = jax.lax.cond(u, lambda: jnp.einsum("bK,bN->KN", xb, dyb, preferred_element_type=jnp.float32),
                       lambda: jnp.zeros(dw.shape[1:], jnp.float32))
    return dw.at[e].add(upd), None

  dw = jax.lax.scan(body, jnp.zeros(w_EKN.shape, jnp.float32), (x_blocks, dy_blocks, be, used))[0]
  return dx, dw.astype(w_EKN.dtype), None


_blocked_gmm.defvjp(_blocked_fwd, _blocked_bwd)
