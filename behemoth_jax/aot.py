"""Ahead-of-time compilation for a TPU topology on any machine (libtpu: `pip install -e ".[tpu]"`).

`train.py --compile-topology v5p-1024` compiles the real train step (train.py's own state shardings,
`make_train_step`, batch layout) for the chips of that slice, without TPU hardware, and reports XLA's
per-chip memory analysis against the chip's HBM. `python -m behemoth_jax.memory --compile-topology`
does the same for a prefill (serving) step.

Names follow Cloud TPU: v4-N and v5p-N count TensorCores (2 per chip, so v5p-1024 is 512 chips);
v5e-N and v6e-N count chips. One jax device per chip (megacore).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from behemoth_jax.config import Config, ConfigError


@dataclass(frozen=True)
class Chip:
  generation: str  # libtpu's topology prefix
  device_kind: str
  hbm_bytes: int  # usable HBM per chip: the largest buffer libtpu accepts (measured, libtpu 0.0.42)
  peak_bf16_flops: float  # dense, per chip (vendor figures)
  cores_per_chip_in_name: int  # v4-N / v5p-N count TensorCores
  dims: int  # torus dimensions


CHIPS = {
    "v4": Chip("v4", "TPU v4", 33_013_592_064, 275e12, 2, 3),
    "v5p": Chip("v5", "TPU v5", 102_802_796_544, 459e12, 2, 3),
    "v5e": Chip("v5e", "TPU v5 lite", 16_908_767_232, 197e12, 1, 2),
    "v6e": Chip("v6e", "TPU v6 lite", 33_549_930_496, 918e12, 1, 2),
}


@dataclass(frozen=True)
class Topology:
  name: str
  chip: Chip
  chips: int  # per slice
  shape: tuple[int, ...]
  num_slices: int

  @property
  def devices(self) -> list:
    from jax.experimental import topologies

    kw = {"chip_config_name": "megacore"} if self.chip.dims == 3 else {}
    kw["chips_per_host_bounds"] = (min(2, self.shape[0]), min(2, self.shape[1]), 1)  # one host: 2x2x1 chips
    if self.num_slices > 1:
      kw["num_slices"] = self.num_slices
    # libtpu looks for a TPU VM's metadata unless told what it is; the requested topology wins.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU is opened
    desc = topologies.get_topology_desc(topology_name=f"{self.chip.generation}:{'x'.join(map(str, self.shape))}",
                                        platform="tpu", **kw)
    return list(desc.devices)

  def describe(self) -> str:
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


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
  if not m:
    raise ConfigError(f"--compile-topology: {name!r} is not a TPU slice name like v5p-1024, v4-128, v5e-256, v6e-64")
  chip = CHIPS[m.group(1)]
  n = int(m.group(2))
  if n % chip.cores_per_chip_in_name:
    raise ConfigError(f"--compile-topology: {name}: {m.group(1)}-N counts TensorCores (2 per chip); N must be even")
  chips = n // chip.cores_per_chip_in_name
  if chips < (4 if chip.dims == 3 else 1) or chips & (chips - 1):
    raise ConfigError(f"--compile-topology: {name}: {chips} chips; slices here are powers of two of at least "
                      f"{4 if chip.dims == 3 else 1} chips")
  if num_slices < 1:
    raise ConfigError(f"--num-slices: must be >= 1, got {num_slices}")
  return Topology(name, chip, chips, _torus_shape(chips, chip.dims), num_slices)


def for_tpu(cfg: Config) -> Config:
  """The config as it runs on TPU: the MoE grouped matmul resolves to `ragged_dot` (native there)
  even though this process's default backend is the CPU."""
  if cfg.model.moe_impl == "auto":
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe_impl="ragged"))
  return cfg


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
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes,
               m.generated_code_size_in_bytes, getattr(m, "peak_memory_in_bytes", 0))

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
    reason = (f"needs {m.group(1)}{unit(m.group(2))} per chip, the chip has {m.group(3)}{unit(m.group(4))}" if m
              else text.strip().splitlines()[0][:300])
    return None, reason, None
  return MemoryReport.of(compiled), None, compiled


