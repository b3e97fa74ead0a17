"""Grouped matmul for sparse MoE: rows sorted by expert, `out[r] = x[r] @ w[expert(r)]`.

Implementations (SPEC §2.6):
- `ragged`: `jax.lax.ragged_dot`, native on TPU (and the GPU lowering of XLA).
- `blocked`: on CPU `ragged_dot` lowers to one masked dense matmul per expert (measured with jax 0.10.2:
  16 experts cost 16× the useful FLOPs), so this path scans over the experts, reads each expert's
  weight once and multiplies its own rows in tiles of 4·b rows, then of b rows (`while` loops with
  data-dependent trip counts). The backward pass runs the same loops (dx = dy·wᵀ per tile; dw[e] = Σ
  xᵀ·dy over the expert's tiles, accumulated in the loop): no E×-dense work and no scatter-add over
  tokens. Compiled FLOPs of these loops are counted at run time (`behemoth_jax.flops.executed_flops`).
  Replaced (2026-12-02): a scan over a static number of b-row blocks of the padded layout, each block
  copying its expert's weight slice before its matmul: 1.2-1.25× slower forward and backward on
  bench-moe's shapes (docs/PERFORMANCE.md), though its FLOPs could be counted statically.
  With fewer rows than experts (decoding), each row instead multiplies a gathered copy of its own
  expert's weight.
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
    m, e = x_MK.shape[0], w_EKN.shape[0]
    if m < e:  # decoding: fewer rows than experts. Gather each row's expert weight (m reads) rather
      # than loop over all e experts, each loop reading its weight even for no rows.
      expert_M = row_experts(group_sizes_E, m)
      y = jnp.einsum("MK,MKN->MN", x_MK, w_EKN[expert_M])
      return jnp.where((jnp.arange(m) < group_sizes_E.sum())[:, None], y, 0).astype(x_MK.dtype)
    b = block or default_block_size(m, e)
    return _blocked_gmm(x_MK, w_EKN, group_sizes_E.astype(jnp.int32), b)
  raise ValueError(f"moe_impl: unknown grouped matmul {impl!r} (valid: {IMPLS})")


def row_experts(group_sizes_E: jax.Array, m: int) -> jax.Array:
  ends = jnp.cumsum(group_sizes_E)
  return jnp.minimum(jnp.searchsorted(ends, jnp.arange(m), side="right"), group_sizes_E.shape[0] - 1)


def _tile_starts(group_sizes_E: jax.Array):
  return jnp.cumsum(group_sizes_E) - group_sizes_E


def _over_tiles(start, n, b: int, fn, carry):
  """`carry = fn(row0, rows, carry)` over one expert's rows [start, start + n): tiles of 4·b rows while
  that many remain, then tiles of b rows; the last may run up to b-1 rows past the group (callers pad
  their inputs by 4·b rows and overwrite those rows later or mask them). Trip counts are data-dependent
  (`while` loops): an expert costs its own rows rounded up to b, and one read of its weight.
  Measured alternatives (benchmarks/gmm.py shapes): one tile of 4·b, 2·b or b rows for the rest instead
  of several b-row tiles was slower (more `while` loops per expert cost more than they save)."""
  big = 4 * b
  full = n // big
  carry = jax.lax.fori_loop(0, full, lambda i, c: fn(start + i * big, big, c), carry)
  rest0, rest = start + full * big, n - full * big
  return jax.lax.fori_loop(0, (rest + b - 1) // b, lambda i, c: fn(rest0 + i * b, b, c), carry)


def _expert_products(x_MK, w_EKN, group_sizes_E, b: int, transpose_w: bool):
  """`out[r] = x[r] @ w[e(r)]` (or `@ w[e(r)].T`): experts in order, each over its own rows in tiles.

  A tile that runs past its group writes rows of the next group, which that group overwrites when its
  turn comes (experts run in ascending order); the last group's overrun lands in 4·b padding rows."""
  m, k = x_MK.shape
  n_out = w_EKN.shape[1] if transpose_w else w_EKN.shape[2]
  eq = "bN,KN->bK" if transpose_w else "bK,KN->bN"
  x_pad = jnp.concatenate([x_MK, jnp.zeros((4 * b, k), x_MK.dtype)])

  def expert(out, inp):
    w_KN, start, n = inp  # the scan slices this expert's weight once, not once per tile

    def tile(r0, rows, out):
      y = jnp.einsum(eq, jax.lax.dynamic_slice_in_dim(x_pad, r0, rows), w_KN).astype(out.dtype)
      return jax.lax.dynamic_update_slice_in_dim(out, y, r0, 0)

    return _over_tiles(start, n, b, tile, out), None

  out = jnp.zeros((m + 4 * b, n_out), x_MK.dtype)
  out = jax.lax.scan(expert, out, (w_EKN, _tile_starts(group_sizes_E), group_sizes_E))[0]
  return out[:m]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_gmm(x_MK, w_EKN, group_sizes_E, b):
  return _expert_products(x_MK, w_EKN, group_sizes_E, b, transpose_w=False)


def _blocked_fwd(x_MK, w_EKN, group_sizes_E, b):
  return _expert_products(x_MK, w_EKN, group_sizes_E, b, transpose_w=False), (x_MK, w_EKN, group_sizes_E)


def _blocked_bwd(b, res, dy_MN):
  x_MK, w_EKN, group_sizes_E = res
  dx = _expert_products(dy_MN, w_EKN, group_sizes_E, b, transpose_w=True)
  k, n_out = w_EKN.shape[1:]
  x_pad = jnp.concatenate([x_MK, jnp.zeros((4 * b, k), x_MK.dtype)])
  dy_pad = jnp.concatenate([dy_MN, jnp.zeros((4 * b, n_out), dy_MN.dtype)])

  def expert(_, inp):
    start, n = inp

    def tile(r0, rows, acc):  # rows past the group (a last short tile) belong to the next expert
      xb = jax.lax.dynamic_slice_in_dim(x_pad, r0, rows)
      xb = jnp.where((r0 + jnp.arange(rows) < start + n)[:, None], xb, 0)
      dyb = jax.lax.dynamic_slice_in_dim(dy_pad, r0, rows)
      return acc + jnp.einsum("bK,bN->KN", xb, dyb, preferred_element_type=jnp.float32)

    return None, _over_tiles(start, n, b, tile, jnp.zeros((k, n_out), jnp.float32))

  dw = jax.lax.scan(expert, None, (_tile_starts(group_sizes_E), group_sizes_E))[1]
  return dx, dw.astype(w_EKN.dtype), None


_blocked_gmm.defvjp(_blocked_fwd, _blocked_bwd)
