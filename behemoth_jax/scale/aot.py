"""Ahead-of-time compilation for a TPU slice or a GPU cluster on any machine, without the hardware
(TPU: libtpu, `pip install -e ".[tpu]"`; NVIDIA GPU: the CUDA PJRT plugin, `pip install -e ".[gpu-compile]"`).

`train.py --compile-topology v5p-1024` compiles the real train step (the trainer's own state
shardings, `make_train_step` and batch layout) for the chips of that slice, without TPU hardware, and
reports XLA's per-chip memory analysis against the chip's HBM; with `distill.teacher_config` it is the
online distillation step (frozen teacher forward + student train step; no checkpoint needed).
`python -m behemoth_jax.memory --prefill N [--score K] --compile-topology` does the same for a prefill
(serving) step or `generate --score`'s scoring pass. One report for all.

Names follow Cloud TPU: v4-N and v5p-N count TensorCores (2 per chip, so v5p-1024 is 512 chips);
v5e-N and v6e-N count chips. One jax device per chip (megacore). GPU clusters are NODESxGPUS:
h100-4x8 is 4 nodes of 8 H100 SXM GPUs (NVLink inside a node, the network across), compiled for the
target configs in scale/gpus/ (written from NVIDIA's published facts). Devices are numbered node by
node and the mesh axes are laid out in `sharding.rules.MESH_AXES` order (data, fsdp, expert, context,
tensor), so the trailing axes — tensor, context, expert — stay inside a node as far as they fit and
data / fsdp run across nodes; `parallel.num_slices=NODES parallel.dcn_axis=fsdp` makes that explicit.
XLA's GPU compiler does not refuse a program larger than the GPU's memory, so the fit is decided here:
XLA's peak against 95% of the memory the CUDA runtime reports (GPU_MEM_FRACTION: a run sets
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; the rest is the CUDA context, cuBLAS / NCCL workspaces).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding

from behemoth_jax.chips import CHIPS, Chip
from behemoth_jax.config import Config, ConfigError, ModelConfig
from behemoth_jax.infer.engine import cache_sharding
from behemoth_jax.infer.generate import decode_step, prefill, score_step
from behemoth_jax.model.attention import ATTENTION_SCOPES, PROJECTIONS
from behemoth_jax.model.cost import analytic_forward_flops
from behemoth_jax.model.kernels import ATTENTION_CORE
from behemoth_jax.platforms import user_platforms
from behemoth_jax.scale.collectives import bytes_along, bytes_by_kind
from behemoth_jax.scale.flops import in_scope, matmuls
from behemoth_jax.scale.params import count_params
from behemoth_jax.train.batch import batch_specs
from behemoth_jax.train.state import abstract_sharded_model, abstract_train_state, teacher_model_config, unquantized
from behemoth_jax.train.step import (
  analytic_train_flops,
  make_optimizer,
  make_schedule,
  make_train_step,
)
from sharding import axes as ax
from sharding.api import logical_to_spec, per_device_bytes, use_mesh
from sharding.mesh import make_mesh


@dataclass(frozen=True)
class Topology:
  name: str
  chip: Chip
  chips: int  # per slice
  shape: tuple[int, ...]
  num_slices: int

  @property
  def gpu(self) -> bool:
    return self.chip.gpu_target is not None

  @property
  def unit(self) -> str:
    return "GPU" if self.gpu else "chip"

  @property
  def devices(self) -> list:
    if self.gpu:
      return _gpu_devices(self)
    kw = {"chip_config_name": "megacore"} if self.chip.dims == 3 else {}
    kw["chips_per_host_bounds"] = (min(2, self.shape[0]), min(2, self.shape[1]), 1)  # one host: 2x2x1 chips
    if self.num_slices > 1:
      kw["num_slices"] = self.num_slices
    # libtpu looks for a TPU VM's metadata unless told what it is; the requested topology wins.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU is opened
    desc = topologies.get_topology_desc(
      topology_name=f"{self.chip.tpu_generation}:{'x'.join(map(str, self.shape))}", platform="tpu", **kw
    )
    return list(desc.devices)

  def describe(self) -> str:
    if self.gpu:
      nodes, per = self.shape
      return f"{self.name}: {nodes} node{'s' * (nodes > 1)} x {per} {self.chip.device_kind} = {self.chips} GPUs"
    s = f"{self.name}: {self.chips} chips ({'x'.join(map(str, self.shape))} {self.chip.device_kind})"
    return s + (f" x {self.num_slices} slices" if self.num_slices > 1 else "")


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape Cloud TPU uses for a power-of-two chip count: as cubic (square) as possible,
  ascending (v5p-1024 → 8x8x8, v5p-2048 → 8x8x16, v5e-256 → 16x16), with a 1 last (v5p-8 → 2x2x1)."""
  shape = [1] * dims
  for _ in range(chips.bit_length() - 1):
    shape[shape.index(min(shape))] *= 2
  shape.sort()
  return tuple(shape[1:] + shape[:1]) if shape[0] == 1 and dims == 3 else tuple(shape)


