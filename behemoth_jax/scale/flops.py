"""Honest matmul FLOP counts for compiled XLA programs.

Why this exists: ``compiled.cost_analysis()["flops"]`` counts the body of a
``while`` loop (what ``jax.lax.scan`` lowers to) only ONCE, whatever its trip
count.  Measured with jax 0.10.2 on CPU: a scan of 10 matmuls
``[128,256] @ [256,256]`` reports 16.7M flops instead of the true 167.8M.  Our
models scan over layers and the MoE grouped matmul scans over blocks, so the
built-in number is useless for MFU.

:func:`compiled_flops` instead walks the optimized HLO text
(``compiled.as_text()``) and sums the FLOPs of every ``dot`` and
``convolution`` (and cuBLAS gemm custom-calls, which is what dots become on
GPU), multiplying each by the trip counts of all enclosing while loops.  Trip
counts come from the while op's backend config, which XLA prints as e.g.
``backend_config={..."known_trip_count":{"n":"10"}}``.

This is MATMUL FLOPs ONLY: elementwise ops, reductions, softmax etc. are
ignored, matching the analytic 2*M*K*N formulas used for MFU.  Other
custom-calls (e.g. cuDNN convolutions / fused attention) are not counted.
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import re
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jax

from sharding.expert import ROUND_LOOPS

# `%name (params) -> shape {` or `ENTRY %name (params) -> shape {`
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
# `[ROOT] %name = <shape> opcode(` ; the shape is parsed separately (may be a tuple).
_INSTR_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_ARRAY_SHAPE = re.compile(r"[a-z]\w*\[([^\]]*)\]")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_CALLEE_ATTRS = re.compile(
  r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
  r"branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP_COUNT = re.compile(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)')
_RAGGED_KERNEL = re.compile(r'custom_call_target="tpu_custom_call".*op_name="ragged-dot-(?!metadata)')
_GEMM_TARGET = re.compile(r'custom_call_target="__cublas\$(?:gemm|lt\$matmul)')

Instr = tuple[str, str, str, str]  # (name, result shape text, opcode, rest of line)


def _dims(shape: str) -> list[int]:
  """Dims of the first array shape in `shape` (`f32[4,<=8]{1,0}` -> [4, 8])."""
  m = _ARRAY_SHAPE.search(shape)
  if m is None:
    raise ValueError(f"cannot parse shape {shape!r}")
  return [int(d.replace("<=", "")) for d in m.group(1).split(",") if d.strip()]


def _balanced(s: str, start: int) -> int:
  """Index just past the bracket group opening at s[start]."""
  depth = 0
  for i in range(start, len(s)):
    depth += 1 if s[i] in "({[" else (-1 if s[i] in ")}]" else 0)
    if depth == 0:
      return i + 1
  raise ValueError(f"unbalanced brackets in {s!r}")


def _parse_instr(line: str) -> Instr | None:
  m = _INSTR_HEAD.match(line)
  if m is None:
    return None
  pos = m.end()
  if line.startswith("(", pos):  # tuple shape
    end = _balanced(line, pos)
  else:
    end = line.find(" ", pos)
  op = _OPCODE.match(line, end) if end >= 0 else None
  if op is None:
    return None
  return m.group(1), line[pos:end], op.group(1), line[op.end() - 1 :]


def _operands(rest: str) -> list[str]:
  """Operand texts of `(a, b, ...)`, split at top-level commas."""
  inner = rest[1 : _balanced(rest, 0) - 1]
  out, depth, cur = [], 0, ""
  for ch in inner:
    depth += 1 if ch in "({[" else (-1 if ch in ")}]" else 0)
    if ch == "," and depth == 0:
      out.append(cur.strip())
      cur = ""
    else:
      cur += ch
  out += [cur.strip()] if cur.strip() else []
  return [re.sub(r"/\*.*?\*/", "", o).strip() for o in out]  # `/*index=5*/%x`: the printer's comments


def _int_list(attr: str, text: str) -> list[int]:
  m = re.search(rf"\b{attr}=\{{([\d,\s]*)\}}", text)
  return [int(x) for x in m.group(1).split(",") if x.strip()] if m else []


def _json_int_list(key: str, text: str) -> list[int]:
  m = re.search(rf'\\?"?{key}\\?"?\s*:\s*\[([^\]]*)\]', text)
  return [int(x) for x in re.findall(r"\d+", m.group(1))] if m else []


def _operand_dims(operand: str, shapes: dict[str, str]) -> list[int]:
  """Operand shape: printed inline (`f32[2,3]{1,0} %x`) or looked up by name."""
  if _ARRAY_SHAPE.match(operand):
    return _dims(operand)
  name = operand.split()[-1].lstrip("%")
  if name not in shapes:
    raise ValueError(f"unknown operand {name!r}")
  return _dims(shapes[name])


def _window_attr(window: str, key: str, n: int, default: int) -> list[int]:
  m = re.search(rf"\b{key}=([\dx_\-]+)", window)
  return [int(v) for v in m.group(1).split("x")] if m else [default] * n


def _conv_flops(shape: str, rest: str, shapes: dict[str, str]) -> float:
  """2 x the multiply-adds of a convolution that meet an input element: window taps on padding or on
  the zeros of an input dilation are not counted. XLA:TPU writes some dots as such convolutions (a
  window as wide as a dimension, padded by all but one on each side; the ragged_dot weight gradient
  as an input-dilated one), so counting whole windows would overstate them up to the window's size."""
  lhs_text, kernel_text = _operands(rest)[:2]
  lhs, kernel, out = _operand_dims(lhs_text, shapes), _operand_dims(kernel_text, shapes), _dims(shape)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
  if labels is None:
    raise ValueError(f"convolution without dim_labels: {rest[:200]}")
  lhs_l, ker_l, out_l = labels.groups()
  window = re.search(r"window=\{([^}]*)\}", rest)
  window = window.group(1) if window else ""
  n = sum(ch.isdigit() for ch in lhs_l)
  size = _window_attr(window, "size", n, 1)
  stride, lhs_dil, rhs_dil = (_window_attr(window, k, n, 1) for k in ("stride", "lhs_dilate", "rhs_dilate"))
  pads = re.search(r"\bpad=([\d_x\-]+)", window)
  pad_lo = [int(p.split("_")[0]) for p in pads.group(1).split("x")] if pads else [0] * n
  taps = 1
  for i in range(n):
    s, r, d, lo = stride[i], rhs_dil[i], lhs_dil[i], pad_lo[i]
    extent = (lhs[lhs_l.index(str(i))] - 1) * d + 1
    taps_i = 0
    for o in range(out[out_l.index(str(i))]):
      # The taps k whose input position p = o·s + k·r - lo lies in [0, extent) form a range; with the
      # input dilated by d only every d-th position holds data.
      first, last = max(0, -((o * s - lo) // r)), min(size[i] - 1, (extent - 1 + lo - o * s) // r)
      if d == 1:
        taps_i += max(0, last - first + 1)
      else:
        taps_i += sum((o * s + k * r - lo) % d == 0 for k in range(first, last + 1))
    taps *= taps_i
  other = math.prod(d for d, ch in zip(out, out_l, strict=True) if not ch.isdigit())  # batch, features
  return 2.0 * other * taps * kernel[ker_l.index("i")]


def _op_flops(opcode: str, shape: str, rest: str, shapes: dict[str, str]) -> float:
  """Matmul FLOPs of one instruction (0 for anything that is not a matmul)."""
  if opcode == "dot" or (opcode == "custom-call" and _GEMM_TARGET.search(rest)):
    lhs = _operand_dims(_operands(rest)[0], shapes)
    contracting = (
      _int_list("lhs_contracting_dims", rest) if opcode == "dot" else _json_int_list("lhs_contracting_dimensions", rest)
    )
    # Batch dims appear in the output shape, so they are already counted there.
    return 2.0 * math.prod(_dims(shape)) * math.prod(lhs[d] for d in contracting)
  if opcode == "convolution":
    return _conv_flops(shape, rest, shapes)
  if opcode == "custom-call" and _RAGGED_KERNEL.search(rest):
    # TPU's ragged_dot kernel (a Mosaic custom call): rows [M, K] @ each row's expert [K, N] -> [M, N];
    # the rows are the rank-2 operand of M rows (the others: group metadata, the [E, ., .] weights).
    # Counted over all M rows, an upper bound: how many are in a group is known only at run time (the
    # dropless exchange's buffer is expert x local rows, mostly padding).
    m, n = _dims(shape)
    rows = [d for o in _operands(rest) if len(d := _operand_dims(o, shapes)) == 2 and d[0] == m]
    if not rows:
      raise ValueError(f"ragged-dot kernel without a [{m}, K] operand: {rest[:200]}")
    return 2.0 * m * n * rows[0][1]
  return 0.0


def _split_computations(hlo: str) -> tuple[dict[str, list[Instr]], str]:
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    header = _COMP_HEADER.match(line)
    if header:
      current = header.group(2)
      comps[current] = []
      entry = current if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and (instr := _parse_instr(line)) is not None:
      comps[current].append(instr)
  if not entry:
    raise ValueError("no ENTRY computation found in HLO text")
  return comps, entry


def _callees(rest: str) -> dict[str, list[str]]:
  return {attr: re.findall(r"%?([\w.\-]+)", val.strip("{}")) for attr, val in _CALLEE_ATTRS.findall(rest)}


def hlo_text_flops(hlo: str) -> float:
  """Matmul FLOPs of an optimized HLO module given as text (see module doc)."""
  comps, entry = _split_computations(hlo)

  @cache
  def comp_flops(comp: str) -> float:
    shapes = {name: shape for name, shape, _, _ in comps[comp]}
    total = 0.0
    for name, shape, opcode, rest in comps[comp]:
      total += _op_flops(opcode, shape, rest, shapes)
      if opcode in ("async-done", "async-update"):
        continue  # same callee as async-start; count it once
      callees = _callees(rest)
      if opcode == "while":
        n = _trip_count(name, comp, rest, comps)
        total += n * sum(comp_flops(c) for c in callees.get("body", []))
        total += (n + 1) * sum(comp_flops(c) for c in callees.get("condition", []))
      elif opcode == "conditional":
        # Upper bound: only one branch runs, we count the most expensive.
        branches = (
          callees.get("branch_computations", [])
          + callees.get("true_computation", [])
          + callees.get("false_computation", [])
        )
        total += max((comp_flops(c) for c in branches), default=0.0)
      else:
        # fusion/call/async-start/custom-call/...: called once per execution.
        # (reduce/map/sort to_apply bodies run per element but hold no dots.)
        total += sum(comp_flops(c) for cs in callees.values() for c in cs)
    return total

  return comp_flops(entry)


def compiled_flops(compiled) -> float:
  """Total matmul FLOPs (dot + convolution) of a ``jax.stages.Compiled``.

  Unlike ``compiled.cost_analysis()["flops"]``, work inside while loops (scans)
  is multiplied by each loop's ``known_trip_count``, nested loops multiply.
  Called computations (fusion, call, ...) count at their call-site multiplicity.
  A ``conditional`` contributes the MAX over its branches, so the result is an
  upper bound when conds hold matmuls.  Elementwise ops are ignored: matmul
  FLOPs only, which is what MFU and analytic FLOP formulas use.

  Raises:
    ValueError: if a while loop has no known trip count (named in the message).
  """
  return hlo_text_flops(compiled.as_text())


@dataclass(frozen=True)
class Matmul:
  """One matmul of a compiled program: where it comes from, its operand dtypes, its FLOPs per step."""

  op_name: str  # jax's name stack of the op (metadata op_name), e.g. "jit(step)/jvp(BTD,DNH->BTNH)/dot_general"
  dtypes: tuple[str, ...]  # operand element types, e.g. ("f8e4m3fn", "f8e5m2")
  flops: float  # per execution of the program: loops counted by trip count


def matmuls(hlo: str) -> list[Matmul]:
  """Every dot / gemm custom call of an optimized HLO module (inside fusions and loops too), with its
  operand dtypes and its FLOPs counted as `hlo_text_flops` counts them. On GPU a dot sits inside a
  GEMM fusion (Triton) or is a cuBLAS(Lt) custom call; its operand types are what the GEMM reads."""
  out: list[Matmul] = []
  for (name, shape, opcode, rest), times, shapes, op_name in walk(hlo):
    f = _op_flops(opcode, shape, rest, shapes)
    if f:
      operands = _operands(rest)
      if opcode == "custom-call" and _RAGGED_KERNEL.search(rest):  # skip the kernel's int32 group metadata
        operands = [o for o in operands if not _operand_dtype(o, shapes).startswith(("s", "u"))]
      types = tuple(_operand_dtype(o, shapes) for o in operands[:2])
      out.append(Matmul(op_name or name, types, f * times))
  return out


def walk(hlo: str):
  """(instruction, times it runs per execution of the module, {name: shape} of its computation) for
  every instruction of an optimized HLO module, inside fusions, calls and loops (a while body counted
  by its trip count, `_trip_count`; every branch of a conditional, as if it ran: an upper bound; the callee of
  an async pair once, at its start), and its op_name (jax's name stack: its own metadata's, else the
  calling instruction's: XLA:CPU prints none inside fused computations)."""
  comps, entry = _split_computations(hlo)

  def visit(comp: str, times: float, caller: str):
    shapes = {name: shape for name, shape, _, _ in comps[comp]}
    for instr in comps[comp]:
      name, _, opcode, rest = instr
      own = _OP_NAME.search(rest)
      op_name = own.group(1) if own else caller
      yield instr, times, shapes, op_name
      if opcode in ("async-done", "async-update"):
        continue
      callees = _callees(rest)
      if opcode == "while":
        trip = _trip_count(name, comp, rest, comps)
        for c in callees.get("body", []):
          yield from visit(c, times * trip, op_name)
      else:
        for cs in callees.values():
          for c in cs:
            yield from visit(c, times, op_name)

  yield from visit(entry, 1.0, "")


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def in_scope(op_name: str, scope: str) -> bool:
  """Whether jax's name stack `op_name` passes through named scope `scope`, also under transformations
  ("jvp(scope)", "transpose(jvp(scope))")."""
  return re.search(rf"(^|[/(]){re.escape(scope)}($|[/)])", op_name) is not None


_CONSTANT = re.compile(r"constant\((-?\d+)\)")
_PARAMETER = re.compile(r"parameter\((\d+)\)")


def _trip_count(name: str, comp: str, rest: str, comps: dict[str, list[Instr]]) -> int:
  """A while loop's trip count: XLA's `known_trip_count` where it prints one (CPU, GPU), else read from
  its condition (TPU programs print none): a ROOT `compare(counter, constant(N))`, maybe wrapped in a
  fusion, direction LT or LE; the counter counting from 0 by the constant its body adds to it
  (`_counter_step`): 1 in the loops of scans and fori_loops, 2 in XLA's bidirectional windowed einsums
  (TPU's collective matmuls, two partial products per trip). The expert exchange's rounds
  (sharding/expert.py, ROUND_LOOPS) run as often as the routing needs: they are counted as under
  balanced routing."""
  trip = _TRIP_COUNT.search(rest)
  if trip is not None:
    return int(trip.group(1))
  cond = _callees(rest).get("condition", [])
  instrs = comps.get(cond[0], []) if cond else []
  if instrs:
    constants = {n: int(m.group(1)) for n, _, op, r in instrs if op == "constant" and (m := _CONSTANT.match(op + r))}
    _, _, opcode, root_rest = instrs[-1]  # XLA prints a computation's ROOT last
    ops = [o.split()[-1].lstrip("%") for o in _operands(root_rest)]
    if opcode == "fusion":  # the compare inside, on the fusion's parameters
      fused = comps.get((_callees(root_rest).get("calls") or [""])[0], [])
      params = {n: int(m.group(1)) for n, _, op, r in fused if op == "parameter" and (m := _PARAMETER.match(op + r))}
      if fused and fused[-1][2] == "compare":
        opcode, root_rest = "compare", fused[-1][3]
        ops = [ops[params[o.split()[-1].lstrip("%")]] for o in _operands(root_rest)]
    direction = re.search(r"direction=(\w+)", root_rest)
    if opcode == "compare" and len(ops) == 2 and direction is not None:
      (a, b), d = ops, direction.group(1)
      if a in constants and b not in constants and d in ("GT", "GE"):
        (a, b), d = (b, a), {"GT": "LT", "GE": "LE"}[d]
      if b in constants and a not in constants and d in ("LT", "LE"):
        step = _counter_step(a, instrs, _callees(rest).get("body", [""])[0], comps)
        return -(-(constants[b] + (d == "LE")) // step)
  op_name = re.search(r'op_name="([^"]*)"', rest)
  scopes = op_name.group(1).split("/") if op_name else []
  for scope, trips in ROUND_LOOPS.items():  # data-dependent: counted as under balanced routing
    if scope in scopes:
      return trips
  raise ValueError(f"while loop {name!r} in {comp!r}: no known_trip_count and no counter bound in its condition")


_GTE_INDEX = re.compile(r"index=(\d+)")


def _counter_step(counter: str, cond: list[Instr], body: str, comps: dict[str, list[Instr]]) -> int:
  """What a loop's body adds to its counter each trip: the condition reads the counter as element i of
  the loop tuple (`get-tuple-element(param), index=i`); the body's ROOT tuple's element i is
  `add(get-tuple-element(param), index=i, constant(k))` -> k. 1 where the pattern is not found."""
  got = next((r for n, _, op, r in cond if n == counter and op == "get-tuple-element"), None)
  instrs = comps.get(body, [])
  if got is None or not instrs or instrs[-1][2] != "tuple" or (m := _GTE_INDEX.search(got)) is None:
    return 1
  index = int(m.group(1))
  elements = [o.split()[-1].lstrip("%") for o in _operands(instrs[-1][3])]
  by_name = {n: (op, r) for n, _, op, r in instrs}
  op, r = by_name.get(elements[index] if index < len(elements) else "", ("", ""))
  if op != "add":
    return 1
  step = None
  for o in (o.split()[-1].lstrip("%") for o in _operands(r)):
    o_op, o_rest = by_name.get(o, ("", ""))
    while o_op in ("copy", "bitcast", "convert"):  # the counter passed through a copy (seen on TPU)
      o_op, o_rest = by_name.get(_operands(o_rest)[0].split()[-1].lstrip("%"), ("", ""))
    if o_op == "constant" and (c := _CONSTANT.match(o_op + o_rest)):
      step = int(c.group(1))
    elif not (o_op == "get-tuple-element" and (g := _GTE_INDEX.search(o_rest)) and int(g.group(1)) == index):
      return 1
  return step if step and step > 0 else 1


def _operand_dtype(operand: str, shapes: dict[str, str]) -> str:
  text = operand if _ARRAY_SHAPE.match(operand) else shapes.get(operand.split()[-1].lstrip("%"), "?[")
  return text.split("[", 1)[0]


_CONTAINERS = ("while", "conditional", "call")


def instruction_flops(hlo: str) -> dict[str, float]:
  """Matmul FLOPs of ONE execution of each instruction of an optimized HLO module that holds a
  matmul: a `dot`/gemm, or a fusion whose fused computation holds one. Loops, conditionals and calls
  are not listed: their bodies' instructions are (instruction names are unique in a module)."""
  return _instruction_flops(_split_computations(hlo)[0])


def _instruction_flops(comps: dict[str, list[Instr]]) -> dict[str, float]:

  @cache
  def fused_flops(comp: str) -> float:  # fused computations hold no loops
    shapes = {name: shape for name, shape, _, _ in comps[comp]}
    return sum(
      _op_flops(op, shape, rest, shapes) + sum(fused_flops(c) for cs in _callees(rest).values() for c in cs)
      for _, shape, op, rest in comps[comp]
    )

  out = {}
  for instrs in comps.values():
    shapes = {name: shape for name, shape, _, _ in instrs}
    for name, shape, opcode, rest in instrs:
      if opcode in _CONTAINERS or opcode in ("async-done", "async-update"):
        continue
      f = _op_flops(opcode, shape, rest, shapes) + sum(fused_flops(c) for cs in _callees(rest).values() for c in cs)
      if f:
        out[name] = f
  return out


def trace_events(trace_dir: str) -> list[dict]:
  """The complete ("X") events of the newest jax profiler trace under `trace_dir` (written with
  `create_perfetto_trace=True`): XLA:CPU records one per executed thunk, named after its HLO
  instruction, every loop iteration included."""

  files = sorted(Path(trace_dir).glob("**/*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
  if not files:
    raise ValueError(f"no profiler trace (*.trace.json.gz) under {trace_dir}")
  events = json.load(gzip.open(files[-1]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  return [e for e in events if e.get("ph") == "X"]


def trace_op_counts(trace_dir: str) -> dict[str, int]:
  """How many times each XLA op ran in the newest profiler trace under `trace_dir`."""

  return dict(collections.Counter(e.get("name", "") for e in trace_events(trace_dir)))


def executed_flops(run, hlo: str) -> float:
  """Matmul FLOPs a compiled program really executes: `run()` (one call of the program, waited for)
  runs under the jax profiler, and each matmul instruction's FLOPs (`instruction_flops(hlo)`, `hlo` =
  `compiled.as_text()`) count once per recorded execution.

  What `compiled_flops` cannot count: `while` loops with data-dependent trip counts (the CPU grouped
  matmul's per-expert tile loops) count their real trips, and a skipped `conditional` branch counts
  nothing. For a program without either, the two agree exactly (tests/test_flops.py).

  Raises:
    ValueError: if no event of the trace is named after one of the program's instructions (a backend
      whose profiler names events otherwise).
  """

  comps, _ = _split_computations(hlo)
  per = _instruction_flops(comps)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    try:
      run()
    finally:
      jax.profiler.stop_trace()
    counts = trace_op_counts(d)
  if not {name for instrs in comps.values() for name, *_ in instrs} & counts.keys():
    raise ValueError(
      "the profiler trace names none of the program's HLO instructions; cannot count executed FLOPs on this backend"
    )
  return sum(per[name] * n for name, n in counts.items() if name in per)
