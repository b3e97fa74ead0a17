"""Parameter counts without allocation: `python -m behemoth_jax.params CONFIG.yaml [key=value ...]`.

Multimodal: add `model.vision={}` (Scout/Maverick's vision tower) to count the vision tower and
projector too. Counts come from the abstract model (`nnx.eval_shape`), so they are the shapes the model really
builds. Active per token = everything except the routed experts a token does not use:
total − routed · (1 − k/E).
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
from flax import nnx

from behemoth_jax.cli import ArgumentParser
from behemoth_jax.config import ConfigError, ModelConfig, load_config
from behemoth_jax.model.transformer import abstract_model

COMPONENTS = (
  "embedding",
  "lm_head",
  "attention",
  "norms",
  "router",
  "routed_experts",
  "shared_experts",
  "dense_mlp",
  "position_table",
  "vision_tower",
  "projector",
)


def component_of(path: tuple) -> str:
  names = [str(p) for p in path]
  leaf = names[-1]
  if names[0] == "vision":
    return "vision_tower"
  if leaf == "projector_PD":
    return "projector"
  if names[0] == "embed":
    return "embedding"
  if leaf == "lm_head_DV":
    return "lm_head"
  if leaf == "pos_table_PD":
    return "position_table"
  if "norm" in "/".join(names):
    return "norms"
  if "attn" in names:
    return "attention"
  if leaf == "w_router_DE":
    return "router"
  if "shared" in names:
    return "shared_experts"
  if leaf.endswith(("_EDF", "_EFD")):
    return "routed_experts"
  if "ffn" in names:
    return "dense_mlp"
  raise ValueError(f"unclassified parameter {'/'.join(names)}")


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Per-component counts plus `total` and `active` (per token)."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  counts: Counter = Counter({c: 0 for c in COMPONENTS})
  for path, var in nnx.to_flat_state(state):
    counts[component_of(path)] += int(np.prod(var.get_value().shape))
  total = sum(counts.values())
  inactive = counts["routed_experts"] * (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
  return {**counts, "total": total, "active": total - inactive}


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m behemoth_jax.params", description=__doc__.splitlines()[0])
  parser.add_argument("config", help="YAML config (e.g. configs/behemoth.yaml)")
  parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.num_layers=4")
  args = parser.parse_args(argv)
  try:
    cfg = load_config(args.config, args.overrides).model
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  counts = count_params(cfg)
  width = max(len(k) for k in counts)
  for name, n in counts.items():
    print(f"{name:<{width}}  {n:>20,}  ({n / 1e9:,.3f}B)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