GPU_MAX_PER_NODE = 8  # HGX / DGX nodes: 8 GPUs on one NVLink switch
# The share of a GPU's memory a step may use: run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (jax's default
# 0.75 leaves a quarter unused); the rest is the CUDA context, cuBLAS / NCCL workspaces and fragmentation.
GPU_MEM_FRACTION = 0.95


def _gpu_devices(topo: Topology) -> list:
  """The devices of a GPU cluster, from the plugin's deviceless topology and our target config."""
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    raise ConfigError(
      f"--compile-topology {topo.name}: compiling for NVIDIA GPUs needs the CUDA compiler plugin: "
      "pip install -e '.[gpu-compile]'"
    )
  target = (Path(__file__).parent / "gpus" / topo.chip.gpu_target).read_text()
  nodes, per = topo.shape
  desc = topologies.get_topology_desc(platform="cuda", target_config=target, topology=f"1x{nodes}x{per}")
  return list(desc.devices)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  g = re.fullmatch(r"(h100|h200)-(\d+)x(\d+)", name.strip().lower())
  if g:
    nodes, per = int(g.group(2)), int(g.group(3))
    if nodes < 1 or not 1 <= per <= GPU_MAX_PER_NODE:
      raise ConfigError(f"--compile-topology: {name}: NODESxGPUS needs at least 1 node of 1 to {GPU_MAX_PER_NODE} GPUs")
    if num_slices != 1:
      raise ConfigError(
        "--num-slices: for a GPU cluster, lay an axis across nodes with parallel.num_slices=NODES "
        "parallel.dcn_axis=fsdp instead"
      )
    return Topology(name, CHIPS[g.group(1)], nodes * per, (nodes, per), 1)
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
  if not m:
    raise ConfigError(
      f"--compile-topology: {name!r} is not a TPU slice like v5p-1024, v4-128, v5e-256, v6e-64 "
      "or a GPU cluster NODESxGPUS like h100-8x8, h200-32x8"
    )
  chip = CHIPS[m.group(1)]
  n = int(m.group(2))
  if n % chip.cores_per_chip_in_name:
    raise ConfigError(f"--compile-topology: {name}: {m.group(1)}-N counts TensorCores (2 per chip); N must be even")
  chips = n // chip.cores_per_chip_in_name
  if chips < (4 if chip.dims == 3 else 1) or chips & (chips - 1):
    raise ConfigError(
      f"--compile-topology: {name}: {chips} chips; slices here are powers of two of at least "
      f"{4 if chip.dims == 3 else 1} chips"
    )
  if num_slices < 1:
    raise ConfigError(f"--num-slices: must be >= 1, got {num_slices}")
  return Topology(name, chip, chips, _torus_shape(chips, chip.dims), num_slices)


def for_tpu(cfg: Config) -> Config:
  """The config as it runs on TPU or GPU: the MoE grouped matmul resolves to `ragged_dot` (native
  there) even though this process's default backend is the CPU."""
  return dataclasses.replace(cfg, model=for_tpu_model(cfg.model))


def for_tpu_model(mc: ModelConfig) -> ModelConfig:
  return dataclasses.replace(mc, moe_impl="ragged") if mc.moe_impl == "auto" else mc


@dataclass
class MemoryReport:
  arguments: int
  outputs: int
  aliased: int  # outputs written over donated arguments
  temporaries: int
  generated_code: int
  peak: int  # XLA's own peak estimate for the program

  @classmethod
  def of(cls, compiled) -> MemoryReport:
    m = compiled.memory_analysis()
    return cls(
      m.argument_size_in_bytes,
      m.output_size_in_bytes,
      m.alias_size_in_bytes,
      m.temp_size_in_bytes,
      m.generated_code_size_in_bytes,
      getattr(m, "peak_memory_in_bytes", 0),
    )

  @property
  def total(self) -> int:
    """XLA's peak of live buffers (what its fit check uses: a program whose sum of arguments and
    temporary allocations exceeds HBM can still fit, since not all temporaries live at once)."""
    return self.peak or self.arguments + self.outputs - self.aliased + self.temporaries


