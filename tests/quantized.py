"""The weights `model.weight_quant` stores quantized, counted independently of the code under test."""

import math

from flax import nnx

from behemoth_jax.model.layers import contracted_axes
from behemoth_jax.model.transformer import abstract_model

# Attention, dense / shared-expert and routed-expert projections (router, norms, embeddings, LM head stay).
QUANTIZED = ("wq_DNH", "wk_DKH", "wv_DKH", "wo_NHD", "w_gate_DF", "w_up_DF", "w_down_FD")
QUANTIZED += ("w_gate_EDF", "w_up_EDF", "w_down_EFD")


def element_counts(mc) -> tuple[int, int, int]:
  """(elements of quantized weights, of their per-output-channel scales, of every other parameter) of
  the float model `mc`."""
  quantized = scales = other = 0
  for key, var in nnx.to_flat_state(nnx.state(abstract_model(mc), nnx.Param)):
    shape, axes = var.get_value().shape, var.get_metadata("out_sharding")
    if key[-1] in QUANTIZED:
      quantized += math.prod(shape)
      scales += math.prod(d for i, d in enumerate(shape) if i not in contracted_axes(axes))
    else:
      other += math.prod(shape)
  return quantized, scales, other
