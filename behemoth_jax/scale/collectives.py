"""Bytes each chip moves through collectives in one execution of a compiled XLA program.

Read from the optimized HLO text (`compiled.as_text()`), every loop counted by its trip count
(`flops.walk`), one record per collective instruction (the `-start` of an async pair). Bytes per chip
are what one member of a group of N puts on its links with ring algorithms, the convention of NCCL's
"bus bandwidth" (a per-chip link time is bytes / link bandwidth):

| kind | bytes per chip |
|---|---|
| all-gather | (N − 1) × operand bytes (the local shard each member receives from the others) |
| reduce-scatter | (N − 1) / N × operand bytes (the whole array in, one shard out) |
| all-reduce | 2 (N − 1) / N × operand bytes (a reduce-scatter, then an all-gather) |
| all-to-all | (N − 1) / N × operand bytes (all but its own slice leave each chip) |
| collective-permute | operand bytes (sent once to its target) |
| ragged-all-to-all (as all-to-all) | (N − 1) / N × the smaller of its input and output arrays |

A ragged all-to-all moves as many rows as the routing sends (sharding/expert.py): the smaller of its
input and output buffers is the rows under balanced routing (the routed rows on the way out, the
rows' results on the way back), an estimate, not a bound.

N is the size of the instruction's replica groups (explicit `{{0,1},{2,3}}`, iota `[2,2]<=[4]`, or
libtpu's `mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`: devices along the named axes; an empty list is every
device of the module). Given where each device sits (`unit_of`: its TPU
slice, or its GPU node), a collective whose groups span two units is counted as DCN (between slices or
nodes), any other as ICI (inside a slice, or NVLink inside a node). Ids are positions in the program's
device assignment, which for a jitted program over a mesh is `mesh.devices.flat`. A collective-permute's
pairs are its groups.

Programs compiled for several TPU slices (multislice) hold one slice's program: their collectives
between slices are host transfers to the megascale runtime, a `send` tagged
`_xla_megascale_transfer_type` (ALL_REDUCE, ALL_GATHER, ALL_TO_ALL, REDUCE_SCATTER, ONE_TO_ONE), counted
here as DCN with a group of `slices` members (the `recv` of the pair is not counted again).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from behemoth_jax.scale.flops import _ARRAY_SHAPE, _operands, walk

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16})
_ARRAY = re.compile(r"([a-z]\w*)\[([^\]]*)\]")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{(\{[\d,\s]*\}(?:\s*,\s*\{[\d,\s]*\})*)?\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,\s]+)\]<=\[([\d,\s]+)\](?:T\(([\d,\s]+)\))?")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_MEGASCALE_KINDS = {
  "ALL_REDUCE": "all-reduce",
  "ALL_GATHER": "all-gather",
  "ALL_TO_ALL": "all-to-all",
  "REDUCE_SCATTER": "reduce-scatter",
  "ONE_TO_ONE": "collective-permute",
}
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_DEVICES = re.compile(r"\b(num_partitions|replica_count)=(\d+)")


@dataclass(frozen=True)
class Collective:
  name: str  # the HLO instruction
  kind: str  # one of KINDS
  group: int  # members of each replica group
  operand_bytes: int  # of one execution, on one chip
  bytes: float  # per chip per execution of the module, loops counted (see the module doc)
  link: str = "ICI"  # "DCN" when a group spans slices (or GPU nodes), given where devices sit
  groups: tuple[tuple[int, ...], ...] = ()  # replica groups (device ids), as the instruction gives them
  op_name: str = ""  # jax's name stack (named scopes: the layer kinds' attention, the MoE exchange)


def array_bytes(shape: str) -> int:
  """Bytes of every array in a shape text (`f32[8,128]{1,0}`, or a tuple of them)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype.startswith("f8"):
      size = 1
    elif dtype in _BYTES:
      size = _BYTES[dtype]
    else:
      raise ValueError(f"unknown element type {dtype!r} in {shape!r}")
    total += size * math.prod(int(d.replace("<=", "")) for d in dims.split(",") if d.strip())
  return int(total)


def _kind(opcode: str) -> str | None:
  base = opcode.removesuffix("-start").removeprefix("ragged-")
  return base if base in KINDS and not opcode.endswith("-done") else None


def _ints(text: str) -> list[int]:
  return [int(x) for x in re.findall(r"\d+", text)]