def gib(n: float) -> str:
  return f"{n / 2**30:,.2f} GiB"


def compile_report(lowered, topo: Topology) -> tuple[MemoryReport | None, str | None, object]:
  """(memory, None, compiled) or (None, one-line reason, None) when XLA says it does not fit."""
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA's RESOURCE_EXHAUSTED: the program needs more HBM than the chip has
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
      raise
    m = re.search(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", text)
    unit = lambda u: f" {u}iB" if u else " bytes"  # XLA's human-readable sizes are binary
    reason = (
      f"needs {m.group(1)}{unit(m.group(2))} per chip, the chip has {m.group(3)}{unit(m.group(4))}"
      if m
      else text.strip().splitlines()[0][:300]
    )
    return None, reason, None
  return MemoryReport.of(compiled), None, compiled


def for_target(cfg: Config, topo: Topology) -> tuple[Config, ModelConfig | None]:
  """(the train config as it runs on `topo`, the online-distillation teacher's model config or None)."""
  if cfg.distill.topk:
    raise ConfigError("distill.topk: offline distillation steps are not compiled here (compile the student alone)")
  # Online distillation: the teacher's config is enough (no checkpoint is read to compile).
  teacher_cfg = for_tpu_model(teacher_model_config(cfg)) if cfg.distill.teacher or cfg.distill.teacher_config else None
  cfg = for_tpu(cfg)
  if not topo.gpu and topo.num_slices != cfg.parallel.num_slices:
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, num_slices=topo.num_slices))
  return cfg, teacher_cfg


def lower_train_step(cfg: Config, mesh, teacher_cfg: ModelConfig | None = None):
  """(lowered program, abstract train state, abstract teacher or None) of `cfg`'s real train step on
  `mesh`: train.py's state shardings, step function and batch layout, with online distillation's frozen
  teacher placed by the same rules table when `teacher_cfg` is given."""
  tc = cfg.train
  tx, schedule = make_optimizer(tc), make_schedule(tc)
  graphdef, abstract = abstract_train_state(cfg, mesh, tx)
  distill, teacher = None, ()
  if teacher_cfg is not None:
    t_graphdef, t_abstract, _ = abstract_sharded_model(teacher_cfg, mesh)
    distill, teacher = (cfg.distill, t_graphdef), (t_abstract,)
  step = jax.jit(
    make_train_step(graphdef, tx, tc, schedule, distill),
    donate_argnums=0,
    out_shardings=(jax.tree.map(lambda a: a.sharding, abstract), None),
  )
  with use_mesh(mesh), jax.default_matmul_precision("default"):  # TPU kernels take bf16 operands as bf16
    lowered = step.lower(abstract, batch_specs(cfg, mesh), *teacher)
  return lowered, abstract, teacher[0] if teacher else None


