"""The one table that maps logical axes to mesh axes (weights and activations).

Mesh axes, outermost to innermost (innermost gets the fastest links):
  data    — pure data parallelism: batch split, parameters replicated.
  fsdp    — batch split and parameters/optimizer state sharded on their `embed` dimension (ZeRO-3).
  expert  — experts split; tokens travel to their expert's device by all-to-all (sharding/expert.py).
  context — the sequence split (long context); global layers all-gather keys/values.
  tensor  — heads and FFN width split (Megatron); needs the fastest interconnect.
"""

from __future__ import annotations

import math

from sharding import axes as ax

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")

# Parameter axes whose mesh axes are dropped, last first, until they divide the dimension.
BEST_EFFORT = frozenset({ax.VISION_EMBED, ax.VISION_HEADS, ax.VISION_MLP})

# Batch is split over every axis that does not split the model's width: each device sees its own tokens.
BATCH_AXES = ("data", "fsdp", "expert")

RULES: dict[str, tuple[str, ...]] = {
  # Weights.
  ax.VOCAB: ("tensor",),
  # Non-expert weights also split D over context and expert devices, which would otherwise hold
  # copies; in expert tensors the experts dim comes first and takes `expert` (one use per tensor).
  ax.EMBED: ("fsdp", "context", "expert"),
  # Like embed, but best effort: mesh axes that do not divide the width (1408 = 2^7 · 11) are dropped
  # (the 0.85B-parameter vision tower is then partly replicated) instead of being an error.
  ax.VISION_EMBED: ("fsdp", "context", "expert"),
  # The vision tower has no experts: its heads and MLP width take the expert axis when the width
  # could not (one use per tensor, first dimension first).
  ax.VISION_HEADS: ("tensor", "expert"),
  ax.VISION_MLP: ("tensor", "expert"),
  ax.HEADS: ("tensor",),
  ax.KV_HEADS: ("tensor",),
  ax.HEAD_DIM: (),
  ax.MLP: ("tensor",),
  ax.EXPERTS: ("expert",),
  ax.LAYERS: (),
  # Activations.
  ax.BATCH: BATCH_AXES,
  ax.LENGTH: ("context",),
  ax.ACT_EMBED: (),
  ax.ACT_HEADS: ("tensor",),
  ax.ACT_VOCAB: ("tensor",),
}


def shard_count(logical: str, sizes: dict[str, int]) -> int:
  """Into how many parts the rules split logical axis `logical` on a mesh of these axis sizes (for
  arithmetic such as the memory calculator; placement also drops axes that do not divide a size)."""
  return math.prod(sizes[a] for a in RULES[logical])
