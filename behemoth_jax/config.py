"""One typed, validated configuration: model, parallelism and training sections.

Loading is strict: YAML keys that are not fields, values of the wrong type, and inconsistent numbers
raise `ConfigError` with one line naming the field and the rule. `key=value` overrides use dotted
paths (`model.hidden_size=64`) and YAML syntax for values (`model.moe_layers=[0,2]`). The mapping to
and from Hugging Face config.json lives in behemoth_jax/convert/hf_config.py.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
  """A configuration value breaks a rule; the message names the field."""


DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MOE_IMPLS = ("auto", "ragged", "blocked", "dense")
MOE_EXCHANGES = ("auto", "padded", "ragged")
WEIGHT_QUANTS = ("none", "fp8", "int8")


@dataclass(frozen=True)
class RopeScaling:
  """llama3-type RoPE frequency scaling (Llama 3.1 / Llama 4 Scout)."""

  factor: float = 16.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 1.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    check(self.factor > 0, "rope_scaling.factor", f"must be > 0, got {self.factor}")
    check(self.low_freq_factor > 0, "rope_scaling.low_freq_factor", "must be > 0")
    check(
      self.high_freq_factor >= self.low_freq_factor,
      "rope_scaling.high_freq_factor",
      f"must be >= low_freq_factor ({self.high_freq_factor} < {self.low_freq_factor})",
    )
    check(self.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings", "must be > 0")


@dataclass(frozen=True)
class VisionConfig:
  """The early-fusion vision encoder (HF `Llama4VisionConfig`); defaults are Scout/Maverick's (docs/ARCHITECTURE.md §3).

  Token ids are the prompt layout's special tokens (Llama 4 tokenizer); configs with another tokenizer
  (e.g. the byte tokenizer of configs/tiny_mm.yaml) set their own.
  """

  hidden_size: int = 1408
  num_layers: int = 34
  num_heads: int = 16
  intermediate_size: int = 5632  # ViT MLP width; also the adapter's input (= hidden / ratio², checked)
  image_size: int = 336  # tile side in pixels
  patch_size: int = 14
  num_channels: int = 3
  norm_eps: float = 1e-5
  pixel_shuffle_ratio: float = 0.5
  projector_input_dim: int = 4096
  projector_output_dim: int = 4096
  vision_output_dim: int = 4096
  rope_theta: float = 10000.0
  initializer_range: float = 0.02
  max_tiles: int = 16  # tiles per image for the preprocessing canvas (a global thumbnail is added)
  image_token_id: int = 200092  # <|patch|>: replaced by image features, in order
  boi_token_id: int = 200080  # <|image_start|>
  eoi_token_id: int = 200081  # <|image_end|>
  image_marker_id: int = 200090  # <|image|>: precedes the global (or only) tile
  tile_x_separator_id: int = 200084
  tile_y_separator_id: int = 200085

  def __post_init__(self):
    for name in (
      "hidden_size",
      "num_layers",
      "num_heads",
      "intermediate_size",
      "image_size",
      "patch_size",
      "num_channels",
      "projector_input_dim",
      "projector_output_dim",
      "vision_output_dim",
      "max_tiles",
    ):
      check(getattr(self, name) > 0, f"model.vision.{name}", f"must be > 0, got {getattr(self, name)}")
    check(
      self.hidden_size % self.num_heads == 0,
      "model.vision.hidden_size",
      f"{self.hidden_size} not divisible by num_heads ({self.num_heads})",
    )
    check(
      self.head_dim % 4 == 0,
      "model.vision.num_heads",
      f"head_dim {self.head_dim} must be divisible by 4 (2D RoPE: x and y halves of complex pairs)",
    )
    check(
      self.image_size % self.patch_size == 0,
      "model.vision.image_size",
      f"{self.image_size} not divisible by patch_size ({self.patch_size})",
    )
    side, r = self.image_size // self.patch_size, self.pixel_shuffle_ratio
    check(
      0 < r <= 1 and (side * r).is_integer() and (self.hidden_size / r**2).is_integer(),
      "model.vision.pixel_shuffle_ratio",
      f"{r} must divide the patch grid side ({side}) and the hidden size into whole numbers",
    )
    check(
      self.intermediate_size == int(self.hidden_size / r**2),
      "model.vision.intermediate_size",
      f"must equal hidden_size / pixel_shuffle_ratio² = {int(self.hidden_size / r**2)} "
      f"(HF feeds the pixel-shuffled features to an adapter of that width), got {self.intermediate_size}",
    )
    check(
      self.projector_input_dim == self.projector_output_dim == self.vision_output_dim,
      "model.vision.projector_output_dim",
      "projector_input_dim, projector_output_dim and vision_output_dim must be equal "
      f"(got {self.projector_input_dim}, {self.projector_output_dim}, {self.vision_output_dim})",
    )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def tokens_per_tile(self) -> int:
    """Image features (`<|patch|>` tokens) per tile after the pixel shuffle (144 for Scout)."""
    return int(self.patches_per_side * self.pixel_shuffle_ratio) ** 2


@dataclass(frozen=True)
class ModelConfig:
  """The Llama 4 text decoder. Defaults are Llama 4 Scout's released values (docs/ARCHITECTURE.md §1)."""

  vocab_size: int = 202048
  hidden_size: int = 5120
  num_layers: int = 48
  num_heads: int = 40
  num_kv_heads: int = 8
  head_dim: int = 128
  # Routed expert width. Shared expert width defaults to it (HF has one field for both);
  # Behemoth's derived config needs them to differ (docs/ARCHITECTURE.md §1).
  intermediate_size: int = 8192
  shared_intermediate_size: int | None = None
  intermediate_size_mlp: int = 16384  # dense (non-MoE) layers
  num_experts: int = 16
  num_experts_per_tok: int = 1
  # Layer pattern. Explicit lists win over the interval rules (HF `moe_layers`, `no_rope_layers`).
  moe_layer_step: int = 1  # layer i is MoE iff (i+1) % step == 0
  moe_layers: tuple[int, ...] | None = None
  nope_layer_interval: int = 4  # layer i is NoPE iff (i+1) % interval == 0; 0 = none
  nope_layers: tuple[int, ...] | None = None
  # Layers with global causal attention; default: exactly the NoPE layers (HF `layer_types`).
  global_attn_layers: tuple[int, ...] | None = None
  attention_chunk_size: int | None = 8192  # None: chunked layers attend globally
  use_qk_norm: bool = True
  rope_theta: float = 500000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  attn_temperature_tuning: bool = True
  attn_scale: float = 0.1
  floor_scale: float = 8192.0
  max_position_embeddings: int = 10485760
  learned_pos_embedding: bool = False  # docs/ARCHITECTURE.md §2.5: opt-in, off in every shipped config
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  bos_token_id: int = 200000
  eos_token_ids: tuple[int, ...] = (200001, 200007, 200008)
  pad_token_id: int | None = 200018  # None: no padding token (HF's default); exported only if in the vocabulary
  # Numerics and execution.
  param_dtype: str = "float32"
  dtype: str = "bfloat16"  # compute dtype; logits are always float32
  fp8: bool = False  # matmuls in fp8: e4m3 operands forward, e5m2 gradients, per-tensor scaling
  # Weights stored quantized (a frozen teacher, generation; never trained): none | fp8 (e4m3) | int8,
  # attention, dense and expert projections with float32 scales per output channel; router, norms,
  # embeddings and LM head stay in param_dtype (model/layers.py `QuantizedWeight`).
  weight_quant: str = "none"
  scan_layers: bool = True
  # Cycles per iteration of the layer scan (1: a rolled loop). Unrolling trades compile time for the
  # per-iteration slicing of stacked parameters and saved activations: on CPU, bench-moe's step is
  # faster fully unrolled (docs/PERFORMANCE.md); large models on TPU keep 1.
  scan_unroll: int = 1
  remat_policy: str = "none"
  # Key block of the memory-efficient attention (online softmax, recomputing backward) used when a
  # layer's key span (its chunk, or T for global layers) is longer (a span that is not a multiple of it
  # is padded with masked keys); 0: always the dense path.
  attention_block: int = 1024
  moe_impl: str = "auto"  # auto: ragged_dot on TPU/GPU (dense on XLA:GPU), blocked on CPU
  moe_block_size: int = 0  # rows per block of the blocked grouped matmul; 0 = automatic
  # Expert-parallel exchange (sharding/expert.py): auto = ragged (ragged_all_to_all, buffers of
  # capacity x the local routed rows, more rounds when a shard receives more) off CPU, padded on CPU.
  moe_exchange: str = "auto"
  moe_capacity: float = 2.0
  vision: VisionConfig | None = None  # early-fusion vision encoder (None: text only)

  def __post_init__(self):
    pos = (
      "vocab_size hidden_size num_layers num_heads num_kv_heads head_dim intermediate_size intermediate_size_mlp "
      "num_experts num_experts_per_tok moe_layer_step max_position_embeddings"
    ).split()
    for name in pos:
      check(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
    if self.shared_intermediate_size is None:
      object.__setattr__(self, "shared_intermediate_size", self.intermediate_size)
    check(self.shared_intermediate_size > 0, "model.shared_intermediate_size", "must be > 0")
    check(self.attention_block >= 0, "model.attention_block", f"must be >= 0, got {self.attention_block}")
    check(
      self.num_heads % self.num_kv_heads == 0,
      "model.num_heads",
      f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})",
    )
    check(self.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {self.head_dim}")
    check(
      self.num_experts_per_tok <= self.num_experts,
      "model.num_experts_per_tok",
      f"top-k ({self.num_experts_per_tok}) must be <= num_experts ({self.num_experts})",
    )
    check(
      self.attention_chunk_size is None or self.attention_chunk_size > 0,
      "model.attention_chunk_size",
      f"must be > 0 or null, got {self.attention_chunk_size}",
    )
    check(self.nope_layer_interval >= 0, "model.nope_layer_interval", "must be >= 0")
    for name in ("rms_norm_eps", "floor_scale", "rope_theta", "moe_capacity"):
      check(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
    check(self.moe_block_size >= 0, "model.moe_block_size", "must be >= 0 (0 = automatic)")
    check(self.scan_unroll >= 1, "model.scan_unroll", f"must be >= 1, got {self.scan_unroll}")
    for name in ("moe_layers", "nope_layers", "global_attn_layers"):
      layers = getattr(self, name)
      if layers is None:
        continue
      bad = [i for i in layers if not 0 <= i < self.num_layers]
      check(not bad, f"model.{name}", f"indices {bad} out of range [0, {self.num_layers})")
      check(len(set(layers)) == len(layers), f"model.{name}", "has duplicate layer indices")
      object.__setattr__(self, name, tuple(sorted(layers)))
    for name, allowed in (
      ("param_dtype", DTYPES),
      ("dtype", DTYPES),
      ("remat_policy", REMAT_POLICIES),
      ("moe_impl", MOE_IMPLS),
      ("moe_exchange", MOE_EXCHANGES),
      ("weight_quant", WEIGHT_QUANTS),
    ):
      check(getattr(self, name) in allowed, f"model.{name}", f"must be one of {allowed}, got {getattr(self, name)!r}")
    if self.vision is not None:
      v = self.vision
      # The layout ids (start/end, marker, separators) are checked where prompts are built: HF
      # config.json does not carry the separators, so tiny test vocabularies may not hold them.
      for name in ("image_token_id",):
        check(
          0 <= getattr(v, name) < self.vocab_size,
          f"model.vision.{name}",
          f"{getattr(v, name)} is outside the vocabulary [0, {self.vocab_size})",
        )

  # --- Layer pattern -------------------------------------------------------------------------
  def is_moe_layer(self, i: int) -> bool:
    if self.moe_layers is not None:
      return i in self.moe_layers
    return (i + 1) % self.moe_layer_step == 0

  def uses_rope(self, i: int) -> bool:
    if self.nope_layers is not None:
      return i not in self.nope_layers
    return self.nope_layer_interval == 0 or (i + 1) % self.nope_layer_interval != 0

  def is_chunked_layer(self, i: int) -> bool:
    if self.global_attn_layers is not None:
      return i not in self.global_attn_layers
    return self.uses_rope(i)

  def layer_kind(self, i: int) -> LayerKind:
    return LayerKind(rope=self.uses_rope(i), chunked=self.is_chunked_layer(i), moe=self.is_moe_layer(i))

  @property
  def layer_kinds(self) -> tuple[LayerKind, ...]:
    return tuple(self.layer_kind(i) for i in range(self.num_layers))

  @property
  def cycle_length(self) -> int:
    """Smallest period P with kind[i] == kind[i + P] for every layer (4 for released models)."""
    kinds = self.layer_kinds
    for p in range(1, self.num_layers + 1):
      if all(kinds[i] == kinds[i + p] for i in range(self.num_layers - p)):
        return p
    return self.num_layers

  @property
  def num_cycles(self) -> int:
    """Layer cycles stacked for the scan (0: every layer runs unscanned); layers past them form the tail."""
    n = self.num_layers // self.cycle_length if self.scan_layers else 0
    return n if n >= 2 else 0


@dataclass(frozen=True)
class LayerKind:
  rope: bool
  chunked: bool
  moe: bool


@dataclass(frozen=True)
class ParallelConfig:
  """Mesh axis sizes; -1 fills the devices left over (at most one axis). Used by `sharding/`."""

  data: int = 1
  fsdp: int = -1
  expert: int = 1
  tensor: int = 1
  context: int = 1
  num_slices: int = 1  # TPU slices (or hosts) joined over DCN
  dcn_axis: str = "data"  # the mesh axis that spans slices

  def __post_init__(self):
    sizes = {k: getattr(self, k) for k in ("data", "fsdp", "expert", "tensor", "context")}
    check(self.num_slices >= 1, "parallel.num_slices", f"must be >= 1, got {self.num_slices}")
    check(self.dcn_axis in sizes, "parallel.dcn_axis", f"must be one of {tuple(sizes)}, got {self.dcn_axis!r}")
    for name, size in sizes.items():
      check(size == -1 or size >= 1, f"parallel.{name}", f"must be >= 1 or -1, got {size}")
    check(sum(s == -1 for s in sizes.values()) <= 1, "parallel", "at most one axis may be -1")


DATA_FORMATS = ("auto", "text", "jsonl", "parquet", "arrayrecord")


@dataclass(frozen=True)
class DataConfig:
  """Input pipeline (grain). `source: builtin` is the corpus that ships with Python (pydoc topics)."""

  source: str = "builtin"  # "builtin", a file, a directory, or a glob
  format: str = "auto"  # by file extension when auto: .txt .jsonl .parquet .array_record
  text_field: str = "text"  # JSONL / Parquet / ArrayRecord (JSON records) field
  tokenizer: str = "bytes"  # "bytes" (in-repo byte tokenizer) or a path to an HF tokenizer.json
  heldout_fraction: float = 0.02  # documents held out for evaluation (deterministic split)
  shuffle_seed: int = 0
  streams: int = 0  # train: packing streams dealt the documents; each fills B/streams rows (0: one per row)
  worker_count: int = 0  # grain multiprocessing workers (0: in-process)
  prefetch: int = 2  # batches prefetched ahead of the step
  # Multimodal (model.vision set): see behemoth_jax/data/multimodal.py.
  max_tiles_per_row: int = 8  # image tiles a packed row may hold (pixel_values is [B, this, 3, S, S])
  video_frames: int = 8  # frames sampled from each video, evenly spread over the clip

  def __post_init__(self):
    check(self.format in DATA_FORMATS, "data.format", f"must be one of {DATA_FORMATS}, got {self.format!r}")
    check(0 < self.heldout_fraction < 1, "data.heldout_fraction", "must be in (0, 1)")
    for name in ("worker_count", "prefetch", "streams"):
      check(getattr(self, name) >= 0, f"data.{name}", f"must be >= 0, got {getattr(self, name)}")
    check(self.max_tiles_per_row >= 1, "data.max_tiles_per_row", f"must be >= 1, got {self.max_tiles_per_row}")
    check(self.video_frames >= 1, "data.video_frames", f"must be >= 1, got {self.video_frames}")


@dataclass(frozen=True)
class TrainConfig:
  seed: int = 0
  batch_size: int = 8  # global, in sequences per optimizer step (after accumulation)
  seq_len: int = 256
  steps: int = 100
  grad_accum: int = 1  # micro-batches per step
  learning_rate: float = 3e-3
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  warmup_steps: int = 10
  weight_decay: float = 0.1  # on weight matrices and embedding tables; not on scales, biases, 1-D params
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  # Adam's moments as stored: "auto" in the parameters' dtype (optax.adamw), "fp8" e4m3 with a float32
  # scale per row (1 byte each per parameter: train/optim.py), for the smallest training state.
  adam_moments: str = "auto"
  grad_clip: float = 1.0  # global norm; 0 disables
  layerwise_update: bool = False  # the optimizer inside the backward scan: no whole gradient (train/layerwise.py)
  layerwise_clip: str = "exact"  # its clipping: exact (a norm pass first) | previous (the last norm, mostly)
  moe_aux_loss: float = 0.0  # load-balancing loss weight (off: matches HF numerics)
  router_z_loss: float = 0.0
  ce_chunk: int = 8192  # vocabulary chunk of the cross-entropy (never all logits at once)
  eval_batches: int = 8
  log_every: int = 10
  out_dir: str = "runs/tiny"  # checkpoints, TensorBoard events, metrics.jsonl
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  init_from: str | None = None  # orbax checkpoint (e.g. from behemoth-convert) for initial parameters
  # A non-finite loss or gradient norm always skips that update (counted); "skip" logs it and goes on,
  # "halt" stops the run with exit status 3 (the last checkpoint holds no skipped-over damage).
  on_nonfinite: str = "skip"

  def __post_init__(self):
    for name in (
      "batch_size",
      "seq_len",
      "steps",
      "grad_accum",
      "ce_chunk",
      "eval_batches",
      "log_every",
      "checkpoint_every",
      "keep_checkpoints",
    ):
      check(getattr(self, name) > 0, f"train.{name}", f"must be > 0, got {getattr(self, name)}")
    check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    check(
      self.batch_size % self.grad_accum == 0,
      "train.batch_size",
      f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})",
    )
    why = f"needs train.grad_accum 1 (got {self.grad_accum}): accumulation needs the whole gradient"
    check(not (self.layerwise_update and self.grad_accum > 1), "train.layerwise_update", why)
    check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    check(self.on_nonfinite in ("skip", "halt"), "train.on_nonfinite", f"must be skip or halt: {self.on_nonfinite!r}")
    check(self.adam_moments in ("auto", "fp8"), "train.adam_moments", f"must be auto or fp8: {self.adam_moments!r}")
    check(self.layerwise_clip in ("exact", "previous"), "train.layerwise_clip", "must be exact or previous")


