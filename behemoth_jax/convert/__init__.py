"""Conversion between Hugging Face (PyTorch, safetensors) checkpoints and behemoth-jax models."""

from behemoth_jax.convert.export import save_hf, to_torch_state_dict
from behemoth_jax.convert.hf import ConversionError, from_torch_state_dict, load_hf

__all__ = ["ConversionError", "from_torch_state_dict", "load_hf", "save_hf", "to_torch_state_dict"]
