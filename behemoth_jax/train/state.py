"""The model and the train state on a mesh: abstract (nothing allocated) with shardings from the rules
table, and created directly on their shards, never whole on one device (abstract init + jit with
out_shardings)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from behemoth_jax.config import Config, ConfigError, ModelConfig, load_config
from behemoth_jax.model.layers import quantize_weight
from behemoth_jax.model.transformer import Llama4, create_model
from behemoth_jax.train.checkpoint import restore_params
from behemoth_jax.train.optim import moment_shardings
from sharding.api import param_shardings

# {"params": nnx.State, "opt_state": optax state, "step": int32 scalar, "skipped": int32 scalar (updates
# skipped for a non-finite loss or gradient norm)}
State = dict[str, Any]


def abstract_sharded_model(cfg: ModelConfig, mesh: Mesh, seed: int = 0):
  """(graphdef, abstract state with shardings, shardings): nothing is allocated."""
  abstract = nnx.eval_shape(lambda: create_model(cfg, seed))
  graphdef, state = nnx.split(abstract)
  shardings = param_shardings(state, mesh)
  abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
  return graphdef, abs_state, shardings


def init_sharded(cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> Llama4:
  """Creates the model directly on its shards (never whole on one device)."""
  graphdef, _, shardings = abstract_sharded_model(cfg, mesh, seed)
  state = jax.jit(lambda: nnx.split(create_model(cfg, seed))[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_train_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation):
  """(graphdef, abstract train state with shardings; nothing allocated): parameters follow the rules
  table; optimizer leaves follow `optimizer_shardings`."""
  graphdef, abstract_params, shardings_p = abstract_sharded_model(cfg.model, mesh, cfg.train.seed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = {
    "params": shardings_p,
    "opt_state": optimizer_shardings(tx, abstract_opt, shardings_p, mesh),
    "step": replicated,
    "skipped": replicated,
  }
  abstract = {
    "params": abstract_params,
    "opt_state": abstract_opt,
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    "skipped": jax.ShapeDtypeStruct((), jnp.int32),
  }
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, abstract


def optimizer_shardings(tx, abstract_opt_state, shardings_p, mesh: Mesh):
  """Every optimizer leaf that mirrors a parameter (Adam's moments, 8-bit ones with their row scales)
  takes that parameter's sharding; the rest (step counts) is replicated. Explicit, not left to XLA:
  compiled for TPU, propagation through `tx.init` replicated the moments (Scout's init needed 41 GiB per
  chip instead of 1)."""
  return moment_shardings(tx, abstract_opt_state, shardings_p, NamedSharding(mesh, PartitionSpec()))


def make_init(cfg: Config, tx, shardings_p, mesh: Mesh):
  """The jitted initial state, created on its shards (never whole on one device)."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def init() -> State:
    params = nnx.split(create_model(cfg.model, cfg.train.seed))[1]
    params = jax.lax.with_sharding_constraint(params, shardings_p)
    zero = jnp.zeros((), jnp.int32)
    return {"params": params, "opt_state": tx.init(params), "step": zero, "skipped": zero}

  abstract_opt = jax.eval_shape(lambda: tx.init(nnx.split(create_model(cfg.model, cfg.train.seed))[1]))
  return jax.jit(
    init,
    out_shardings={
      "params": shardings_p,
      "step": replicated,
      "skipped": replicated,
      "opt_state": optimizer_shardings(tx, abstract_opt, shardings_p, mesh),
    },
  )


def teacher_model_config(cfg: Config) -> ModelConfig:
  """The online teacher's model: `distill.teacher_config`'s model section (default: the student's),
  its weights held as `distill.teacher_dtype` says; same vocabulary as the student (one line if not)."""
  dc = cfg.distill
  tcfg = load_config(dc.teacher_config).model if dc.teacher_config else cfg.model
  if tcfg.vocab_size != cfg.model.vocab_size:
    raise ConfigError(
      f"distill.teacher_config: teacher vocab_size {tcfg.vocab_size} != student's "
      f"{cfg.model.vocab_size} (distillation compares distributions token by token)"
    )
  td = {"bf16": "bfloat16"}.get(dc.teacher_dtype, dc.teacher_dtype)
  if td in ("fp8", "int8"):
    return dataclasses.replace(tcfg, param_dtype="bfloat16", weight_quant=td, fp8=False)
  return dataclasses.replace(tcfg, param_dtype=td, fp8=False) if td != "auto" else tcfg


def unquantized(mc: ModelConfig) -> ModelConfig:
  """The same model with float weights (a quantized model's parameter count, its float checkpoint)."""
  return dataclasses.replace(mc, weight_quant="none")


def restore_model_params(path, cfg: ModelConfig, mesh: Mesh, what: str):
  """(graphdef, parameters) of `cfg` restored from a float checkpoint onto their shards. With
  `cfg.weight_quant` each quantized weight is restored alone (in `cfg.param_dtype`, on its shards) and
  quantized there by a jitted `quantize_weight` into its own shardings, so at most one float weight
  is alive beside the quantized model (restored as `restore_params` does: onto its shards, each host
  reading only its devices' shards, re-stacked ones too)."""
  graphdef, abstract, _ = abstract_sharded_model(cfg, mesh)
  if cfg.weight_quant == "none":
    return graphdef, restore_params(path, abstract, what=what)
  _, abstract_f, _ = abstract_sharded_model(unquantized(cfg), mesh)
  flat_q = dict(nnx.to_flat_state(abstract))
  flat_f = dict(nnx.to_flat_state(abstract_f))
  quantized = sorted(k[:-1] for k in flat_q if k[-1] == "q" and k[:-1] in flat_f)
  plain = set(flat_f) - set(quantized)
  out = dict(nnx.to_flat_state(restore_params(path, abstract_f, what=what, keys=plain)))
  for key in quantized:
    q_var, s_var = flat_q[(*key, "q")], flat_q[(*key, "scale")]
    w = dict(nnx.to_flat_state(restore_params(path, abstract_f, what=what, keys={key})))[key].get_value()
    axes = q_var.get_metadata("out_sharding")
    quantize = jax.jit(
      lambda a, axes=axes: quantize_weight(a, axes, cfg.weight_quant),
      out_shardings=(q_var.get_value().sharding, s_var.get_value().sharding),
      donate_argnums=0,
    )
    q, scale = quantize(w)
    del w
    out[(*key, "q")], out[(*key, "scale")] = q_var.replace(q), s_var.replace(scale)
  return graphdef, nnx.from_flat_state(out)
