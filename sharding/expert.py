"""Expert parallelism: the MoE's routed experts under shard_map, dropless, with exact gradients.

Routing (router logits, top-k) happens outside, on the globally sharded tokens; each device then sorts
its own tokens (split over data, fsdp, expert and context).
With `expert` > 1 the rows bound for each expert shard travel by all-to-all, are regrouped by local
expert, run through the grouped matmul with that device's experts only, and travel back.
Expert weights enter as P(expert, None, tensor): jit all-gathers the fsdp shards of D just before
(ZeRO-3); with `tensor` > 1 each device holds a slice of the FFN width and the outputs are summed.

Two exchanges (`model.moe_exchange`; auto: ragged off CPU, padded on CPU, by the mesh's platform):
- padded: `all_to_all` of fixed [expert, rows, D] buffers (rows = local tokens x top-k), since any
  shard may receive every local row: `expert` x the routed activations, on both sides. Compute does not
  grow with it (rows past the received count are skipped by the grouped matmul).
- ragged: `jax.lax.ragged_all_to_all` sends each device's expert-sorted rows, one slice per (shard,
  local expert), straight into the receiver's buffer of `capacity` x the local routed rows, already
  grouped by local expert (no regrouping sort). Still dropless: when some shard receives more than a
  buffer holds, the exchange runs in rounds (a loop over windows of the receivers' rows; its trip count
  is the same on every device), so memory scales with the routed rows and the capacity, and only an
  unbalanced router costs time. Its backward pass (custom_vjp) keeps the first round's residuals and
  recomputes later rounds' forward. XLA:CPU does not implement the collective: tests substitute a
  reference for `ragged_all_to_all` below (tests/test_expert_exchange.py).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import ShardingError

TOKEN_AXES = ("data", "fsdp", "expert", "context")


# The rounds loops' trip counts depend on the routing; each runs in a named scope that tells program
# accounting (behemoth_jax/scale/flops.py) its count under balanced routing: one round in all.
ROUND_LOOPS = {"moe_exchange_rounds": 1, "moe_exchange_later_rounds": 0}

# Module-level so that tests on CPU can substitute a reference implementation (XLA:CPU lacks it).
ragged_all_to_all = jax.lax.ragged_all_to_all


def receive_rows(rows: int, shards: int, kind: str, capacity: float) -> int:
  """Rows of a receiver's buffer (per round) when each device routes `rows` rows: the padded exchange's
  worst case, or the ragged exchange's capacity (a multiple of 8, at most the worst case)."""
  if kind == "padded" or shards == 1:
    return shards * rows
  return min(shards * rows, max(8, -(-math.ceil(capacity * rows) // 8) * 8))


def exchange(
  xs_MD, group_sizes_E, fn, weights, permute, *, kind, capacity, shards, platform, sync_axes=(), axis="expert"
):
  """Rows sorted by global expert go to the shard owning their expert, `fn(rows, local_group_sizes,
  *weights)` runs there and the results come back in the rows' order."""
  if kind == "auto":
    kind = "padded" if platform == "cpu" else "ragged"
  if kind == "ragged":
    return ragged_exchange(xs_MD, group_sizes_E, fn, weights, shards, capacity, axis, sync_axes)
  return padded_exchange(xs_MD, group_sizes_E, lambda r, g: fn(r, g, *weights), permute, shards=shards, axis=axis)


def padded_exchange(xs_MD: jax.Array, group_sizes_E: jax.Array, fn, permute, *, shards: int, axis: str = "expert"):
  """All-to-all rows (sorted by global expert) to their expert shard, apply fn, and return them.

  `permute(x, order, inverse)` reorders rows (the model's, whose gradient is a gather, not a scatter)."""
  m, d = xs_MD.shape
  per_shard = group_sizes_E.shape[0] // shards
  gs_SL = group_sizes_E.reshape(shards, per_shard)
  counts_S = gs_SL.sum(axis=1)
  starts_S = jnp.cumsum(counts_S) - counts_S
  j_M = jnp.arange(m, dtype=jnp.int32)
  valid_SM = j_M[None, :] < counts_S[:, None]
  src_SM = jnp.minimum(starts_S[:, None] + j_M[None, :], m - 1)
  send_SMD = jnp.where(valid_SM[:, :, None], xs_MD[src_SM], 0)
  recv_SMD = jax.lax.all_to_all(send_SMD, axis, 0, 0)
  recv_gs_SL = jax.lax.all_to_all(gs_SL, axis, 0, 0)  # rows per local expert from each source

  # Regroup received rows by local expert; padding rows (past each source's count) sort last.
  ends_SL = jnp.cumsum(recv_gs_SL, axis=1)
  local_SM = jax.vmap(lambda e, j: jnp.searchsorted(e, j, side="right"))(ends_SL, jnp.broadcast_to(j_M, (shards, m)))
  order = jnp.argsort(local_SM.reshape(-1), stable=True).astype(jnp.int32)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  rows = permute(recv_SMD.reshape(shards * m, d), order, inverse)
  out = fn(rows, recv_gs_SL.sum(axis=0))
  recv_valid_SM = j_M[None, :] < ends_SL[:, -1:]
  back_SMD = jnp.where(recv_valid_SM[:, :, None], permute(out, inverse, order).reshape(shards, m, -1), 0)
  ret_SMD = jax.lax.all_to_all(back_SMD, axis, 0, 0)
  dest_M = jnp.minimum(jnp.searchsorted(jnp.cumsum(counts_S), j_M, side="right"), shards - 1)
  return ret_SMD[dest_M, j_M - starts_S[dest_M]]


class _Round(NamedTuple):
  out: tuple  # ragged_all_to_all's offsets and sizes, rows to their experts' shards
  back: tuple  # and the results back to their rows
  group_sizes_L: jax.Array  # the round buffer's rows per local expert


def _geometry(gs_E: jax.Array, shards: int, axis: str, sync_axes: tuple[str, ...], capacity: int):
  """The routing counts of every device in the exchange group and the number of rounds."""
  local = gs_E.shape[0] // shards
  g_SE = jax.lax.all_gather(gs_E, axis)  # rows from source s to global expert e
  cnt_DLS = g_SE.reshape(shards, shards, local).transpose(1, 2, 0)  # receiver d, its expert l, source s
  flat = cnt_DLS.reshape(shards, local * shards)  # a receiver's rows: by local expert, then source
  off_DLS = (jnp.cumsum(flat, axis=1) - flat).reshape(cnt_DLS.shape)
  rounds = (flat.sum(axis=1).max() + capacity - 1) // capacity
  if sync_axes:  # one trip count on every device of the mesh, not only within the exchange group
    rounds = jax.lax.pmax(rounds, sync_axes)
  return (g_SE, cnt_DLS, off_DLS), rounds


def _round(geo, r, capacity: int, axis: str) -> _Round:
  """Round r moves the rows at places [r·C, (r+1)·C) of every receiver's (local expert, source) order."""
  g_SE, cnt_DLS, off_DLS = geo
  shards, local = cnt_DLS.shape[:2]
  me = jax.lax.axis_index(axis)
  w0 = r * capacity

  def window(off, cnt):  # this round's part [a, b) of a block of cnt rows at place off
    a = jnp.clip(w0 - off, 0, cnt)
    return a, jnp.clip(w0 + capacity - off, 0, cnt)

  start_SE = jnp.cumsum(g_SE, axis=1) - g_SE  # where source s keeps the rows of expert e
  # As a source: one slice per global expert e = (receiver d, its local expert l).
  off_E, cnt_E = off_DLS[:, :, me].reshape(-1), cnt_DLS[:, :, me].reshape(-1)
  a, b = window(off_E, cnt_E)
  send = b - a
  out = (start_SE[me] + a, send, jnp.where(send > 0, off_E + a - w0, 0))
  # As a receiver: one slice per (source s, local expert l), i.e. index s·L + l.
  off_SL, cnt_SL = off_DLS[me].T, cnt_DLS[me].T
  a, b = window(off_SL, cnt_SL)
  recv = b - a
  home_SL = jax.lax.dynamic_slice_in_dim(start_SE, me * local, local, axis=1)
  back = (jnp.where(recv > 0, off_SL + a - w0, 0).reshape(-1), recv.reshape(-1), (home_SL + a).reshape(-1))
  out += (recv.reshape(-1),)
  back += (send,)
  tot_L = cnt_DLS[me].sum(axis=1)
  g0_L = jnp.cumsum(tot_L) - tot_L
  sizes_L = jnp.clip(w0 + capacity - g0_L, 0, tot_L) - jnp.clip(w0 - g0_L, 0, tot_L)
  return _Round(out, back, sizes_L.astype(jnp.int32))


def ragged_exchange(xs_MD, group_sizes_E, fn, weights, shards: int, capacity: float, axis: str, sync_axes=()):
  """The ragged exchange (module docstring): rounds of `capacity` x M rows per receiver."""
  m, d = xs_MD.shape
  c = receive_rows(m, shards, "ragged", capacity)  # rows a receiver takes per round
  single = c == shards * m  # room for the worst case: one round, no loops
  local = group_sizes_E.shape[0] // shards
  y = jax.eval_shape(fn, jax.ShapeDtypeStruct((c, d), xs_MD.dtype), jax.ShapeDtypeStruct((local,), jnp.int32), *weights)

  def received(a, rnd):  # a's rows of this round, at the receivers
    return _move(a, jnp.zeros((c, a.shape[1]), a.dtype), rnd.out, axis)

  def fn_vjp(xs, rnd, ws):
    return jax.vjp(lambda b, *w: fn(b, rnd.group_sizes_L, *w), received(xs, rnd), *ws)

  def forward(geo, start, rounds, xs, ws, out):
    def one(r, out):
      rnd = _round(geo, r, c, axis)
      return _move(fn(received(xs, rnd), rnd.group_sizes_L, *ws), out, rnd.back, axis)

    if single:  # the one round, if not done yet
      return out if start else one(0, out)
    with jax.named_scope("moe_exchange_later_rounds" if start else "moe_exchange_rounds"):
      return jax.lax.fori_loop(start, rounds, one, out)

  @jax.custom_vjp
  def run(xs, gs, ws):
    geo, rounds = _geometry(gs, shards, axis, sync_axes, c)
    return forward(geo, 0, rounds, xs, ws, jnp.zeros((m, y.shape[1]), y.dtype))

  def run_fwd(xs, gs, ws):
    geo, rounds = _geometry(gs, shards, axis, sync_axes, c)
    rnd = _round(geo, 0, c, axis)
    y0, vjp0 = fn_vjp(xs, rnd, ws)  # the first round's residuals are kept (balanced routing: the only round)
    out = _move(y0, jnp.zeros((m, y.shape[1]), y.dtype), rnd.back, axis)
    return forward(geo, 1, rounds, xs, ws, out), (xs, gs, ws, vjp0)

  def run_bwd(res, dy):
    xs, gs, ws, vjp0 = res
    geo, rounds = _geometry(gs, shards, axis, sync_axes, c)

    def back(rnd, vjp, dx, acc):
      dbuf, *dws = vjp(received(dy, rnd))
      dx = _move(dbuf.astype(xs.dtype), dx, rnd.back, axis)
      return dx, tuple(
        g.astype(w.dtype) if a is None else a + g.astype(a.dtype) for a, g, w in zip(acc, dws, ws, strict=True)
      )

    def later(r, carry):  # later rounds recompute their forward first
      rnd = _round(geo, r, c, axis)
      return back(rnd, fn_vjp(xs, rnd, ws)[1], *carry)

    # Weight gradients summed over rounds in the weights' dtype: a float32 sum would be two more copies
    # of the local experts' weights (Maverick, 16 local experts: +12 GiB per chip on v5p). The loop
    # itself costs one copy of them: XLA allocates its buffers whether or not it runs (Maverick, fsdp 1
    # x expert 8 x context 8 on 64 chips: +4.5 GiB per chip; docs/SCALE.md).
    carry = back(_round(geo, 0, c, axis), vjp0, jnp.zeros_like(xs), (None,) * len(ws))
    if single:
      return carry[0], None, carry[1]
    with jax.named_scope("moe_exchange_later_rounds"):
      dx, dws = jax.lax.fori_loop(1, rounds, later, carry)
    return dx, None, dws

  run.defvjp(run_fwd, run_bwd)
  return run(xs_MD, group_sizes_E, tuple(weights))


def _move(src, dst, plan, axis):
  """`ragged_all_to_all` of src's slices into dst by a round's (input offsets, send sizes, output offsets,
  receive sizes)."""
  in_off, sizes, out_off, recv = (jnp.asarray(v, jnp.int32) for v in plan)
  return ragged_all_to_all(src, dst, in_off, sizes, out_off, recv, axis_name=axis)


def expert_parallel(mesh: Mesh):
  """The `sharding.axes.run_experts` hook for `mesh` (None on one device: the experts run in place,
  without shard_map, whose backward pass would add an all-reduce of every expert weight's gradient)."""
  if mesh.devices.size == 1:
    return None
  ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
  token_axes = tuple(a for a in TOKEN_AXES if mesh.shape[a] > 1)
  n_token_shards = math.prod(mesh.shape[a] for a in token_axes)
  platform = mesh.devices.flat[0].platform
  move = partial(exchange, shards=ep, platform=platform, sync_axes=tuple(a for a in token_axes if a != "expert"))

  def run(local_fn, x_TD, experts_TA, scores_TA, w_gate_EDF, w_up_EDF, w_down_EFD):
    if x_TD.shape[0] % n_token_shards:
      raise ShardingError(
        f"moe tokens: {x_TD.shape[0]} tokens (batch x length) are not divisible by mesh "
        f"axes {' x '.join(f'{a}={mesh.shape[a]}' for a in token_axes)}"
      )
    if w_gate_EDF.shape[0] % ep:
      raise ShardingError(f"moe experts: {w_gate_EDF.shape[0]} experts not divisible by expert={ep}")

    def body(x, experts, scores, wg, wu, wd):
      y = local_fn(x, experts, scores, wg, wu, wd, move if ep > 1 else None)
      return jax.lax.psum(y, "tensor") if tp > 1 else y

    tokens = P(token_axes or None, None)
    w_in, w_out = P("expert", None, "tensor"), P("expert", "tensor", None)
    return jax.shard_map(
      body, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out), out_specs=tokens, check_vma=False
    )(x_TD, experts_TA, scores_TA, w_gate_EDF, w_up_EDF, w_down_EFD)

  return run
