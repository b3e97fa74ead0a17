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

N is the size of the instruction's replica groups (explicit `{{0,1},{2,3}}` or iota `[2,2]<=[4]`
lists; an empty list is every device of the module).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from behemoth_jax.scale.flops import _ARRAY_SHAPE, _operands, walk

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16})
_ARRAY = re.compile(r"([a-z]\w*)\[([^\]]*)\]")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{(\{[\d,\s]*\}(?:\s*,\s*\{[\d,\s]*\})*)?\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,\s]+)\]<=")
_DEVICES = re.compile(r"\b(num_partitions|replica_count)=(\d+)")


@dataclass(frozen=True)
class Collective:
  name: str  # the HLO instruction
  kind: str  # one of KINDS
  group: int  # members of each replica group
  operand_bytes: int  # of one execution, on one chip
  bytes: float  # per chip per execution of the module, loops counted (see the module doc)


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
  base = opcode.removesuffix("-start")
  return base if base in KINDS and not opcode.endswith("-done") else None


def _group_size(rest: str, devices: int) -> int:
  iota = _IOTA_GROUPS.search(rest)
  if iota is not None:
    return int(iota.group(1).split(",")[-1])
  explicit = _EXPLICIT_GROUPS.search(rest)
  if explicit is not None and explicit.group(1):
    return len(re.findall(r"\d+", explicit.group(1).split("}")[0]))
  return devices


def _operand_bytes(rest: str, shapes: dict[str, str]) -> int:
  total = 0
  for operand in _operands(rest):
    operand = re.sub(r"/\*.*?\*/", "", operand).strip()  # `/*index=5*/%x`: the printer's comments
    if _ARRAY_SHAPE.match(operand):
      total += array_bytes(operand.rsplit(" ", 1)[0])
    else:
      total += array_bytes(shapes[operand.split()[-1].lstrip("%")])
  return total


def collectives(hlo: str) -> list[Collective]:
  """Every collective of an optimized HLO module, with its bytes per chip (module doc)."""
  found = dict(_DEVICES.findall(hlo.split("\n", 1)[0]))
  devices = int(found.get("num_partitions", 1)) * int(found.get("replica_count", 1))
  out = []
  for (name, _, opcode, rest), times, shapes in walk(hlo):
    kind = _kind(opcode)
    if kind is None:
      continue
    n = _group_size(rest, devices)
    b = _operand_bytes(rest, shapes)
    per_chip = {
      "all-gather": (n - 1) * b,
      "reduce-scatter": (n - 1) / n * b,
      "all-reduce": 2 * (n - 1) / n * b,
      "all-to-all": (n - 1) / n * b,
      "collective-permute": b,
    }[kind]
    out.append(Collective(name, kind, n, b, per_chip * times))
  return out


def bytes_by_kind(hlo: str) -> dict[str, float]:
  """{kind: bytes per chip per execution} of an optimized HLO module, every kind listed."""
  total = defaultdict(float, {k: 0.0 for k in KINDS})
  for c in collectives(hlo):
    total[c.kind] += c.bytes
  return dict(total)