def compile_train_step(cfg: Config, topology: str, num_slices: int = 1, name: str = "") -> int:
  """Compiles `cfg`'s real train step (train.py's state shardings, step function and batch layout)
  for a TPU slice on this machine; prints the mesh, FLOPs and per-chip memory; 0 if it fits, 1 if not."""
  topo = parse_topology(topology, num_slices)
  cfg, teacher_cfg = for_target(cfg, topo)
  mc, tc = cfg.model, cfg.train
  t0 = time.perf_counter()
  mesh = make_mesh(cfg.parallel, topo.devices)
  exchange = "ragged" if mc.moe_exchange == "auto" else mc.moe_exchange  # (off CPU: sharding/expert.py)
  print(f"compiling the train step of {name or 'the model'} for {topo.describe()}")
  print(
    f"  mesh {dict(mesh.shape)}; batch {tc.batch_size} x {tc.seq_len} tokens "
    f"(grad_accum {tc.grad_accum}); dtypes: params {mc.param_dtype}, compute {mc.dtype}"
    f"{', fp8 matmuls' if mc.fp8 else ''}; remat {mc.remat_policy}; moe {mc.moe_impl}"
    f"{f', {exchange} exchange' if mesh.shape['expert'] > 1 else ''}; Adam moments {tc.adam_moments}"
    f"{', optimizer layer by layer in the backward' if tc.layerwise_update else ''}"
  )
  lowered, abstract, t_abstract = lower_train_step(cfg, mesh, teacher_cfg)
  if teacher_cfg is not None:
    held = teacher_cfg.weight_quant if teacher_cfg.weight_quant != "none" else teacher_cfg.param_dtype
    print(
      f"  teacher: {teacher_cfg.num_layers} layers, {count_params(unquantized(teacher_cfg))['total']:,} "
      f"parameters held as "
      f"{held}: {gib(per_device_bytes(t_abstract))} per {topo.unit} (frozen: forward only, no optimizer state)"
    )
  mem, reason, compiled = compile_report(lowered, topo)
  if compiled is not None and topo.gpu:
    print(f"  matmul FLOPs by operand type (compiled GEMMs, loops by trip count): {matmul_shares(compiled.as_text())}")
  if compiled is not None:
    hlo = compiled.as_text()
    print(f"  collectives per {topo.unit} per step (compiled, loops by trip count): {collective_bytes(hlo)}")
    _context_report(compiled, mesh)
    try:
      got, chips = hlo_matmul_flops(hlo), topo.chips * topo.num_slices
      must, runs = program_flops(cfg, teacher_cfg)
      print(
        f"  matmul FLOPs per {topo.unit} per step (compiled, loops by trip count): {got:.4g}; "
        f"{got * chips / analytic_train_flops(mc, tc.batch_size, tc.seq_len):.3f} x the analytic 3 x forward"
        f"{' (student)' if teacher_cfg else ''}, {got * chips / must:.3f} x what this step must run ({runs})"
      )
      print(f"  {attention_flops(hlo, cfg, topo.chips * topo.num_slices)}")
    except ValueError as e:  # a loop of unknown trip count
      print(f"  matmul FLOPs per {topo.unit}: not counted ({e})")
  flops = analytic_train_flops(mc, tc.batch_size, tc.seq_len)
  if teacher_cfg is not None:  # + the teacher's forward (a third of its train FLOPs)
    flops += analytic_train_flops(teacher_cfg, tc.batch_size, tc.seq_len) / 3
  chips, peak = topo.chips * topo.num_slices, topo.chip.peak_bf16_flops
  print(
    f"  {'student ' if teacher_cfg else ''}parameters {count_params(mc)['total']:,}; train state (params + "
    f"optimizer) per {topo.unit} {gib(per_device_bytes(abstract))}"
  )
  print(
    f"  FLOPs per step {flops:.4g} (analytic, 3 x forward{' + teacher forward' if teacher_cfg else ''}), "
    f"per {topo.unit} {flops / chips:.4g}; at 100% of the "
    f"bf16 peak ({peak / 1e12:.0f} TFLOP/s per {topo.unit}) a step takes {flops / chips / peak:.2f} s, at 50% "
    f"{2 * flops / chips / peak:.2f} s"
  )
  return _fits(
    mem,
    reason,
    topo,
    t0,
    f"outputs {gib(mem.outputs) if mem else ''} "
    f"({gib(mem.aliased) if mem else ''} of them written over donated arguments)",
  )


def hlo_matmul_flops(hlo: str) -> float:
  return sum(m.flops for m in matmuls(hlo))


def matmul_shares(hlo: str) -> str:
  """ "f8 97.1%, bf16 2.5%, f32 0.4%": each operand type's share of the program's matmul FLOPs (a
  GEMM reading one f8 and one e5m2 operand is f8; one with any wider operand counts as the widest)."""
  by = {}
  for m in matmuls(hlo):
    kind = "f8" if all(t.startswith("f8") for t in m.dtypes) else max(m.dtypes, key=_width)
    by[kind] = by.get(kind, 0.0) + m.flops
  total = sum(by.values()) or 1.0
  return ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))


def collective_bytes(hlo: str) -> str:
  """ "all-gather 1.2 GiB, reduce-scatter 0.6 GiB, ...": bytes each chip moves per step by kind
  (`scale.collectives`: ring-algorithm bytes per member), or why they could not be counted."""
  try:
    by = bytes_by_kind(hlo)
  except (ValueError, KeyError) as e:  # an HLO form the reader does not know: say so, keep the report
    return f"not counted ({e})"
  return ", ".join(f"{k} {gib(v)}" for k, v in by.items() if v) or "none"


