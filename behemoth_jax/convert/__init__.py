"""Conversion between Hugging Face (PyTorch, safetensors) checkpoints and behemoth-jax models."""

from behemoth_jax.convert.hf import ConversionError, load_hf

__all__ = ["ConversionError", "load_hf"]
