"""GPU mode: bf16 and fp8 training MFU of a ~1B-active Llama 4 MoE on one accelerator, in one sitting.

    python benchmarks/gpu_mfu.py                      # on an H100/H200 (or a TPU chip): bench-1b, bf16 then fp8
    python benchmarks/gpu_mfu.py --smoke              # a tiny model on any backend (CPU): checks the script runs

Workload bench-1b (issue 9): vocab 32768, hidden 2048, 16 layers, 16 heads / 8 KV heads x 128, every
layer MoE with 8 routed experts top-1 (4096 wide) + a shared expert (4096), chunk 2048 with NoPE/global
every 4th layer, QK-norm; 1.14 G active / 3.96 G total parameters (params.count_params); float32
parameters and AdamW state (48 GB; 63 GB with the gradients), compute bfloat16, full remat, batch
4 x 4096. The same train step as train.py (`train.step.make_train_step`, jit, one device); the grouped
matmul is `ragged_dot` on GPU/TPU.

Printed for each of bf16 and fp8 (`model.fp8`: e4m3 forward operands, e5m2 gradients, per-tensor current
scaling): median step time of `--steps` after `--warmup`, tokens/s, achieved TFLOP/s = analytic FLOPs
(3 x forward, causal/chunk-local attention, no remat recompute) / step time, MFU against the chip's dense
bf16 peak (`behemoth_jax.chips`; on CPU the matmul peak measured now), and compiled/analytic matmul FLOPs.
Then fp8 tokens/s over bf16. Results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc

import common  # noqa: F401  (puts the repository on sys.path)
import jax
from common import CompiledTrainStep, median_seconds, random_batch

from behemoth_jax.config import Config, ModelConfig, ParallelConfig, TrainConfig
from behemoth_jax.model.gmm import resolve_impl
from behemoth_jax.scale.aot import matmul_shares
from behemoth_jax.scale.params import count_params
from behemoth_jax.train.step import analytic_train_flops, peak_flops_per_device

BENCH_1B = ModelConfig(
  vocab_size=32768,
  hidden_size=2048,
  num_layers=16,
  num_heads=16,
  num_kv_heads=8,
  head_dim=128,
  intermediate_size=4096,
  intermediate_size_mlp=4096,
  num_experts=8,
  num_experts_per_tok=1,
  moe_layer_step=1,
  attention_chunk_size=2048,
  use_qk_norm=True,
  rope_theta=500000.0,
  param_dtype="float32",
  dtype="bfloat16",
  remat_policy="full",
  bos_token_id=1,
  eos_token_ids=(2,),
  pad_token_id=0,
  max_position_embeddings=65536,
)

# --smoke: the same layer pattern at toy size, so the script itself is exercised on CPU.
SMOKE = dataclasses.replace(
  BENCH_1B,
  vocab_size=512,
  hidden_size=64,
  num_layers=4,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  intermediate_size=128,
  intermediate_size_mlp=128,
  attention_chunk_size=32,
)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--steps", type=int, default=5, help="timed steps (median); default 5")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first also compiles)")
  p.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
  p.add_argument(
    "--param-dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="parameters and AdamW state; bfloat16 halves the 48 GB state for smaller chips",
  )
  p.add_argument(
    "--moe-impl",
    default="auto",
    choices=("auto", "ragged", "blocked", "dense"),
    help="routed experts' grouped matmul (model.moe_impl); on GPU `ragged` is XLA's ragged_dot, which XLA:GPU "
    "computes densely (every expert for every row: docs/PERFORMANCE.md)",
  )
  p.add_argument("--modes", default="bf16,fp8", help="comma-separated: bf16, fp8 (default both)")
  p.add_argument("--smoke", action="store_true", help="toy model, batch 2 x 64, 2 steps: runs on CPU in about a minute")
  args = p.parse_args(argv)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  if args.steps < 1 or args.warmup < 1:
    p.error("--steps and --warmup must be >= 1")
  if not modes or set(modes) - {"bf16", "fp8"}:
    p.error(f"--modes: expected bf16 and/or fp8, got {args.modes!r}")
  model, b, t = BENCH_1B, args.batch, args.seq
  if args.smoke:
    model, b, t, args.steps, args.warmup = SMOKE, 2, 64, 2, 1
  model = dataclasses.replace(model, remat_policy=args.remat, param_dtype=args.param_dtype, moe_impl=args.moe_impl)
  dev = jax.devices()[0]
  peak = peak_flops_per_device()
  if peak is None:
    if dev.platform != "cpu":
      p.error(f"no bf16 peak known for {dev.device_kind!r}: add it to behemoth_jax.chips.CHIPS")
    from behemoth_jax.train.metrics import measure_cpu_peak_flops

    peak = measure_cpu_peak_flops(1024)
    peak_name = f"CPU float32 matmul peak measured now, {peak / 1e12:.3f} TFLOP/s"
  else:
    peak_name = f"{dev.device_kind} dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
  counts = count_params(model)
  active, total = counts["active"], counts["total"]
  analytic = analytic_train_flops(model, b, t)
  print(
    f"{'smoke' if args.smoke else 'bench-1b'}: {active / 1e9:.3g} G active / {total / 1e9:.3g} G total "
    f"parameters, batch {b} x seq {t}, params {model.param_dtype}, remat {model.remat_policy}, "
    f"moe_impl {resolve_impl(model.moe_impl)}; "
    f"device {dev.device_kind} ({dev.platform}); jax {jax.__version__}"
  )
  print(f"analytic FLOPs per step {analytic / 1e12:.4g} T (3 x forward); MFU against the {peak_name}")
  print(
    "compiled matmul FLOPs count dot/convolution/cuBLAS GEMMs of the optimised program (remat recompute "
    "included; a native ragged-dot op is not a dot and is not counted)"
  )
  batch = random_batch(b, t, model.vocab_size)
  rows = []
  for mode in modes:
    cfg = Config(
      model=dataclasses.replace(model, dtype="bfloat16", fp8=mode == "fp8"),
      parallel=ParallelConfig(),
      train=TrainConfig(batch_size=b, seq_len=t, steps=1000, warmup_steps=10, learning_rate=3e-4),
    )
    try:  # compilation or the first step may run out of device memory
      step = CompiledTrainStep(cfg, batch)
      first = step.warm_up(args.warmup)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      print(
        f"{mode}: does not fit on {dev.device_kind}: {str(e).splitlines()[0][:200]}; try a smaller --batch, "
        f"--param-dtype bfloat16 or --remat full",
        flush=True,
      )
      return 1
    seconds, _ = median_seconds(step.run, args.steps)
    try:  # a data-dependent loop (the blocked grouped matmul) has no static count; off CPU no executed one
      flops = step.flops
    except Exception as e:  # noqa: BLE001 - the column says why instead of losing the timed run
      print(f"{mode}: compiled matmul FLOPs not counted: {str(e).splitlines()[0][:160]}", flush=True)
      flops = float("nan")
    rows.append((mode, first, seconds, flops))
    # Whether the fp8 GEMMs really read f8 operands on this chip (XLA:CPU converts f8 to f32 first).
    print(f"{mode}: matmul FLOPs by operand type: {matmul_shares(step.compiled.as_text())}", flush=True)
    del step
    gc.collect()  # free this mode's 63 GB of state before the next one is initialised
  print(
    f"\n| matmuls | first-step loss | step (median of {args.steps}) | tokens/s | TFLOP/s | MFU | "
    f"compiled/analytic matmul FLOPs |\n|---|---|---|---|---|---|---|"
  )
  for mode, first, seconds, flops in rows:
    print(
      f"| {mode} | {first:.4f} | {seconds:.3f} s | {b * t / seconds:,.0f} | {analytic / seconds / 1e12:.3g} | "
      f"{analytic / seconds / peak:.1%} | {flops / analytic:.3f} |"
    )
  if len(rows) == 2:
    print(f"\nfp8 / bf16 tokens/s: {rows[0][2] / rows[1][2]:.2f}x")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
