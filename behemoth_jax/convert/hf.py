"""Hugging Face `save_pretrained` directories (safetensors) → our model.

Tensors are read one at a time from memory-mapped safetensors files and assembled leaf by leaf (a
stacked leaf gathers its layers), each checked against the abstract model's shape. Every tensor in
the checkpoint must be consumed; missing, unexpected and misshapen tensors raise `ConversionError`
with one line naming the tensor. No pickle is ever loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from behemoth_jax.config import ConfigError, ModelConfig
from behemoth_jax.convert.hf_config import from_hf_config
from behemoth_jax.convert.keymap import entries
from behemoth_jax.convert.safetensors_io import SafetensorsError, SafetensorsFile
from behemoth_jax.model.transformer import Llama4, abstract_model
from sharding.api import place

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
AUTO = "auto"  # keep each tensor's dtype as the checkpoint stores it (transformers' dtype="auto")


class ConversionError(ValueError):
  """A checkpoint does not match the model; the message names the tensor or field."""


class SafetensorsDir:
  """Name → tensor view over a directory of (possibly sharded) safetensors files."""

  def __init__(self, path: Path):
    self.path = path
    index = path / "model.safetensors.index.json"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in path.glob("*.safetensors"))
      if not files:
        bad = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        hint = f" (found {bad[0]}: pickled checkpoints are never loaded; re-save with safetensors)" if bad else ""
        raise ConversionError(f"{path}: no .safetensors files{hint}")
      weight_map = None
    self._files = {}
    self.file_of: dict[str, str] = {}
    for name in files:
      fp = path / name
      if not fp.is_file():
        raise ConversionError(f"{fp}: listed in model.safetensors.index.json but missing")
      try:
        handle = SafetensorsFile(fp)
      except SafetensorsError as e:
        raise ConversionError(str(e)) from None
      self._files[name] = handle
      for key in handle.keys():
        self.file_of[key] = name
    if weight_map is not None:
      missing = sorted(k for k in weight_map if k not in self.file_of)
      if missing:
        raise ConversionError(f"{missing[0]}: in the index but not in {weight_map[missing[0]]}")

  def keys(self) -> set[str]:
    return set(self.file_of)

  def get(self, name: str, buffer: np.ndarray | None = None, drop: bool = False) -> np.ndarray:
    """The tensor (a new array, or read into the front of the uint8 `buffer`; `drop`: its bytes then
    dropped from the page cache)."""
    if name not in self.file_of:
      raise ConversionError(f"{name}: missing from checkpoint {self.path}")
    return self._files[self.file_of[name]].get(name, buffer, drop)

  def nbytes(self, name: str) -> int:
    return self._files[self.file_of[name]].nbytes(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._files[self.file_of[name]].shape(name)

  def read_scatter(self, name: str, pieces, drop: bool = False) -> None:
    self._files[self.file_of[name]].read_scatter(name, pieces, drop)

  def prefetch(self, name: str) -> None:
    self._files[self.file_of[name]].prefetch(name)

  def dtype(self, name: str) -> np.dtype:
    """The stored dtype, from the header (no data read)."""
    if name not in self.file_of:
      raise ConversionError(f"{name}: missing from checkpoint {self.path}")
    return self._files[self.file_of[name]].dtype(name)

  def close(self) -> None:
    for handle in self._files.values():
      handle.close()


def read_config(path: Path) -> dict:
  cfg_path = path / "config.json"
  if not cfg_path.is_file():
    raise ConversionError(f"{cfg_path}: not found (expected a Hugging Face save_pretrained directory)")
  return json.loads(cfg_path.read_text())


def _text_prefix(hf_cfg: dict) -> str:
  archs = hf_cfg.get("architectures") or []
  if hf_cfg.get("model_type") == "llama4" or "Llama4ForConditionalGeneration" in archs:
    return "language_model."
  return ""


def _config_of(path: Path, overrides: dict) -> tuple[ModelConfig, str]:
  """(our config, HF text-tensor prefix) of a Hugging Face directory; dtypes are set by `_with_dtypes`."""
  hf_cfg = read_config(path)
  arch = (hf_cfg.get("architectures") or ["Llama4ForCausalLM"])[0]
  if not arch.startswith("Llama4"):
    raise ConversionError(f"{path / 'config.json'}: architecture {arch!r} is not a Llama 4 model")
  try:
    cfg = from_hf_config(hf_cfg, **overrides)
  except ConfigError as e:
    raise ConversionError(f"{path / 'config.json'}: {e}") from None
  return cfg, _text_prefix(hf_cfg)


def _check_dtype(dtype: str) -> None:
  if dtype != AUTO and dtype not in SUPPORTED_DTYPES:
    raise ConversionError(f"dtype: unsupported {dtype!r} (valid: {AUTO}, {', '.join(SUPPORTED_DTYPES)})")


def _with_dtypes(cfg: ModelConfig, source, by_leaf, dtype: str, compute_dtype: str | None):
  """(config with param/compute dtypes, {leaf: dtype it is stored in}). `dtype` "auto" keeps each
  leaf in its source tensors' dtype (read from the headers) and makes the dtype holding the most
  bytes the config's `param_dtype`; otherwise every leaf is converted to `dtype`."""
  leaf_dtypes = {}
  for leaf, ents in by_leaf.items():
    if dtype != AUTO:
      leaf_dtypes[leaf] = np.dtype(jnp.dtype(dtype))
      continue
    found = []
    for e in ents:
      d = source.dtype(e.hf_name)
      if d.name not in SUPPORTED_DTYPES:
        raise ConversionError(f"{e.hf_name}: unsupported dtype {d.name}")
      found.append(d)
    leaf_dtypes[leaf] = found[0] if len(set(found)) == 1 else np.result_type(*found)  # promote, never lose bits
  if dtype == AUTO:
    weight = defaultdict(int)
    for leaf, d in leaf_dtypes.items():
      weight[d.name] += len(by_leaf[leaf]) * d.itemsize  # a proxy for bytes that needs no shapes
    dtype = max(weight, key=weight.get) if weight else "float32"
  cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=compute_dtype or dtype)
  return cfg, leaf_dtypes


