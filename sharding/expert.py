"""Expert parallelism: the MoE's routed experts under shard_map, dropless, with exact gradients.

Routing (router logits, top-k) happens outside, on the globally sharded tokens; each device then sorts
its own tokens (split over data, fsdp, expert and context).
With `expert` > 1 the rows bound for each expert shard travel by all-to-all, are regrouped by local
expert, run through the grouped matmul with that device's experts only, and travel back.
Expert weights enter as P(expert, None, tensor): jit all-gathers the fsdp shards of D just before
(ZeRO-3); with `tensor` > 1 each device holds a slice of the FFN width and the outputs are summed.

Buffer sizing: a dropless exchange with fixed shapes must allow every local row to go to one shard,
so the send and receive buffers are [expert, rows, D] with rows = local tokens × top-k: `expert`×
the routed activations. Compute does not grow with it: rows past the received count are ignored by
the grouped matmul (the CPU kernel's loops stop at each expert's received count).
`jax.lax.ragged_all_to_all` removes the padding on TPU/GPU and is the natural next step where memory
is tight.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import ShardingError

TOKEN_AXES = ("data", "fsdp", "expert", "context")


def exchange(xs_MD: jax.Array, group_sizes_E: jax.Array, fn, permute, *, shards: int, axis: str = "expert"):
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


def expert_parallel(mesh: Mesh):
  """The `sharding.axes.run_experts` hook for `mesh` (None on one device: the experts run in place,
  without shard_map, whose backward pass would add an all-reduce of every expert weight's gradient)."""
  if mesh.devices.size == 1:
    return None
  ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
  token_axes = tuple(a for a in TOKEN_AXES if mesh.shape[a] > 1)
  n_token_shards = math.prod(mesh.shape[a] for a in token_axes)

  def run(local_fn, x_TD, experts_TA, scores_TA, w_gate_EDF, w_up_EDF, w_down_EFD):
    if x_TD.shape[0] % n_token_shards:
      raise ShardingError(
        f"moe tokens: {x_TD.shape[0]} tokens (batch x length) are not divisible by mesh "
        f"axes {' x '.join(f'{a}={mesh.shape[a]}' for a in token_axes)}"
      )
    if w_gate_EDF.shape[0] % ep:
      raise ShardingError(f"moe experts: {w_gate_EDF.shape[0]} experts not divisible by expert={ep}")

    def body(x, experts, scores, wg, wu, wd):
      y = local_fn(x, experts, scores, wg, wu, wd, partial(exchange, shards=ep) if ep > 1 else None)
      return jax.lax.psum(y, "tensor") if tp > 1 else y

    tokens = P(token_axes or None, None)
    w_in, w_out = P("expert", None, "tensor"), P("expert", "tensor", None)
    return jax.shard_map(
      body, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out), out_specs=tokens, check_vma=False
    )(x_TD, experts_TA, scores_TA, w_gate_EDF, w_up_EDF, w_down_EFD)

  return run
