"""behemoth-jax: Llama 4 (Scout, Maverick, Behemoth) in JAX/Flax NNX.

Shape-suffix legend used in every tensor and weight name (logical, global shapes):
  B batch, T query length, S key length, D model width, V vocab, N query heads, K kv heads,
  G = N/K, H head dim, J = H/2 rotary pairs, F ffn width, E experts, A experts per token,
  M token-expert pairs (T·A), C chunk, L layers, P position-table rows.
"""

from behemoth_jax.platforms import cpu_only_without_accelerator

cpu_only_without_accelerator()  # before anything starts a backend: no libtpu noise on a CPU machine

from behemoth_jax.config import Config, ConfigError  # noqa: E402, ModelConfig, load_config
from behemoth_jax.model.transformer import Llama4  # noqa: E402, abstract_model, create_model

__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "Llama4", "abstract_model", "create_model"]
