"""Mesh planner: the meshes that divide a model on a slice, which fit, and which is fastest, from
programs compiled for that slice.

  python -m behemoth_jax.plan --config configs/scout.yaml --topology v5p-16 train.batch_size=8 train.seq_len=8192
  python -m behemoth_jax.plan --config configs/behemoth.yaml --topology v5p-512 --compile 4 \\
      train.batch_size=32 train.seq_len=8192
  python -m behemoth_jax.plan --config configs/maverick.yaml --topology v5p-64 --num-slices 2 ...

1. Enumerate every data × fsdp × expert × context × tensor that multiplies to the slice's chips (times
   --num-slices, the DCN axis `parallel.dcn_axis` divisible by it) and divides the model: experts by
   expert, heads and KV heads by tensor, the sequence by context, the (micro-)batch by data × fsdp ×
   expert (the rules table's batch axes).
2. Prune with the memory calculator (`python -m behemoth_jax.memory`): a mesh whose estimate exceeds
   the chip's memory by more than PRUNE_MARGIN is not compiled. Rank the rest by a pre-compile guess
   (`_guess`: analytic FLOPs and a bytes model of the ZeRO-3 gathers, gradient reductions, expert
   exchange, context gathers and tensor all-reduces; it only orders what to compile).
3. AOT-compile the `--compile` most promising (train.py's real train step, as `--compile-topology`),
   and read from each program: XLA's peak memory per chip; matmul FLOPs per chip, loops counted by trip
   count (`scale.flops`); collective bytes per chip by kind, ICI and DCN apart (`scale.collectives`).
4. Estimate the step time by a roofline: the largest of compute (compiled matmul FLOPs / the chip's
   bf16 peak), ICI (ICI bytes / ring bandwidth) and DCN (DCN bytes / the chip's share of its host's
   NICs). The maximum, not the sum, because XLA schedules collectives asynchronously beside compute
   (latency-hiding scheduler; windowed einsums for fsdp) so each resource can be busy the whole step;
   the estimate is a lower bound that says which resource binds. A ring collective along one mesh axis
   uses the two ports of one torus dimension, so the ICI ring bandwidth is the chip's ICI bandwidth /
   its torus dimensions (v5p: 600 / 3 = 200 GB/s); on GPUs NVLink's switch gives each GPU its whole
   bandwidth. Not modelled: HBM bandwidth (elementwise work, attention's softmax), collective latency,
   imperfect overlap, load imbalance of the routed experts.

Rows are ranked by the estimate among the meshes that fit; the last line is the best mesh as
`parallel.*=` overrides. Exit status 1 with one line when nothing fits, 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from behemoth_jax.cli import ArgumentParser
from behemoth_jax.config import Config, ConfigError, load_config
from behemoth_jax.scale import aot
from behemoth_jax.scale.collectives import KINDS, bytes_by_link
from behemoth_jax.scale.memory import BYTES, GiB, train_estimate
from behemoth_jax.scale.params import count_params
from behemoth_jax.train.step import analytic_train_flops
from sharding.mesh import ShardingError, make_mesh
from sharding.rules import BATCH_AXES, MESH_AXES

PRUNE_MARGIN = 0.10  # the calculator is fitted to within ~10% of compiled peaks (docs/SCALE.md)
SHORT = dict(zip(KINDS, ("ag", "rs", "ar", "a2a", "cp"), strict=True))


@dataclass
class Row:
  sizes: dict[str, int]
  estimate_gib: float  # the calculator's
  guess_s: tuple[float, float]  # pre-compile ranking only: (roofline guess, its communication part)
  peak_gib: float | None = None  # XLA's; None when it does not fit (libtpu refused it)
  fits: bool = False
  reason: str = ""
  flops: float = 0.0  # matmul FLOPs per chip per step, compiled
  links: dict | None = None  # {(link, kind): bytes per chip per step}
  seconds: dict | None = None  # compute / ICI / DCN / estimate

  @property
  def name(self) -> str:
    return " ".join(f"{a[0]}{self.sizes[a]}" for a in MESH_AXES)

  def overrides(self) -> str:
    return " ".join(f"parallel.{a}={self.sizes[a]}" for a in MESH_AXES)


def _factorizations(n: int, k: int):
  """Every k-tuple of positive integers whose product is n."""
  if k == 1:
    yield (n,)
    return
  for d in range(1, n + 1):
    if n % d == 0:
      for rest in _factorizations(n // d, k - 1):
        yield (d, *rest)


def meshes(cfg: Config, devices: int) -> list[dict[str, int]]:
  """The mesh shapes of `devices` devices that divide `cfg`'s model and batch (module doc, step 1)."""
  mc, tc, par = cfg.model, cfg.train, cfg.parallel
  micro = tc.batch_size // tc.grad_accum
  out = []
  for shape in _factorizations(devices, len(MESH_AXES)):
    s = dict(zip(MESH_AXES, shape, strict=True))
    if (mc.num_experts or 1) % s["expert"] or mc.num_heads % s["tensor"] or mc.num_kv_heads % s["tensor"]:
      continue
    if tc.seq_len % s["context"] or micro % math.prod(s[a] for a in BATCH_AXES):
      continue
    if par.num_slices > 1 and s[par.dcn_axis] % par.num_slices:
      continue
    out.append(s)
  return out