def load_hf(
  path: str | Path,
  dtype: str = AUTO,
  compute_dtype: str | None = None,
  progress: bool = False,
  mesh=None,
  **config_overrides,
) -> Llama4:
  """Loads a `Llama4ForCausalLM` / `Llama4ForConditionalGeneration` save_pretrained directory as our model.

  Args:
    path: directory with config.json and model*.safetensors (+ index when sharded).
    dtype: "auto" (default: every parameter keeps the dtype the checkpoint stores it in), or
      "float32", "bfloat16", "float16" to convert.
    compute_dtype: activation dtype; defaults to the parameters' (with "auto": the dtype holding
      most of the checkpoint).
    progress: show a progress bar (bytes read, bytes/s).
    mesh: place every parameter on this `jax.sharding.Mesh` by the sharding rules (run the model
      inside `sharding.api.use_mesh(mesh)`).
    config_overrides: ModelConfig fields to set (e.g. scan_layers=False, moe_impl="dense").
  Returns:
    The model; `model(input_ids_BT)` gives float32 logits [B, T, V].
  """
  path = Path(path)
  _check_dtype(dtype)
  cfg, prefix = _config_of(path, config_overrides)
  source = SafetensorsDir(path)
  try:
    model = _assemble(cfg, source, prefix, dtype, compute_dtype, progress)
  finally:
    source.close()
  if mesh is not None:
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, place(state, mesh))
  return model


def _entries_by_leaf(cfg: ModelConfig, prefix: str) -> dict:
  """{our leaf: its HF entries} of `cfg`'s model (the layer layout, not dtypes, decides them)."""
  by_leaf = defaultdict(list)
  for entry in entries(cfg, cfg.num_cycles, prefix):
    by_leaf[entry.leaf].append(entry)
  return by_leaf


def _abstract_leaves(cfg: ModelConfig, by_leaf: dict):
  """(graphdef, flat abstract leaves) of `cfg`'s model, checked against the key table."""
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  flat = dict(nnx.to_flat_state(abs_state))
  unknown_leaves = set(by_leaf) - set(flat)
  assert not unknown_leaves, f"key table names leaves the model lacks: {sorted(unknown_leaves)[:3]}"
  unfilled = sorted(set(flat) - set(by_leaf))
  assert not unfilled, f"model leaves with no HF source: {unfilled[:3]}"
  return graphdef, flat


def _progress(progress: bool, what: str):
  if not progress:
    return None
  return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=f"reading {what}")


