"""Memory calculator: per-chip bytes of a train step, and serving memory by weight precision and context.

  python -m behemoth_jax.memory --config configs/behemoth.yaml --chips 512 parallel.fsdp=4 parallel.expert=16 \
      parallel.context=8 train.batch_size=64 train.seq_len=8192
  python -m behemoth_jax.memory --serve                     # the VRAM table: Scout, Maverick, Behemoth
  python -m behemoth_jax.memory --config configs/behemoth.yaml --prefill 1048576 --compile-topology v5p-2048 \
      parallel.context=... (compiles a 1M-token prefill for the slice: needs libtpu)

Training: the train state (parameters and optimizer moments) and gradients are exact, from the
sharding rules on an abstract mesh (no devices needed). Activations follow the program's structure:
with `remat_policy: full` the layer scan keeps each layer's input [B, T, D] (per chip: local batch x
local sequence), and one layer at a time is recomputed and differentiated (`train.layerwise_update`:
the same, and the gradient is one layer cycle's plus the parameters' outside the cycles); its working set is the
larger of the attention (key blocks of `model.attention_block`) and the dropless MoE exchange (receive
buffers of `model.moe_capacity` x the local routed rows with the ragged exchange that TPU and GPU run,
`expert` x with the padded one: sharding/expert.py). The embedding and LM head are gathered
over everything but their vocabulary split (the loss computes on vocabulary shards), and one layer's
weights are gathered (ZeRO-3) for its compute. The working-set constants were
fitted to XLA's live-buffer peak for TPU v5p (docs/SCALE.md lists the points and the errors).
Online distillation (`distill.teacher_config`) adds the teacher's weights (exact, from the rules on the
same mesh, in `distill.teacher_dtype`) and its final hidden states; its forward's working set only
competes with the student's (within 6% of 12 compiled distillation steps, none used to fit).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass

import jax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from behemoth_jax.cli import ArgumentParser
from behemoth_jax.config import Config, ConfigError, load_config
from behemoth_jax.model.cost import kv_cache_bytes
from behemoth_jax.model.transformer import abstract_model
from behemoth_jax.scale import aot
from behemoth_jax.scale.params import count_params
from behemoth_jax.train.layerwise import split_cycles
from behemoth_jax.train.losses import even_chunk
from behemoth_jax.train.state import abstract_sharded_model, abstract_train_state, teacher_model_config
from behemoth_jax.train.step import make_optimizer
from sharding import axes as ax
from sharding.api import per_device_bytes
from sharding.expert import receive_rows
from sharding.mesh import ShardingError, axis_sizes
from sharding.rules import MESH_AXES, shard_count

GiB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


@dataclass
class TrainEstimate:
  chips: int
  params: float  # per chip
  optimizer: float
  gradients: float
  saved_activations: float  # layer inputs kept for the backward pass
  vocabulary_tables: float  # embedding and LM head gathered whole for the step (vocab is split only by tensor)
  gathered_layer: float  # one layer's weights all-gathered over fsdp/context (ZeRO-3) for its compute
  working_set: float  # the largest of: one layer recomputed and differentiated; the chunked loss; the teacher's forward
  code: float
  teacher_params: float = 0.0  # an online teacher's weights (frozen: no gradients, no optimizer state)
  teacher_hidden: float = 0.0  # its final hidden states, live from its forward to the loss's backward

  @property
  def total(self) -> float:
    return sum(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "chips")

  def rows(self) -> list[tuple[str, float]]:
    """(name, bytes) of every term; the teacher's only when there is one."""
    teacher = self.teacher_params > 0
    names = [f.name for f in dataclasses.fields(self) if f.name != "chips" and (teacher or "teacher" not in f.name)]
    return [(name.replace("_", " "), getattr(self, name)) for name in names]


# Fitted to XLA's live-buffer peak of compiled TPU v5p train steps (docs/SCALE.md: Scout, Maverick,
# Behemoth on two meshes, and a dense model; every point within 8%).
# Scores, probabilities, dP and dS of one (query block, key block) pair, float32. 4 when the scores
# spanned every local query; 8 since they are one query block's (2026-12-05, on the dense test point).
ATTN_SCORE_COPIES = 8.0
ATTN_ACT_COPIES = 10.0  # q, k, v, out and their gradients, plus the layer input/output [B, T, D]
# The dropless expert exchange (sharding/expert.py) sizes its receive buffers (`exchange_rows`); the live
# bytes per buffer row came out nearly the same for Scout, Maverick and Behemoth with the padded
# exchange (229-254 KiB, whatever D and F), so it is one empirical constant, not a per-tensor count.
MOE_BYTES_PER_ROW = 240 * 1024
VOCAB_COPIES = 1.0  # embedding / LM head gathered over all but their vocabulary split (`tensor`)
CODE_BYTES = 0.4 * GiB  # compiled program of a large model (tiny ones: ~0.05 GiB)