def with_mesh(cfg: Config, sizes: dict[str, int]) -> Config:
  return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **sizes))


def _guess(cfg: Config, sizes: dict[str, int], topo: aot.Topology, counts: dict[str, int]) -> tuple[float, float]:
  """A pre-compile step-time guess (seconds): (max(analytic FLOPs per chip / peak, modelled collective
  bytes per chip / ICI ring bandwidth), the second of them, which breaks ties among compute-bound meshes).
  Orders the meshes to compile; never printed as a result. `counts`: `count_params(cfg.model)`."""
  mc, tc = cfg.model, cfg.train
  d, f, e, c, t = (sizes[a] for a in MESH_AXES)
  n = d * f * e * c * t
  wb, ab = BYTES[mc.param_dtype], BYTES[mc.dtype]
  experts, dense = counts["routed_experts"] * wb, (counts["total"] - counts["routed_experts"]) * wb
  g_dense, g_experts = f * c * e, f * c  # the axes that split D (rules: EMBED) in each kind of weight
  zero3 = 4 * (dense / t * (g_dense - 1) / g_dense + experts / (e * t) * (g_experts - 1) / g_experts)
  grads = 2 * (d - 1) / d * (dense / (t * g_dense) + experts / (e * t * g_experts))
  tokens = tc.batch_size * tc.seq_len / (d * f * e * c)
  layers = mc.num_layers
  moe_layers = sum(mc.layer_kind(i).moe for i in range(layers))
  # Dispatch and combine in forward, recompute and backward: the ragged exchange (TPU / GPU) moves the
  # routed rows, the padded one expert x them (sharding/expert.py).
  rows = tokens * mc.num_experts_per_tok * (e if mc.moe_exchange == "padded" else 1)
  exchange = moe_layers * 3 * 2 * rows * mc.hidden_size * ab * (e - 1) / e
  kv = layers * 3 * 2 * tc.batch_size / (d * f * e) * tc.seq_len * mc.num_kv_heads / t * mc.head_dim * ab
  context = kv * (c - 1) / c
  tensor = layers * 4 * 2 * tokens * mc.hidden_size * ab * 2 * (t - 1) / t
  comm = zero3 + grads + exchange + context + tensor
  flops = analytic_train_flops(mc, tc.batch_size, tc.seq_len) / n
  comm_s = comm / _ring_bandwidth(topo)
  return max(flops / topo.chip.peak_bf16_flops, comm_s), comm_s


def _ring_bandwidth(topo: aot.Topology) -> float:
  """Bytes/s one chip puts into a ring collective along one mesh axis (module doc, step 4)."""
  return topo.chip.ici_bytes_per_s / (1 if topo.gpu else topo.chip.dims)


