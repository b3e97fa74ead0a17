"""The global batch layout, one for every consumer: the train step, evaluation and ahead-of-time
compilation. [B, T] arrays split the batch over the rules' batch axes and the sequence over the
context axis; arrays with more dimensions ([B, T, k] teacher targets, [B, K, C, H, W] image tiles)
split only the batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from behemoth_jax.config import Config
from sharding import axes as ax
from sharding.api import logical_to_spec


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
  """Where a global batch array of `shape` lives."""
  logical = (ax.BATCH, ax.LENGTH) if len(shape) == 2 else (ax.BATCH,) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, logical_to_spec(logical, mesh, shape))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a batch (a dict of arrays) → global arrays laid out by `batch_sharding`."""
  n = jax.process_count()
  out = {}
  for k, v in batch.items():
    shape = (v.shape[0] * n, *v.shape[1:])
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, shape), v)
  return out


def batch_specs(cfg: Config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The abstract global batch of `cfg`'s train step (what `to_global` makes of the data pipeline's
  batches), for compiling without data."""
  b, t = cfg.train.batch_size, cfg.train.seq_len

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, shape))

  batch = {k: sds((b, t), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = sds((b, t), jnp.float32)
  vc = cfg.model.vision
  if vc is not None:
    batch["pixel_values"] = sds(
      (b, cfg.data.max_tiles_per_row, vc.num_channels, vc.image_size, vc.image_size), jnp.float32
    )
  return batch
