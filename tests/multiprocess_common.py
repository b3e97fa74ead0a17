"""The computation both the 2-process and the 1-process runs perform (loss and gradient norm)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from behemoth_jax.config import ModelConfig, ParallelConfig
from behemoth_jax.train.state import init_sharded
from sharding.api import use_mesh
from sharding.mesh import make_mesh

CFG = ModelConfig(
  vocab_size=64,
  hidden_size=32,
  num_layers=8,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  intermediate_size=16,
  intermediate_size_mlp=24,
  num_experts=8,
  attention_chunk_size=6,
  param_dtype="float32",
  dtype="float32",
  initializer_range=0.2,
)
PARALLEL_2X4 = ParallelConfig(fsdp=2, expert=4, num_slices=2, dcn_axis="fsdp")


def loss_and_grad_norm(parallel: ParallelConfig) -> tuple[float, float]:
  mesh = make_mesh(parallel)
  ids_np = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 25)).astype(np.int32)
  ids = jax.make_array_from_callback(ids_np.shape, NamedSharding(mesh, PartitionSpec()), lambda i: ids_np[i])
  with use_mesh(mesh):
    model = init_sharded(CFG, mesh, seed=5)
    graphdef, state = nnx.split(model)

    def loss_fn(state):
      logits = nnx.merge(graphdef, state)(ids[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    @jax.jit
    def step(state):
      loss, grads = jax.value_and_grad(loss_fn)(state)
      return loss, optax.tree.norm(grads)

    loss, gnorm = step(state)
  return float(loss), float(gnorm)


def single_process_parallel() -> ParallelConfig:
  return dataclasses.replace(PARALLEL_2X4, num_slices=1)
