"""Grouped matmul for sparse MoE: rows sorted by expert, `out[r] = x[r] @ w[expert(r)]`.

Implementations (docs/ARCHITECTURE.md §2.6; the measurements behind the CPU kernel's shape are in
docs/PERFORMANCE.md, "Design measurements"):
- `ragged`: `jax.lax.ragged_dot`, native on TPU. XLA:GPU expands it into one dense GEMM over every
  expert (E× the FLOPs forward; measured on an H200 and in deviceless compiles, docs/PERFORMANCE.md
  "GPU mode"): still the GPU default until `blocked` has been timed there.
- `blocked`: on CPU `ragged_dot` lowers to one masked dense matmul per expert (E× the useful
  FLOPs), so this path scans over the experts, reads each expert's
  weight once and multiplies its own rows in tiles of 4·b rows (a `while` loop with a data-dependent
  trip count), then its remaining rows in one tile whose size (the rows rounded up to b/2) a
  `lax.switch` picks. The backward pass runs the same tiles for dx = dy·wᵀ and, per expert, dw[e] =
  Σ xᵀ·dy in tiles of 8·b rows: no E×-dense work and no scatter-add over tokens. Compiled FLOPs of
  these loops are counted at run time (`behemoth_jax.scale.flops.executed_flops`).
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


def grouped_matmul(
  x_MK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array, *, impl: str, block: int = 0
) -> jax.Array:
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


def _step(b: int) -> int:
  """Row granularity of an expert's last tile: b/2 (at least 8, or b when b < 8)."""
  return max(b // 2, min(b, 8))


def _last_tile(rest, big: int, step: int, m: int, compute, empty):
  """`compute(rows)` for `rest` (< big, <= m) rows rounded up to a multiple of `step`; `empty()` if 0.

  Each size is a static shape, so one `lax.switch` picks among (at most) big/step matmul shapes: an
  expert's last rows cost one matmul, not several b-row tiles (a matmul pays a large fixed cost on
  XLA:CPU). Callers slice the operands (`big` rows) before the `switch` so each branch is one static
  slice and a matmul (branches cost compile time). Measurements: docs/PERFORMANCE.md."""
  sizes = range(step, min(big, -(-m // step) * step) + 1, step)
  return jax.lax.switch((rest + step - 1) // step, [empty] + [partial(compute, rows) for rows in sizes])


def _expert_products(x_MK, w_EKN, group_sizes_E, b: int, transpose_w: bool):
  """`out[r] = x[r] @ w[e(r)]` (or `@ w[e(r)].T`): experts in order, each over its own rows in tiles.

  Tiles of 4·b rows while that many remain, then one tile of the rest rounded up to `_step(b)` rows.
  That tile runs past its group into rows of the next group, which that group overwrites when its turn
  comes (experts run in ascending order); the last group's overrun lands in 4·b padding rows. It is
  zero-padded to 4·b rows and written outside the `switch`: a `switch` that wrote into the carried
  output made XLA copy the whole output per expert."""
  m, k = x_MK.shape
  n_out = w_EKN.shape[1] if transpose_w else w_EKN.shape[2]
  eq = "bN,KN->bK" if transpose_w else "bK,KN->bN"
  big = 4 * b
  x_pad = jnp.concatenate([x_MK, jnp.zeros((big, k), x_MK.dtype)])

  def expert(out, inp):
    w_KN, start, n = inp  # the scan slices this expert's weight once, not once per tile
    product = lambda x_bK: jnp.einsum(eq, x_bK, w_KN).astype(out.dtype)
    write = lambda o, r0, y: jax.lax.dynamic_update_slice_in_dim(o, y, r0, 0)
    tile = lambda r0: product(jax.lax.dynamic_slice_in_dim(x_pad, r0, big))
    full = n // big
    if m >= big:  # (static: no loop to compile when no group can fill a tile)
      out = jax.lax.fori_loop(0, full, lambda i, o: write(o, start + i * big, tile(start + i * big)), out)
    rest0 = start + full * big
    x_bK = jax.lax.dynamic_slice_in_dim(x_pad, rest0, big)
    last = _last_tile(
      n - full * big,
      big,
      _step(b),
      m,
      lambda rows: jnp.pad(product(x_bK[:rows]), ((0, big - rows), (0, 0))),
      lambda: jnp.zeros((big, n_out), out.dtype),
    )  # (rows of the next group or padding)
    return write(out, rest0, last), None

  out = jnp.zeros((m + big, n_out), x_MK.dtype)
  out = jax.lax.scan(expert, out, (w_EKN, _tile_starts(group_sizes_E), group_sizes_E))[0]
  return out[:m]


def _expert_weight_grads(x_MK, dy_MN, group_sizes_E, b: int):
  """`dw[e] = Σ_{r in group e} x[r]ᵀ dy[r]`, float32: per expert, its last rows (the group's size modulo
  8·b, rounded up to `_step(b)` and masked to the group) start the accumulator, then tiles of 8·b rows
  add into it. Most groups take one matmul and no add: XLA:CPU does not fuse an add into a dot, so each
  accumulated tile costs a read-modify-write of the [K, N] float32 accumulator (2 MB on bench-moe)."""
  (m, k), n_out = x_MK.shape, dy_MN.shape[1]
  big = 8 * b
  x_pad = jnp.concatenate([x_MK, jnp.zeros((big, k), x_MK.dtype)])
  dy_pad = jnp.concatenate([dy_MN, jnp.zeros((big, n_out), dy_MN.dtype)])
  product = lambda x_bK, dy_bN: jnp.einsum("bK,bN->KN", x_bK, dy_bN, preferred_element_type=jnp.float32)
  rows_at = lambda a, r0: jax.lax.dynamic_slice_in_dim(a, r0, big)

  def expert(_, inp):
    start, n = inp
    full = n // big
    rest0 = start + full * big
    x_bK = jnp.where((rest0 + jnp.arange(big) < start + n)[:, None], rows_at(x_pad, rest0), 0)  # rows
    dy_bN = rows_at(dy_pad, rest0)  # past the group belong to the next expert: masked
    acc = _last_tile(
      n - full * big,
      big,
      _step(b),
      m,
      lambda rows: product(x_bK[:rows], dy_bN[:rows]),
      lambda: jnp.zeros((k, n_out), jnp.float32),
    )
    if m >= big:  # (static: no loop to compile when no group can fill a tile)
      acc = jax.lax.fori_loop(
        0, full, lambda i, a: a + product(rows_at(x_pad, start + i * big), rows_at(dy_pad, start + i * big)), acc
      )
    return None, acc

  return jax.lax.scan(expert, None, (_tile_starts(group_sizes_E), group_sizes_E))[1]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_gmm(x_MK, w_EKN, group_sizes_E, b):
  return _expert_products(x_MK, w_EKN, group_sizes_E, b, transpose_w=False)


def _blocked_fwd(x_MK, w_EKN, group_sizes_E, b):
  return _expert_products(x_MK, w_EKN, group_sizes_E, b, transpose_w=False), (x_MK, w_EKN, group_sizes_E)


def _blocked_bwd(b, res, dy_MN):
  x_MK, w_EKN, group_sizes_E = res
  dx = _expert_products(dy_MN, w_EKN, group_sizes_E, b, transpose_w=True)
  dw = _expert_weight_grads(x_MK, dy_MN, group_sizes_E, b)
  return dx, dw.astype(w_EKN.dtype), None


_blocked_gmm.defvjp(_blocked_fwd, _blocked_bwd)