def _reruns(cfg: Config) -> tuple[bool, bool]:
  """(the layers' forward runs twice: full remat or the layer-by-layer update; the layer-by-layer
  update's clipping runs a backward pass of its own, the norm pass)."""
  tc = cfg.train
  return cfg.model.remat_policy == "full" or tc.layerwise_update, tc.layerwise_update and tc.grad_clip > 0


def program_flops(cfg: Config, teacher_cfg: ModelConfig | None = None) -> tuple[float, str]:
  """The matmul FLOPs a train step of `cfg` must run on the whole slice, analytically, and what they hold:
  3 x the forward (`cost.analytic_forward_flops`: active parameters, causal attention), plus what the
  implementation and configuration run again: the chunked loss's backward recomputes each vocabulary
  chunk's logits (the LM head's forward once more: it never holds all logits); FlashAttention's backward
  recomputes the scores (0.5 x attention's forward); full remat and the layer-by-layer update run the
  layers' forward a second time (not the LM head's); the layer-by-layer update's exact clipping runs the
  layers' backward once more (its norm pass: 3 x the layers' forward + 3.5 x attention; with `previous` it
  sits under a cond and counts as if it ran, as `flops.walk` counts it); an online teacher's forward.
  `dots` remat policies save the matmuls' outputs: counted as recomputing none."""
  mc, tc = cfg.model, cfg.train
  fwd = analytic_forward_flops(mc, tc.batch_size, tc.seq_len)
  head = 2.0 * mc.hidden_size * mc.vocab_size * tc.batch_size * tc.seq_len
  layers, attention = fwd["matmul_params"] - head, fwd["attention"]
  total = 3 * (layers + head + attention) + head + 0.5 * attention
  runs = ["3 x forward", "the chunked loss's logits", "FlashAttention's scores"]
  remat, norm_pass = _reruns(cfg)
  if remat:
    total += layers + attention
    runs.append("the layers' second forward")
  if norm_pass:
    total += 3 * layers + 3.5 * attention
    runs.append("the norm pass")
  if teacher_cfg is not None:
    total += sum(analytic_forward_flops(teacher_cfg, tc.batch_size, tc.seq_len).values())
    runs.append("the teacher's forward")
  return total, " + ".join(runs)


def attention_flops(hlo: str, cfg: Config, chips: int) -> str:
  """Attention's scores and values matmuls per chip (compiled, `kernels.ATTENTION_CORE`'s scope) against
  the causal count (`cost.analytic_forward_flops`: each query's visible keys only) times what the
  program runs of it: forward 1, FlashAttention's recomputing backward 2.5 (5 matmuls to the forward's
  2), full remat's second forward 1 (also the layer-by-layer update's), and the layer-by-layer update's
  norm pass for clipping 3.5 (with `previous` it is under a cond, counted as if it ran)."""
  mc, tc = cfg.model, cfg.train
  got = sum(m.flops for m in matmuls(hlo) if in_scope(m.op_name, ATTENTION_CORE))
  causal = analytic_forward_flops(mc, tc.batch_size, tc.seq_len)["attention"] / chips
  remat, norm_pass = _reruns(cfg)
  times = (4.5 if remat else 3.5) + (3.5 if norm_pass else 0)
  runs = f"forward, {'remat, ' if remat else ''}FlashAttention's backward{', the norm pass' if norm_pass else ''}"
  return (
    f"attention's scores and values matmuls per chip per step (compiled): {got:.4g}, {got / (times * causal):.3f} x "
    f"the causal count x {times} ({runs})"
  )


def context_attention_bytes(hlo: str, mesh) -> str:
  """What attention moves over `context` per chip per step, by layer kind (model/attention.py's scopes):
  keys and values (and their gradients), then the projections' own traffic along context alone
  (attention.PROJECTIONS: weights sharded over context, windowed einsums). Chunked layers move no keys
  or values when every context shard holds whole chunks and positions are 0..T-1 (packed documents
  restart their positions: a shard then needs the previous chunk's keys, docs/SCALE.md)."""
  scopes = (ATTENTION_SCOPES[True], ATTENTION_SCOPES[False])
  axis = list(mesh.axis_names).index("context")
  try:
    kv = bytes_along(hlo, tuple(mesh.devices.shape), axis, scopes, exclude=PROJECTIONS)
    every = bytes_along(hlo, tuple(mesh.devices.shape), axis, scopes)
  except (ValueError, KeyError) as e:
    return f"attention over context: not counted ({e})"
  parts = []
  for scope, label in zip(scopes, ("chunked layers", "global layers"), strict=True):
    kinds = ", ".join(f"{k} {gib(v)}" for k, v in kv[scope].items() if v)
    moved, proj = sum(kv[scope].values()), sum(every[scope].values()) - sum(kv[scope].values())
    parts.append(f"{label} {gib(moved)}" + (f" ({kinds})" if kinds else "") + f" + projections {gib(proj)}")
  return "attention's keys and values moved along context (and their gradients): " + "; ".join(parts)