def _leaf_value(cfg: ModelConfig, source, leaf_entries, target, dtype: np.dtype, bar=None) -> np.ndarray:
  """One of our leaves (host numpy in `dtype`, the target's shape) from its HF tensors, each checked.
  A leaf from one tensor in its dtype is a view of it (transposed, split: the writer copies it once,
  into the checkpoint); a stacked leaf is assembled layer by layer."""
  stacked = leaf_entries[0].stack is not None
  per_layer_shape = target.shape[1:] if stacked else target.shape
  host = np.empty(target.shape, dtype) if stacked else None
  for entry in leaf_entries:
    raw = source.get(entry.hf_name)
    if raw.dtype.name not in SUPPORTED_DTYPES:
      raise ConversionError(f"{entry.hf_name}: unsupported dtype {raw.dtype.name}")
    if entry.rule.part is not None and raw.shape[-1] % entry.rule.part[1]:
      raise ConversionError(f"{entry.hf_name}: last dim {raw.shape[-1]} not divisible into gate/up halves")
    value = entry.rule.to_ours(raw, cfg) if _shape_ok(raw, entry, cfg, per_layer_shape) else None
    if value is None or value.shape != per_layer_shape:
      raise ConversionError(
        f"{entry.hf_name}: shape {tuple(raw.shape)} does not match the config "
        f"(expected {_expected_hf_shape(entry, cfg, per_layer_shape)})"
      )
    if bar is not None:
      bar.update(raw.nbytes // (entry.rule.part[1] if entry.rule.part else 1))
    if not stacked:
      return value if value.dtype == dtype else value.astype(dtype)
    host[entry.stack] = value
  return host


def _check_all_consumed(source, by_leaf) -> None:
  consumed = {e.hf_name for ents in by_leaf.values() for e in ents}
  unexpected = sorted(source.keys() - consumed)
  if unexpected:
    raise ConversionError(
      f"{unexpected[0]}: unexpected tensor in checkpoint ({len(unexpected)} unexpected; is the config right?)"
    )


def _assemble(
  cfg: ModelConfig, source, prefix: str, dtype: str, compute_dtype: str | None, progress: bool = False
) -> Llama4:
  by_leaf = _entries_by_leaf(cfg, prefix)
  _check_all_consumed(source, by_leaf)
  cfg, leaf_dtypes = _with_dtypes(cfg, source, by_leaf, dtype, compute_dtype)
  graphdef, flat = _abstract_leaves(cfg, by_leaf)
  bar = _progress(progress, source.path)
  try:
    for leaf, leaf_entries in by_leaf.items():
      value = _leaf_value(cfg, source, leaf_entries, flat[leaf].get_value(), leaf_dtypes[leaf], bar)
      flat[leaf].set_value(jnp.asarray(value))
  finally:
    if bar is not None:
      bar.close()
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


class _StateDictSource:
  """A torch state dict (name → tensor) read like a checkpoint directory."""

  def __init__(self, state_dict: dict):
    self.sd = state_dict
    self.path = "state_dict"

  def keys(self) -> set[str]:
    return set(self.sd)

  def get(self, name: str) -> np.ndarray:
    if name not in self.sd:
      raise ConversionError(f"{name}: missing from the state dict")
    t = self.sd[name].detach().cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16: reinterpret the bits
      import torch

      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_torch_state_dict(state_dict: dict, config: ModelConfig) -> Llama4:
  """Our model from an in-memory HF Llama4 state dict (`hf_model.state_dict()`) and our config
  (e.g. `from_hf_config(hf_model.config.to_dict(), param_dtype=...)`), in the config's dtypes."""
  prefix = "language_model." if config.vision is not None else ""
  return _assemble(config, _StateDictSource(state_dict), prefix, config.param_dtype, config.dtype)


def _expected_hf_shape(entry, cfg, ours_shape) -> tuple[int, ...]:
  """The HF shape that would map to `ours_shape` (the inverse transform traced on shapes only)."""
  shape = jax.eval_shape(lambda a: entry.rule.to_hf(a, cfg), jax.ShapeDtypeStruct(ours_shape, np.float32)).shape
  if entry.rule.part is not None:
    shape = (*shape[:-1], shape[-1] * entry.rule.part[1])
  return tuple(shape)


def _shape_ok(raw: np.ndarray, entry, cfg, ours_shape) -> bool:
  return tuple(raw.shape) == _expected_hf_shape(entry, cfg, ours_shape)