def _groups(rest: str, devices: int) -> list[list[int]]:
  """The instruction's replica groups (or a collective-permute's source-target pairs) as device ids."""
  iota = _IOTA_GROUPS.search(rest)
  if iota is not None:  # [G,S]<=[dims]T(perm): iota over dims, transposed, reshaped to G groups of S
    ids = np.arange(math.prod(_ints(iota.group(2)))).reshape(_ints(iota.group(2)))
    if iota.group(3):
      ids = ids.transpose(_ints(iota.group(3)))
    return ids.reshape(-1, _ints(iota.group(1))[-1]).tolist()
  by_mesh = _MESH_GROUPS.search(rest)
  if by_mesh is not None:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: ids laid out row-major, groups along the named axes
    axes = re.findall(r"'(\w+)'\s*=\s*(\d+)", by_mesh.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    along = [names.index(a) for a in re.findall(r"'(\w+)'", by_mesh.group(2))]
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    ids = ids.transpose([i for i in range(len(sizes)) if i not in along] + along)
    return ids.reshape(-1, math.prod(sizes[i] for i in along)).tolist()
  pairs = _PAIRS.search(rest)
  if pairs is not None:
    return [_ints(p) for p in re.findall(r"\{\d+,\d+\}", pairs.group(1))]
  explicit = _EXPLICIT_GROUPS.search(rest)
  if explicit is not None and explicit.group(1):
    return [_ints(g) for g in re.findall(r"\{[\d,\s]*\}", explicit.group(1))]
  return [list(range(devices))]


def _operand_bytes(rest: str, shapes: dict[str, str], nth: int | None = None) -> int:
  """Bytes of the instruction's operands (only the nth, if given)."""
  total = 0
  operands = _operands(rest)
  for operand in operands if nth is None else operands[nth : nth + 1]:
    if _ARRAY_SHAPE.match(operand):
      total += array_bytes(operand.rsplit(" ", 1)[0])
    else:
      total += array_bytes(shapes[operand.split()[-1].lstrip("%")])
  return total


def _per_chip(kind: str, n: int, b: float) -> float:
  return {
    "all-gather": (n - 1) * b,
    "reduce-scatter": (n - 1) / n * b,
    "all-reduce": 2 * (n - 1) / n * b,
    "all-to-all": (n - 1) / n * b,
    "collective-permute": b,
  }[kind]


def collectives(hlo: str, unit_of: Callable[[int], int] | None = None, slices: int = 1) -> list[Collective]:
  """Every collective of an optimized HLO module, with its bytes per chip (module doc); `unit_of(id)`
  (the slice or node of a device id) sorts them into ICI and DCN; `slices`: a multislice program's."""
  found = dict(_DEVICES.findall(hlo.split("\n", 1)[0]))
  devices = int(found.get("num_partitions", 1)) * int(found.get("replica_count", 1))
  out = []
  for (name, _, opcode, rest), times, shapes, _ in walk(hlo):
    megascale = _MEGASCALE.search(rest) if opcode == "send" else None
    if megascale is not None:  # between slices, through the host (module doc)
      kind = _MEGASCALE_KINDS.get(megascale.group(1))
      if kind is None:
        raise ValueError(f"unknown megascale transfer {megascale.group(1)!r} in {name!r}")
      b = _operand_bytes(rest, shapes, nth=0)
      out.append(Collective(name, kind, slices, b, _per_chip(kind, max(slices, 2), b) * times, "DCN"))
      continue
    kind = _kind(opcode)
    if kind is None:
      continue
    groups = _groups(rest, devices)
    n = 2 if kind == "collective-permute" else len(groups[0])
    if opcode.startswith("ragged-"):
      b = min(_operand_bytes(rest, shapes, nth=i) for i in (0, 1))  # input and output arrays (module doc)
    else:
      b = _operand_bytes(rest, shapes)
    crosses = unit_of is not None and any(len({unit_of(i) for i in g}) > 1 for g in groups)
    op_name = _OP_NAME.search(rest)
    link, ids = "DCN" if crosses else "ICI", tuple(tuple(g) for g in groups)
    out.append(
      Collective(name, kind, n, b, _per_chip(kind, n, b) * times, link, ids, op_name.group(1) if op_name else "")
    )
  return out


def bytes_by_kind(hlo: str) -> dict[str, float]:
  """{kind: bytes per chip per execution} of an optimized HLO module, every kind listed."""
  total = defaultdict(float, {k: 0.0 for k in KINDS})
  for c in collectives(hlo):
    total[c.kind] += c.bytes
  return dict(total)


def bytes_by_link(hlo: str, unit_of: Callable[[int], int], slices: int = 1) -> dict[tuple[str, str], float]:
  """{(link, kind): bytes per chip per execution}, link "ICI" or "DCN" (module doc), nonzero ones only."""
  total = defaultdict(float)
  for c in collectives(hlo, unit_of, slices):
    total[c.link, c.kind] += c.bytes
  return {k: v for k, v in total.items() if v}


def bytes_along(
  hlo: str, mesh_shape: tuple[int, ...], axis: int, scopes: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> dict[str, dict[str, float]]:
  """{scope: {kind: bytes per chip per execution}} of the collectives that run along mesh axis `axis`
  only (every group's members differ in that coordinate alone; device ids are positions in the mesh's
  row-major devices) and whose name stack holds the named scope, but none of `exclude`. Over `context`,
  inside attention, excluding the projections (attention.PROJECTIONS: weights gathered over context
  alone, windowed einsums' partial products): the keys and values a layer kind moves."""
  total = {scope: defaultdict(float) for scope in scopes}
  for c in collectives(hlo):
    coords = [np.array(np.unravel_index(g, mesh_shape)) for g in c.groups]
    varying = {a for xs in coords for a in range(len(mesh_shape)) if len(set(xs[a])) > 1}
    if varying != {axis}:
      continue
    parts = c.op_name.split(":")  # XLA's combiners join the names of the collectives they merge
    if any(x in p for x in exclude for p in parts):
      continue
    for scope in scopes:
      if all(scope in p for p in parts):  # (a merge of other layers' weight gradients is not this scope's)
        total[scope][c.kind] += c.bytes
  return {scope: dict(v) for scope, v in total.items()}