def _context_report(compiled, mesh) -> None:
  if compiled is not None and mesh.shape["context"] > 1:
    print(f"  {context_attention_bytes(compiled.as_text(), mesh)}")


def _width(dtype: str) -> int:
  m = re.search(r"(\d+)", dtype)
  return int(m.group(1)) if m else 0


def compile_prefill(cfg: Config, tokens: int, topology: str | None, num_slices: int = 1, score: int = 0) -> int:
  """Compiles a batch-1 prefill of `tokens` tokens (generation's: prompt → KV caches + next-token
  logits) for a TPU slice, the sequence split over `parallel.context`; prints per-chip memory; 0 if it fits.
  `score` K > 0: the scoring program of `generate --score K` instead (hidden states → the top-K
  log-probs of every position, over vocabulary chunks)."""
  if topology is None:
    raise ConfigError("--prefill needs --compile-topology (a TPU slice to compile for)")
  topo = parse_topology(topology, num_slices)
  cfg = for_tpu(cfg)
  t0 = time.perf_counter()
  mesh = make_mesh(cfg.parallel, topo.devices)
  what = f"top-{score} scoring pass" if score else "prefill"
  print(
    f"compiling a {tokens:,}-token {what} of {cfg.model.num_layers}-layer model for {topo.describe()}; "
    f"mesh {dict(mesh.shape)}"
  )
  graphdef, abstract, _ = abstract_sharded_model(cfg.model, mesh)

  def sharded(shape, logical, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(logical, mesh, shape)))

  ids = sharded((1, tokens), (None, ax.LENGTH), jnp.int32)
  mask = sharded((1, tokens), (None, ax.LENGTH), jnp.int32)
  if score:
    topk = NamedSharding(mesh, logical_to_spec((None, ax.LENGTH, None), mesh, (1, tokens, score)))
    step = score_step(graphdef, score, out_shardings=(topk, topk))
    with use_mesh(mesh), jax.default_matmul_precision("default"):
      lowered = step.lower(abstract, ids, None)
    mem, reason, compiled = compile_report(lowered, topo)
    _context_report(compiled, mesh)
    print(f"  weights per {topo.unit} {gib(per_device_bytes(abstract))}")
    return _fits(mem, reason, topo, t0, f"outputs (top-{score} ids and log-probs) {gib(mem.outputs) if mem else ''}")
  caches = jax.eval_shape(
    lambda p: prefill(graphdef, p, jnp.zeros((1, tokens), jnp.int32), jnp.ones((1, tokens), jnp.int32), None, tokens)[
      1
    ],
    abstract,
  )

  shard = partial(cache_sharding, mesh, batch=None)  # one prompt: S over context

  out_shardings = (None, jax.tree.map(shard, caches), None)
  step = jax.jit(lambda p, i, m: prefill(graphdef, p, i, m, None, tokens), out_shardings=out_shardings)
  with use_mesh(mesh), jax.default_matmul_precision("default"):  # TPU kernels take bf16 operands as bf16
    lowered = step.lower(abstract, ids, mask)
  mem, reason, compiled = compile_report(lowered, topo)
  _context_report(compiled, mesh)
  print(
    f"  weights per {topo.unit} {gib(per_device_bytes(abstract))}; KV caches "
    f"{gib(sum(c.size * c.dtype.itemsize for c in jax.tree.leaves(caches)))} in all"
  )
  return _fits(mem, reason, topo, t0, f"outputs (KV caches, logits) {gib(mem.outputs) if mem else ''}")