def mesh_sizes(cfg: Config, chips: int | None) -> dict[str, int]:
  """Mesh axis sizes of `cfg.parallel` on `chips` chips (a -1 axis filled), or as the config gives them."""
  sizes = {a: getattr(cfg.parallel, a) for a in MESH_AXES}
  return axis_sizes(cfg.parallel, chips if chips else math.prod(s for s in sizes.values() if s > 0))


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def train_estimate(cfg: Config, chips: int | None = None) -> TrainEstimate:
  """Per-chip bytes of one train step of `cfg` on a mesh of `chips` (cfg.parallel, -1 filled). Every
  split below is the rules table's (`shard_count`), not a second copy of it."""
  mc, tc = cfg.model, cfg.train
  sizes = mesh_sizes(cfg, chips)
  split = lambda logical: shard_count(logical, sizes)  # noqa: E731
  n = math.prod(sizes.values())
  _, abstract = abstract_train_state(cfg, abstract_mesh(sizes), make_optimizer(tc))
  params = per_device_bytes(abstract["params"])
  optimizer = per_device_bytes(abstract["opt_state"])
  a = BYTES[mc.dtype]
  b_l = max(tc.batch_size // split(ax.BATCH), 1) / tc.grad_accum  # sequences per chip per micro-batch
  t_l = tc.seq_len / split(ax.LENGTH)
  d, h = mc.hidden_size, mc.head_dim
  heads_l = mc.num_heads / split(ax.ACT_HEADS)
  kv_l = max(mc.num_kv_heads / split(ax.KV_HEADS), 1)
  width_split = split(ax.MLP)
  layers = mc.num_layers
  per_layer_input = b_l * t_l * d * a
  saved = {
    "full": layers * per_layer_input,
    "none": layers * per_layer_input * 12,
    "dots": layers * per_layer_input * 6,
    "dots_no_batch": layers * per_layer_input * 6,
  }["full" if tc.layerwise_update else mc.remat_policy]  # layerwise recomputes every block (train/layerwise.py)
  span = min(tc.seq_len, mc.attention_chunk_size or tc.seq_len)
  block = mc.attention_block if mc.attention_block and span > mc.attention_block else span
  # The blocked path visits (query block, key block) pairs: scores of one block of queries, or of all
  # the local ones when the sequence is split over `context` (model/kernels.py, one query block).
  q_rows = t_l if split(ax.LENGTH) > 1 else min(block, t_l)
  attn = (
    ATTN_SCORE_COPIES * b_l * heads_l * q_rows * block * 4
    + ATTN_ACT_COPIES * b_l * t_l * max(heads_l * h, d) * a
    + 4 * b_l * tc.seq_len * kv_l * h * a
  )  # global layers' keys and values, all-gathered over context
  moe = 0.0
  kinds = [mc.layer_kind(i) for i in range(layers)]
  if any(k.moe for k in kinds):
    moe = MOE_BYTES_PER_ROW * exchange_rows(mc, b_l * t_l, split(ax.EXPERTS)) / width_split
    moe += exchange_grad_copy(mc, b_l * t_l, split(ax.EXPERTS)) / width_split
  if not all(k.moe for k in kinds):  # a dense SwiGLU: gate, up, product and their gradients
    moe = max(moe, 6 * b_l * t_l * mc.intermediate_size_mlp / width_split * a)
  # One vocabulary chunk of float32 logits per chip, of its vocabulary shard (train/losses.py).
  v_split = split(ax.VOCAB) if mc.vocab_size % split(ax.VOCAB) == 0 else 1
  logits = 3 * b_l * t_l * even_chunk(mc.vocab_size // v_split, tc.ce_chunk) * 4
  vocab = VOCAB_COPIES * mc.vocab_size * d * BYTES[mc.param_dtype] / split(ax.VOCAB)
  code = CODE_BYTES if params > GiB else CODE_BYTES / 8
  attn_w = d * (mc.num_heads + 2 * mc.num_kv_heads) * h + mc.num_heads * h * d
  shared = mc.shared_intermediate_size or mc.intermediate_size
  layer_w = max(
    attn_w
    + (
      3 * d * mc.intermediate_size * mc.num_experts / split(ax.EXPERTS) + 3 * d * shared
      if k.moe
      else 3 * d * mc.intermediate_size_mlp
    )
    for k in kinds
  )
  gathered = layer_w / width_split * BYTES[mc.param_dtype]
  # The loss's logits and a layer's backward are not live at once: the larger of them counts.
  work = max(attn, moe, logits)
  teacher = (0.0, 0.0)
  if cfg.distill.teacher or cfg.distill.teacher_config:
    teacher, teacher_work = _teacher_terms(cfg, sizes, b_l, t_l)
    work = max(work, teacher_work)
  # With accumulation the running sum and a micro-batch's gradient are both whole (Scout, 8 layers,
  # v5p-16, f2 e2 t2: grad_accum 4 saved 4 GiB of activations and spent them on the second copy).
  grads = params * (2 if tc.grad_accum > 1 else 1)
  if tc.layerwise_update:  # one layer cycle's gradient at a time, and the whole one outside the cycles
    cycles, rest = split_cycles(abstract["params"])
    grads = per_device_bytes(rest) + per_device_bytes(cycles) / max(mc.num_cycles, 1)
  return TrainEstimate(n, params, optimizer, grads, saved, vocab, gathered, work, code, *teacher)


# The teacher's forward runs before the student's; its layer working set is dead by the time the
# student's backward peaks, so its weights and final hidden states add to the student's terms and its
# working set only competes with the student's. In all 12 compiled points (docs/SCALE.md) the student's
# was the larger, so this fraction (of a training layer's expert-exchange bytes, for a forward-only
# layer) is a guess that never decided a total, not a fit.
TEACHER_FWD_FRACTION = 0.5


def _teacher_terms(cfg: Config, sizes: dict[str, int], b_l: float, t_l: float) -> tuple[tuple[float, float], float]:
  """((teacher weights, teacher hidden states) per chip, the teacher forward's working set)."""
  tcfg = teacher_model_config(cfg)
  _, t_abstract, _ = abstract_sharded_model(tcfg, abstract_mesh(sizes))
  split = lambda logical: shard_count(logical, sizes)  # noqa: E731
  weights = per_device_bytes(t_abstract)
  a = BYTES[tcfg.dtype]
  hidden = b_l * t_l * tcfg.hidden_size * a
  rows = exchange_rows(tcfg, b_l * t_l, split(ax.EXPERTS))
  return (weights, hidden), TEACHER_FWD_FRACTION * MOE_BYTES_PER_ROW * rows / split(ax.MLP)


def exchange_grad_copy(mc, tokens: float, shards: int) -> float:
  """The ragged exchange's backward loop over later rounds holds one more copy of the local experts'
  weight gradients (sharding/expert.py; none when its buffer has room for every row: one round)."""
  rows = math.ceil(tokens * mc.num_experts_per_tok)
  if mc.moe_exchange == "padded" or shards == 1 or exchange_rows(mc, tokens, shards) >= shards * rows:
    return 0.0
  return 3 * mc.hidden_size * mc.intermediate_size * mc.num_experts / shards * BYTES[mc.param_dtype]


def exchange_rows(mc, tokens: float, shards: int) -> float:
  """Rows of the expert exchange's receive buffer per chip (sharding/expert.py) for `tokens` local
  tokens, as the exchange runs on TPU / GPU (`auto`: ragged)."""
  rows = math.ceil(tokens * mc.num_experts_per_tok)
  return receive_rows(rows, shards, "padded" if mc.moe_exchange == "padded" else "ragged", mc.moe_capacity)


# --- serving --------------------------------------------------------------------------------------
def serving_table(configs: list[str], precisions: list[str], contexts: list[int]) -> str:
  lines = []
  head = (
    "| model | weights | "
    + " | ".join(f"KV @ {_ctx(c)}" for c in contexts)
    + " | "
    + " | ".join(f"total @ {_ctx(c)}" for c in contexts)
    + " |"
  )
  for path in configs:
    cfg = load_config(path)
    n = count_params(cfg.model)["total"]
    kv = [kv_cache_bytes(cfg, c) for c in contexts]
    lines.append(f"\n{path}: {n / 1e9:,.1f}B parameters; KV cache bf16, batch 1\n")
    lines.append(head)
    lines.append("|" + "---|" * (2 + 2 * len(contexts)))
    for prec in precisions:
      w = weight_bytes(cfg.model, prec)
      lines.append(
        f"| {path.split('/')[-1].removesuffix('.yaml')} | {prec}: {w / GiB:,.0f} GiB | "
        + " | ".join(f"{x / GiB:,.1f} GiB" for x in kv)
        + " | "
        + " | ".join(f"{(w + x) / GiB:,.0f} GiB" for x in kv)
        + " |"
      )
  return "\n".join(lines)


def weight_bytes(mc, precision: str) -> float:
  """Bytes of the model's weights held in `precision`: fp8 / int8 as `model.weight_quant` stores them
  (1-byte projections and experts, their float32 per-channel scales, bf16 for the rest: what
  `generate --weights` and `distill.teacher_dtype` hold), otherwise every parameter at that width
  (int4: a formula, no such storage here)."""
  if precision in ("fp8", "int8"):
    quantized = abstract_model(dataclasses.replace(mc, param_dtype="bfloat16", weight_quant=precision))
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(quantized, nnx.Param)))
  return count_params(mc)["total"] * BYTES[precision]


