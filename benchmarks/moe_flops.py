"""Is the MoE really sparse? Compiled forward FLOPs vs analytic FLOPs, and wall time per grouped matmul.

    python benchmarks/moe_flops.py [--batch 2 --seq 1024 --repeats 5]

Workload: the bench-moe config (vocab 8192, hidden 512, 8 layers, 8 heads / 2 KV heads × 64, 16 routed
experts top-1 + shared expert of width 1024, chunk 256, NoPE every 4th layer, float32).

- analytic FLOPs = 2 · (active matmul parameters) · tokens + attention over the keys each query
  really attends (causal, chunk-local): the work a perfect sparse implementation must do.
- executed FLOPs = matmul FLOPs the optimised program runs: each matmul instruction of its HLO times
  how often a profiled forward executed it (`behemoth_jax.scale.flops.executed_flops`; the CPU grouped
  matmul's per-expert loops have data-dependent trip counts). XLA's own `cost_analysis()` counts a
  loop body once, so it is printed too but undercounts the blocked grouped matmul.
The forward is compiled unscanned so the per-layer structure is visible to both counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from common import BENCH_MOE
from flax import nnx

from behemoth_jax.model.cost import analytic_forward_flops
from behemoth_jax.model.transformer import create_model
from behemoth_jax.scale.flops import executed_flops


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  ids = jnp.asarray(np.random.default_rng(0).integers(0, BENCH_MOE.vocab_size, (args.batch, args.seq)), jnp.int32)
  analytic = analytic_forward_flops(BENCH_MOE, args.batch, args.seq)
  total_analytic = sum(analytic.values())
  print(
    f"bench-moe forward, batch {args.batch} x seq {args.seq}, backend {jax.default_backend()}, "
    f"{jax.device_count()} device(s)"
  )
  print(
    f"analytic FLOPs: {total_analytic / 1e9:8.2f} G  (matmul params {analytic['matmul_params'] / 1e9:.2f} G"
    f" + attended attention {analytic['attention'] / 1e9:.2f} G)"
  )
  print(
    f"{'moe_impl':>9} {'executed GF':>12} {'ratio':>6} {'XLA cost_analysis GF':>21} {'ms/forward':>11} {'tokens/s':>10}"
  )
  for impl in ("blocked", "ragged", "dense"):
    cfg = dataclasses.replace(BENCH_MOE, moe_impl=impl)
    graphdef, params = nnx.split(create_model(cfg))
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    compiled = fwd.lower(params, ids).compile()
    ours = executed_flops(lambda: jax.block_until_ready(compiled(params, ids)), compiled.as_text())
    xla = compiled.cost_analysis()
    xla = (xla[0] if isinstance(xla, list) else xla).get("flops", float("nan"))
    jax.block_until_ready(compiled(params, ids))
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, ids))
      times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    print(
      f"{impl:>9} {ours / 1e9:12.2f} {ours / total_analytic:6.2f} {xla / 1e9:21.2f} {ms:11.1f} "
      f"{args.batch * args.seq / ms * 1e3:10.0f}"
    )
  print(
    "ratio = executed / analytic; blocked (the CPU default) must stay <= 1.2. ragged_dot and dense "
    "compute every expert for every token on CPU."
  )


if __name__ == "__main__":
  main()