def compile_decode(cfg: Config, slots: int, context: int, topology: str | None, num_slices: int = 1) -> int:
  """Compiles one decode step of `slots` sequences (generation's continuous batch) against KV caches of
  `context` tokens each for a TPU slice / GPU cluster: the weights as `model.weight_quant` holds them
  (fp8 / int8 with per-channel scales), slots over the batch axes, the caches' length over `context`;
  prints per-device memory; 0 if it fits."""
  if topology is None:
    raise ConfigError("--decode needs --compile-topology (a TPU slice or GPU cluster to compile for)")
  topo = parse_topology(topology, num_slices)
  cfg = for_tpu(cfg)
  t0 = time.perf_counter()
  mesh = make_mesh(cfg.parallel, topo.devices)
  held = cfg.model.weight_quant if cfg.model.weight_quant != "none" else cfg.model.param_dtype
  print(
    f"compiling a decode step of {slots} slots x {context:,}-token caches of a {cfg.model.num_layers}-layer model "
    f"(weights {held}) for {topo.describe()}; mesh {dict(mesh.shape)}"
  )
  graphdef, abstract, _ = abstract_sharded_model(cfg.model, mesh)
  model = nnx.merge(graphdef, abstract)  # abstract: only shapes are read
  caches = jax.eval_shape(lambda: model.init_cache(slots, context))

  shard = partial(cache_sharding, mesh)  # slots over the batch axes, S over context
  cache_specs = jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape, c.dtype, sharding=shard(c)), caches)
  slot = NamedSharding(mesh, logical_to_spec((ax.BATCH,), mesh, (slots,)))
  tokens = jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=slot)
  decode = lambda p, c, t, pos: decode_step(graphdef, p, c, t, pos)  # noqa: E731
  # The caches come out as they go in, but for a static flag in their pytree (decoding has begun).
  out_caches = jax.eval_shape(decode, abstract, caches, tokens, tokens)[1]
  step = jax.jit(decode, out_shardings=(None, jax.tree.map(shard, out_caches)), donate_argnums=1)
  with use_mesh(mesh), jax.default_matmul_precision("default"):
    lowered = step.lower(abstract, cache_specs, tokens, tokens)
  mem, reason, compiled = compile_report(lowered, topo)
  _context_report(compiled, mesh)
  print(
    f"  weights per {topo.unit} {gib(per_device_bytes(abstract))}; KV caches "
    f"{gib(sum(c.size * c.dtype.itemsize for c in jax.tree.leaves(caches)))} in all, "
    f"{gib(per_device_bytes(cache_specs))} per {topo.unit}"
  )
  return _fits(
    mem,
    reason,
    topo,
    t0,
    f"outputs (next-token logits, caches) {gib(mem.outputs) if mem else ''} "
    f"({gib(mem.aliased) if mem else ''} of them written over the donated caches)",
  )


def _fits(mem: MemoryReport | None, reason: str | None, topo: Topology, t0: float, outputs: str) -> int:
  """The report's last lines, one for both programs: 1 (with XLA's reason) if it does not fit, else 0."""
  if mem is None:
    print(f"  DOES NOT FIT on {topo.chip.device_kind}: {reason} [{time.perf_counter() - t0:.0f}s]")
    return 1
  hbm = topo.chip.hbm_bytes
  if topo.gpu:  # XLA:GPU compiles a program of any size (libtpu refuses it itself): decided here
    hbm = int(hbm * GPU_MEM_FRACTION)
    if mem.total > hbm:
      print(
        f"  DOES NOT FIT on {topo.chip.device_kind}: needs {gib(mem.total)} per GPU (XLA's peak: arguments "
        f"{gib(mem.arguments)}, temporaries {gib(mem.temporaries)}), the GPU has {gib(hbm)} usable "
        f"({GPU_MEM_FRACTION:.0%} of {gib(topo.chip.hbm_bytes)}) [{time.perf_counter() - t0:.0f}s]"
      )
      return 1
  print(
    f"  per {topo.unit}: arguments {gib(mem.arguments)}, {outputs}, temporaries {gib(mem.temporaries)}, "
    f"code {gib(mem.generated_code)}"
  )
  print(
    f"  peak {gib(mem.total)} of {gib(hbm)} {'usable memory' if topo.gpu else 'HBM'} ({mem.total / hbm:.0%}; "
    "XLA's live-buffer peak): fits "
    f"[{time.perf_counter() - t0:.0f}s]"
  )
  return 0


def compile_only_host() -> None:
  """This process compiles for another machine: start no accelerator backend here (the user's
  JAX_PLATFORMS wins). Before jax starts its backends."""
  if not user_platforms():
    jax.config.update("jax_platforms", "cpu")