def _ctx(c: int) -> str:
  return f"{c // 2**20}M" if c >= 2**20 and c % 2**20 == 0 else f"{c // 1024}K" if c % 1024 == 0 else str(c)


def main(argv: list[str] | None = None) -> int:
  p = ArgumentParser(
    prog="python -m behemoth_jax.memory",
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[1:]),
  )
  p.add_argument("--config", default="configs/tiny.yaml")
  p.add_argument("--chips", type=int, help="chips in the mesh (fills a -1 axis of parallel.*)")
  p.add_argument("--serve", action="store_true", help="serving table: weights by precision + KV cache by context")
  p.add_argument("--precisions", default="bfloat16,fp8,int8,int4")
  p.add_argument("--contexts", default="8192,131072,1048576,10485760")
  p.add_argument(
    "--prefill",
    type=int,
    metavar="TOKENS",
    help="with --compile-topology: compile a prefill of "
    "TOKENS tokens (batch 1, context parallel) and report its per-chip memory",
  )
  p.add_argument(
    "--score",
    type=int,
    metavar="K",
    default=0,
    help="with --prefill: compile the scoring pass of `generate --score K` (top-K log-probs at every position)",
  )
  p.add_argument(
    "--decode",
    type=int,
    metavar="SLOTS",
    help="with --compile-topology and --context: compile one decode step of SLOTS sequences (generation's "
    "batch) against KV caches of --context tokens each (weights as model.weight_quant: fp8 / int8 / none)",
  )
  p.add_argument("--context", type=int, metavar="TOKENS", help="with --decode: the KV caches' length")
  p.add_argument(
    "--compile-topology",
    metavar="SLICE",
    help="compile for this TPU slice (or GPU cluster, h200-4x8) and compare with XLA",
  )
  p.add_argument("overrides", nargs="*")
  args = p.parse_args(argv)
  if args.compile_topology:
    aot.compile_only_host()
  try:
    if args.serve:
      configs = (
        [args.config]
        if args.config != "configs/tiny.yaml"
        else ["configs/scout.yaml", "configs/maverick.yaml", "configs/behemoth.yaml"]
      )
      print(serving_table(configs, args.precisions.split(","), [int(c) for c in args.contexts.split(",")]))
      return 0
    if args.score and not args.prefill:
      raise ConfigError("--score: compiles a scoring pass of --prefill TOKENS tokens (give --prefill)")
    cfg = load_config(args.config, args.overrides)
    if args.prefill:
      return aot.compile_prefill(cfg, args.prefill, args.compile_topology, score=args.score)
    if args.decode:
      if not args.context:
        raise ConfigError("--decode: give the KV caches' length with --context TOKENS")
      return aot.compile_decode(cfg, args.decode, args.context, args.compile_topology)
    chips = aot.parse_topology(args.compile_topology).chips if args.compile_topology else args.chips
    est = train_estimate(cfg, chips)
  except (ConfigError, ShardingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"train step of {args.config} on {est.chips} chips, per chip (estimate):")
  for name, v in est.rows():
    print(f"  {name:18s} {v / GiB:9.2f} GiB")
  print(f"  {'total':18s} {est.total / GiB:9.2f} GiB")
  if args.compile_topology:
    try:
      return aot.compile_train_step(cfg, args.compile_topology, name=args.config)
    except (ConfigError, ShardingError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
