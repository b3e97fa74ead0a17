"""Logical axis names: the only place they are written.

Model code annotates parameters and activations with these names; `sharding/rules.py` (the one
rules table) maps them to mesh axes. `constrain` is the single hook through which model code places
activation sharding constraints; it is the identity until a resolver is installed by `sharding/`, so
the model stays single-device code.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax

# Weights.
VOCAB = "vocab"
EMBED = "embed"
VISION_EMBED = "vision_embed"  # the vision tower's width (1408 for Llama 4: not a power of two)
VISION_HEADS = "vision_heads"
VISION_MLP = "vision_mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
EXPERTS = "experts"
LAYERS = "layers"
# Activations.
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_VOCAB = "act_vocab"

Axes = tuple[str | None, ...]

_resolver: contextvars.ContextVar[Callable[[jax.Array, Axes], jax.Array] | None] = contextvars.ContextVar(
  "behemoth_sharding_resolver", default=None
)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Constrains activation `x` to the mesh placement of logical `axes` (identity without a mesh)."""
  fn = _resolver.get()
  return x if fn is None else fn(x, axes)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value) -> Iterator[None]:
  token = var.set(value)
  try:
    yield
  finally:
    var.reset(token)


def use_resolver(fn: Callable[[jax.Array, Axes], jax.Array]) -> contextlib.AbstractContextManager[None]:
  return _setting(_resolver, fn)


# The MoE's routed experts run through this hook: without a mesh it calls the single-device function;
# `sharding.api.use_mesh` installs `sharding.expert.expert_parallel`, which runs it per device under
# shard_map (local sort, experts split over the `expert` axis with an all-to-all exchange).
_expert_parallel: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
  "behemoth_expert_parallel", default=None
)


def run_experts(local_fn: Callable, x_TD: jax.Array, *args: jax.Array) -> jax.Array:
  """`local_fn(x_TD, experts_TA, scores_TA, w_gate, w_up, w_down, exchange)` on one device (exchange
  None), or per device under shard_map with experts split over the mesh."""
  fn = _expert_parallel.get()
  return local_fn(x_TD, *args, None) if fn is None else fn(local_fn, x_TD, *args)


def use_expert_parallel(fn: Callable) -> contextlib.AbstractContextManager[None]:
  return _setting(_expert_parallel, fn)


# How many parts the current mesh splits a logical axis into (1 without a mesh): for kernels whose best
# loop structure depends on it (model/kernels.py keeps a context-split sequence's queries in one block).
_shard_count: contextvars.ContextVar[Callable[[str], int] | None] = contextvars.ContextVar(
  "behemoth_shard_count", default=None
)


def shards(logical: str, size: int | None = None) -> int:
  """Parts of `logical` on the current mesh; with `size`, 1 unless they divide it (a parameter's
  sharding would have refused such a dimension; an activation's keeps it whole)."""
  fn = _shard_count.get()
  n = 1 if fn is None else fn(logical)
  return n if size is None or size % n == 0 else 1


def use_shard_count(fn: Callable[[str], int]) -> contextlib.AbstractContextManager[None]:
  return _setting(_shard_count, fn)