def _unit_of(mesh, topo: aot.Topology, devices: list):
  """Device id in the program (its position in mesh.devices.flat) -> its TPU slice or GPU node
  (`devices`: the topology's, numbered node by node)."""
  flat = list(mesh.devices.flat)
  if topo.gpu:
    node = {d.id: i // topo.shape[1] for i, d in enumerate(devices)}
    units = [node[d.id] for d in flat]
  else:
    units = [getattr(d, "slice_index", 0) for d in flat]
  return units.__getitem__


def compile_row(row: Row, cfg: Config, teacher_cfg, topo: aot.Topology) -> None:
  """Compiles `row`'s mesh and fills its compiled columns (module doc, steps 3 and 4)."""
  cfg = with_mesh(cfg, row.sizes)
  devices = topo.devices  # built from libtpu / the CUDA plugin at each access
  mesh = make_mesh(cfg.parallel, devices)
  lowered, _, _ = aot.lower_train_step(cfg, mesh, teacher_cfg)
  mem, reason, compiled = aot.compile_report(lowered, topo)
  if mem is None:
    row.reason = reason
    return
  limit = topo.chip.hbm_bytes * (aot.GPU_MEM_FRACTION if topo.gpu else 1)
  row.peak_gib, row.fits = mem.total / GiB, mem.total <= limit
  hlo = compiled.as_text()
  try:
    row.flops = aot.hlo_matmul_flops(hlo)
  except ValueError as e:  # a loop of unknown trip count: fall back to the analytic count, say so
    row.flops = analytic_train_flops(cfg.model, cfg.train.batch_size, cfg.train.seq_len) / mesh.size
    row.reason = f"matmul FLOPs analytic ({e})"
  row.links = bytes_by_link(hlo, _unit_of(mesh, topo, devices), topo.num_slices)
  ici = sum(v for (link, _), v in row.links.items() if link == "ICI")
  dcn = sum(v for (link, _), v in row.links.items() if link == "DCN")
  s = {
    "compute": row.flops / topo.chip.peak_bf16_flops,
    "ICI": ici / _ring_bandwidth(topo),
    "DCN": dcn / topo.chip.dcn_bytes_per_s if dcn else 0.0,
  }
  s["estimate"] = max(s.values())
  row.seconds = s


def _bytes(row: Row, link: str) -> str:
  parts = [f"{SHORT[k]} {row.links[link, k] / GiB:.3g}" for k in KINDS if row.links.get((link, k))]
  return ", ".join(parts) or "0"


def table(rows: list[Row], topo: aot.Topology) -> str:
  unit = topo.unit
  head = (
    f"| mesh (d f e c t) | calculator GiB/{unit} | XLA peak GiB/{unit} | fits | matmul TFLOP/{unit} | "
    f"ICI GiB/{unit} by kind | DCN GiB/{unit} by kind | compute s | ICI s | DCN s | estimate s |"
  )
  lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
  for r in rows:
    if r.seconds is None:
      lines.append(f"| {r.name} | {r.estimate_gib:.3g} | - | no: {r.reason} | | | | | | | |")
      continue
    s = r.seconds
    lines.append(
      f"| {r.name} | {r.estimate_gib:.3g} | {r.peak_gib:.3g} | {'yes' if r.fits else 'no'} | {r.flops / 1e12:.3g} | "
      f"{_bytes(r, 'ICI')} | {_bytes(r, 'DCN')} | {s['compute']:.3g} | {s['ICI']:.3g} | {s['DCN']:.3g} | "
      f"{s['estimate']:.3g} |"
    )
  return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
  """`fsdp=2,expert=16,context=8` -> every mesh axis's size (unnamed axes 1)."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for part in filter(None, text.split(",")):
    axis, _, value = part.partition("=")
    if axis.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ConfigError(f"--also: {part!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)}")
    sizes[axis.strip()] = int(value)
  return sizes


def plan(
  cfg: Config, topology: str, num_slices: int, compile_count: int, also: tuple = (), progress: bool = True
) -> tuple[list, str]:
  """(rows compiled, ranked: fitting ones by estimate first; a one-line summary of what was pruned).
  `also`: meshes compiled besides the most promising (a hand-picked one to compare with)."""
  topo = aot.parse_topology(topology, num_slices)
  cfg, teacher_cfg = aot.for_target(cfg, topo)
  devices = topo.chips * topo.num_slices
  shapes = meshes(cfg, devices)
  if not shapes:
    raise ConfigError(
      f"--topology {topology}: no mesh of {devices} devices divides the model and batch "
      f"(experts {cfg.model.num_experts}, heads {cfg.model.num_heads}/{cfg.model.num_kv_heads}, "
      f"seq_len {cfg.train.seq_len}, batch {cfg.train.batch_size})"
    )
  hbm = topo.chip.hbm_bytes * (aot.GPU_MEM_FRACTION if topo.gpu else 1)
  counts = count_params(cfg.model)
  rows, over = [], 0
  for sizes in tqdm(shapes, desc="calculator", unit="mesh", disable=None if progress else True, leave=False):
    try:
      est = train_estimate(with_mesh(cfg, sizes), devices).total
    except (ConfigError, ShardingError):
      continue
    if est > hbm * (1 + PRUNE_MARGIN):
      over += 1
      continue
    rows.append(Row(sizes, est / GiB, _guess(cfg, sizes, topo, counts)))
  summary = (
    f"{len(shapes)} meshes divide the model on {devices} {topo.unit}s; {over} pruned by the calculator "
    f"(estimate > {1 + PRUNE_MARGIN:.2f} x {hbm / GiB:.2f} GiB)"
  )
  rows.sort(key=lambda r: r.guess_s)
  rows = rows[:compile_count]
  for sizes in also:
    if math.prod(sizes.values()) != devices:
      raise ConfigError(f"--also: mesh {sizes} has {math.prod(sizes.values())} devices, the slice {devices}")
    if all(r.sizes != sizes for r in rows):
      est = train_estimate(with_mesh(cfg, sizes), devices).total
      rows.append(Row(sizes, est / GiB, _guess(cfg, sizes, topo, counts)))
  for i, row in enumerate(rows):
    t0 = time.perf_counter()
    if progress:
      print(f"compiling {i + 1}/{len(rows)}: {row.overrides()} ...", file=sys.stderr, flush=True)
    compile_row(row, cfg, teacher_cfg, topo)
    if progress:
      print(f"  {'fits' if row.fits else 'does not fit'} [{time.perf_counter() - t0:.0f}s]", file=sys.stderr)
  rows.sort(key=lambda r: (not r.fits, r.seconds["estimate"] if r.seconds else math.inf))
  return rows, summary


def main(argv: list[str] | None = None) -> int:
  p = ArgumentParser(
    prog="python -m behemoth_jax.plan",
    description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  p.add_argument("--config", default="configs/tiny.yaml")
  p.add_argument("--topology", required=True, metavar="SLICE", help="TPU slice (v5p-512) or GPU cluster (h200-4x8)")
  p.add_argument("--num-slices", type=int, default=1, help="TPU slices joined over DCN (parallel.dcn_axis spans them)")
  p.add_argument("--compile", type=int, default=3, metavar="N", help="compile the N most promising meshes (default 3)")
  p.add_argument(
    "--also",
    action="append",
    default=[],
    metavar="MESH",
    help="also compile this mesh, e.g. fsdp=2,expert=16,context=8 (repeatable): a hand-picked one to compare",
  )
  p.add_argument("overrides", nargs="*", help="section.key=value config overrides (parallel.* are chosen here)")
  args = p.parse_args(argv)
  if args.compile < 1:
    p.error("--compile: must be >= 1")
  aot.compile_only_host()
  try:
    cfg = load_config(args.config, args.overrides)
    also = tuple(parse_mesh(m) for m in args.also)
    rows, summary = plan(cfg, args.topology, args.num_slices, args.compile, also)
  except (ConfigError, ShardingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  topo = aot.parse_topology(args.topology, args.num_slices)
  also = f" (with {len(args.also)} given by --also)" if args.also else ""
  print(f"{args.config} on {topo.describe()}: {summary}; compiled {len(rows)}{also}")
  if not rows:
    print("nothing fits: every mesh's calculator estimate exceeds the memory", file=sys.stderr)
    return 1
  print(table(rows, topo))
  best = next((r for r in rows if r.fits), None)
  if best is None:
    print(f"nothing fits: none of the {len(rows)} compiled meshes fits (try --compile more)", file=sys.stderr)
    return 1
  print(best.overrides())
  return 0