DISTILL_WEIGHTS = ("none", "fixed", "scheduled", "dynamic", "relative")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "bf16", "fp8", "int8")


@dataclass(frozen=True)
class DistillConfig:
  """Distillation from a frozen teacher (README "Distillation"): loss = (1 − w)·CE + w·τ²·KL."""

  teacher: str | None = None  # orbax checkpoint of the teacher (a step dir or a train.py run dir)
  teacher_config: str | None = None  # the teacher's YAML config (its model section); default: the student's
  topk: int = 0  # > 0: offline targets — data.source is a JSONL from `generate --score K` (K >= topk)
  # none | fixed (α) | scheduled (α·(1 − step/steps), the default: the most robust across the regimes
  # of docs/DISTILLATION.md) | dynamic (per token: α·(1 − (max p_T − p_T(label)))) | relative (per token:
  # α·p_T(label) / (p_T(label) + p_S(label)))
  weight: str = "scheduled"
  alpha: float = 1.0  # the soft weight (fixed), its start (scheduled) or its scale (dynamic)
  temperature: float = 1.0
  # How the online teacher's weights are held: auto (its config's param_dtype) | float32 | bfloat16
  # (bf16) | fp8 | int8 (bf16 everywhere else, projections and experts quantized with per-channel
  # scales: model.weight_quant), converted from its checkpoint weight by weight on its shards.
  teacher_dtype: str = "auto"

  def __post_init__(self):
    check(self.weight in DISTILL_WEIGHTS, "distill.weight", f"must be one of {DISTILL_WEIGHTS}, got {self.weight!r}")
    check(0 <= self.alpha <= 1, "distill.alpha", f"must be in [0, 1], got {self.alpha}")
    check(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")
    check(self.topk >= 0, "distill.topk", f"must be >= 0, got {self.topk}")
    check(
      self.teacher_dtype in TEACHER_DTYPES,
      "distill.teacher_dtype",
      f"must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}",
    )
    check(
      not (self.topk and self.teacher),
      "distill.topk",
      "offline top-k targets and an online teacher (distill.teacher) exclude each other",
    )


@dataclass(frozen=True)
class Config:
  model: ModelConfig = field(default_factory=ModelConfig)
  parallel: ParallelConfig = field(default_factory=ParallelConfig)
  train: TrainConfig = field(default_factory=TrainConfig)
  data: DataConfig = field(default_factory=DataConfig)
  distill: DistillConfig = field(default_factory=DistillConfig)


# --- Loading -----------------------------------------------------------------------------------
def check(ok: bool, name: str, rule: str) -> None:
  """Raises ConfigError(f"{name}: {rule}") unless `ok`."""
  if not ok:
    raise ConfigError(f"{name}: {rule}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
  """Checks `value` against the annotation `tp`; converts lists to tuples and dicts to dataclasses."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own message names the inner field
      return _coerce(value, options[0], name)
    for arg in options:
      try:
        return _coerce(value, arg, name)
      except ConfigError:
        pass
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"{name}: expected a mapping, got {value!r}")
    try:
      return _build(tp, value, name)
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(f"{name}: {e}") from None
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{name}: expected a list, got {value!r}")
    (elem, _) = typing.get_args(tp)
    return tuple(_coerce(v, elem, f"{name}[{i}]") for i, v in enumerate(value))
  if tp is float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{name}: expected a number, got {value!r}")
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{name}: expected an integer, got {value!r}")
    return value
  if tp in (bool, str):
    if not isinstance(value, tp):
      raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}")
    return value
  raise TypeError(f"unsupported config annotation {tp}")


def _type_name(tp: Any) -> str:
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  for key in data:
    if key not in names:
      where = f"{prefix}.{key}" if prefix else key
      raise ConfigError(f"{where}: unknown key (valid: {', '.join(sorted(names))})")
  kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
  return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
  keys = dotted.split(".")
  for k in keys[:-1]:
    node = tree.setdefault(k, {})
    if not isinstance(node, dict):
      raise ConfigError(f"{dotted}: {k} is not a section")
    tree = node
  tree[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
  tree: dict = {}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"{item}: override must look like section.key=value")
    key, raw = item.split("=", 1)
    _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
  return tree


def _merge(base: dict, extra: dict) -> dict:
  out = dict(base)
  for k, v in extra.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
  """Loads a YAML config (sections model / parallel / train) and applies `key=value` overrides."""
  data: dict = {}
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise ConfigError(f"{path}: config file not found")
    try:
      data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
      raise ConfigError(f"{path}: top level must be a mapping of sections")
  data = _merge(data, parse_overrides(overrides or []))
  return _build(Config, data)


def to_dict(cfg: Any) -> dict:
  """Plain-data view of a config (tuples as lists), loadable again by `load_config`."""

  def conv(v):
    if dataclasses.is_dataclass(v):
      return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
    return list(conv(x) for x in v) if isinstance(v, tuple) else v

  return conv(cfg)