def train_batch_specs(cfg: Config, mesh) -> dict:
  """Abstract global batch, sharded as train.py's `to_global` shards it."""
  from sharding import axes as ax
  from sharding.api import logical_to_spec

  b, t = cfg.train.batch_size, cfg.train.seq_len

  def sds(shape, dtype):
    logical = (ax.BATCH, ax.LENGTH) if len(shape) == 2 else (ax.BATCH,) + (None,) * (len(shape) - 1)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(logical, mesh, shape)))

  batch = {k: sds((b, t), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = sds((b, t), jnp.float32)
  vc = cfg.model.vision
  if vc is not None:
    batch["pixel_values"] = sds((b, cfg.data.max_tiles_per_row, vc.num_channels, vc.image_size, vc.image_size),
                                jnp.float32)
  return batch


def per_device_bytes(abstract) -> int:
  """Bytes one device holds of an abstract sharded tree (ShapeDtypeStructs with shardings)."""
  total = 0
  for leaf in jax.tree.leaves(abstract):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def compile_prefill(cfg: Config, tokens: int, topology: str | None, num_slices: int = 1) -> int:
  """Compiles a batch-1 prefill of `tokens` tokens (generate.py's: prompt → KV caches + next-token
  logits) for a TPU slice, the sequence split over `parallel.context`; prints per-chip memory; 0 if it fits."""
  import time

  from behemoth_jax.generate import _prefill
  from behemoth_jax.memory import kv_cache_bytes
  from sharding import axes as ax
  from sharding.api import abstract_sharded_model, logical_to_spec, use_mesh
  from sharding.mesh import make_mesh

  if topology is None:
    raise ConfigError("--prefill needs --compile-topology (a TPU slice to compile for)")
  topo = parse_topology(topology, num_slices)
  cfg = for_tpu(cfg)
  t0 = time.perf_counter()
  mesh = make_mesh(cfg.parallel, topo.devices)
  print(f"compiling a {tokens:,}-token prefill of {cfg.model.num_layers}-layer model for {topo.describe()}; "
        f"mesh {dict(mesh.shape)}")
  graphdef, abstract, _ = abstract_sharded_model(cfg.model, mesh)

  def sharded(shape, logical, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, logical_to_spec(logical, mesh, shape)))

  ids = sharded((1, tokens), (None, ax.LENGTH), jnp.int32)
  mask = sharded((1, tokens), (None, ax.LENGTH), jnp.int32)
  caches = jax.eval_shape(lambda p: _prefill(graphdef, p, jnp.zeros((1, tokens), jnp.int32),
                                             jnp.ones((1, tokens), jnp.int32), None, tokens)[1], abstract)

  def cache_sharding(leaf):  # keys/values [.., B, S, K, H] and positions [.., B, S]: S over context
    lead = (None,) * (leaf.ndim - (4 if leaf.ndim >= 4 else 2))
    logical = lead + ((None, ax.LENGTH, ax.KV_HEADS, None) if leaf.ndim >= 4 else (None, ax.LENGTH))
    if leaf.ndim < 2:
      logical = (None,) * leaf.ndim
    return NamedSharding(mesh, logical_to_spec(logical, mesh, leaf.shape))

  out_shardings = (None, jax.tree.map(cache_sharding, caches), None)
  step = jax.jit(lambda p, i, m: _prefill(graphdef, p, i, m, None, tokens), out_shardings=out_shardings)
  with use_mesh(mesh), jax.default_matmul_precision("default"):  # TPU kernels take bf16 operands as bf16
    lowered = step.lower(abstract, ids, mask)
  mem, reason, _ = compile_report(lowered, topo)
  weights = per_device_bytes(abstract)
  cache_total = kv_cache_bytes(cfg, tokens)
  print(f"  weights per chip {gib(weights)}; KV cache {gib(cache_total)} in all")
  if mem is None:
    print(f"  DOES NOT FIT on {topo.chip.device_kind}: {reason} [{time.perf_counter() - t0:.0f}s]")
    return 1
  print(f"  per chip: arguments {gib(mem.arguments)}, outputs (KV caches, logits) {gib(mem.outputs)}, "
        f"temporaries {gib(mem.temporaries)}, code {gib(mem.generated_code)}")
  print(f"  peak {gib(mem.total)} of {gib(topo.chip.hbm_bytes)} HBM ({mem.total / topo.chip.hbm_bytes:.0%}): fits "
        f"[{time.perf_counter() - t0:.0f}s]")
  return 0
