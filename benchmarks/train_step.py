"""bench-moe training, side by side: ours (one jit) vs Hugging Face `Llama4ForCausalLM` (PyTorch eager).

    python benchmarks/train_step.py [--steps 5] [--warmup 2] [--batch 2] [--seq 1024] [--no-hf]

One sitting, one machine, the same thread count for both:
1. this machine's float32 matmul peak, measured before and after our steps (JAX and PyTorch square
   matmuls; the best of all);
2. ours: `train.step.make_train_step` (what train.py runs: AdamW, clipping, chunked cross-entropy),
   jit-compiled; the matmul FLOPs of the compiled program (behemoth_jax.scale.flops: every loop body times its
   trip count, or, for the CPU grouped matmul's data-dependent loops, counted over a profiled step) vs
   the analytic FLOPs a perfect sparse implementation must do (3 × forward);
3. HF: the same weights loaded into Llama4ForCausalLM (sdpa attention), torch AdamW, the same
   cross-entropy on the same batch. The first-step losses are printed side by side: same model, same data.
Times are the median of `--steps` steps after `--warmup` (compilation is not timed).
Results and the reading of them: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses

import common  # noqa: F401  (puts the repository on sys.path)
import jax
from common import (
  BENCH_MOE,
  CompiledTrainStep,
  cores,
  fmt_rate,
  hf_model,
  matmul_peak,
  median_seconds,
  profile_top,
  random_batch,
  set_torch_threads,
)
from flax import nnx

from behemoth_jax.config import Config, ParallelConfig, TrainConfig
from behemoth_jax.train.step import analytic_train_flops


def bench_config(args) -> Config:
  model = dataclasses.replace(
    BENCH_MOE,
    remat_policy=args.remat,
    moe_impl=args.moe_impl,
    moe_block_size=args.moe_block,
    scan_layers=args.scanned,
    scan_unroll=args.scan_unroll,
  )
  train = TrainConfig(
    batch_size=args.batch, seq_len=args.seq, steps=1000, warmup_steps=10, learning_rate=3e-4, ce_chunk=args.ce_chunk
  )
  return Config(model=model, parallel=ParallelConfig(), train=train)


def ours(cfg: Config, batch: dict, args):
  """(first-step loss, median step seconds, (compiled matmul FLOPs, how counted), initial params as an HF
  state dict)."""
  from behemoth_jax.convert.export import to_torch_state_dict

  step = CompiledTrainStep(cfg, batch)
  hf_state = to_torch_state_dict(nnx.merge(step.graphdef, step.state["params"])) if args.hf else None
  first = step.warm_up(args.warmup)
  if args.profile:
    jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
  seconds, _ = median_seconds(step.run, args.steps)
  if args.profile:
    jax.profiler.stop_trace()
    print(f"\nprofile of our {args.steps} timed steps ({args.profile}), top ops by time:")
    for share, count, op, where in profile_top(args.profile, step.compiled.as_text(), args.profile_top):
      print(f"  {share:6.1%} {count:6d}x {op[:28]:28s} {where[-110:]}")
  return first, seconds, (step.flops, step.flops_counted), hf_state


def hf(cfg: Config, batch: dict, state_dict: dict, args):
  """(first-step loss, median step seconds) of transformers' Llama4ForCausalLM with torch AdamW."""
  import torch
  import torch.nn.functional as F

  model = hf_model(cfg.model, state_dict, args.hf_attn).train()
  tc = cfg.train
  opt = torch.optim.AdamW(
    model.parameters(), lr=tc.learning_rate, betas=(tc.adam_b1, tc.adam_b2), weight_decay=tc.weight_decay
  )
  inputs = torch.as_tensor(batch["inputs"], dtype=torch.long)
  targets = torch.as_tensor(batch["targets"], dtype=torch.long)

  def run():
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    return float(loss.detach())

  first = run()
  for _ in range(args.warmup - 1):
    run()
  seconds, _ = median_seconds(run, args.steps)
  return first, seconds


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--steps", type=int, default=5, help="timed steps (median); default 5")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first also compiles)")
  p.add_argument("--no-hf", dest="hf", action="store_false", help="ours only")
  p.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"), help="HF attention implementation")
  p.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"))
  p.add_argument("--moe-impl", default="auto", choices=("auto", "blocked", "ragged", "dense"))
  p.add_argument("--moe-block", type=int, default=0, help="rows per block of the blocked grouped matmul (0: auto)")
  p.add_argument("--ce-chunk", type=int, default=8192, help="vocabulary chunk of our cross-entropy")
  p.add_argument("--scanned", action="store_true", help="scan over the layer cycle (default: unscanned, faster on CPU)")
  p.add_argument("--scan-unroll", type=int, default=1, help="with --scanned: cycles per scan iteration")
  p.add_argument(
    "--profile",
    metavar="DIR",
    help="write a jax profiler trace of our timed steps to DIR and print the ops that took the most time",
  )
  p.add_argument("--profile-top", type=int, default=25, help="ops listed with --profile")
  args = p.parse_args(argv)
  if args.steps < 1 or args.warmup < 1:
    p.error("--steps and --warmup must be >= 1")
  n = cores()
  set_torch_threads(n)
  cfg = bench_config(args)
  b, t = args.batch, args.seq
  print(
    f"bench-moe training step, batch {b} x seq {t}, float32; {n} cores (torch threads {n}, XLA:CPU all cores); "
    f"jax {jax.__version__} on {jax.default_backend()}"
  )
  peaks = matmul_peak()
  batch = random_batch(b, t, cfg.model.vocab_size)
  analytic = analytic_train_flops(cfg.model, b, t)
  first, sec, compiled, state_dict = ours(cfg, batch, args)
  # Measured again right after our timed steps (this shared machine's peak drifts by minutes): the
  # higher of the two is the denominator (which can only lower our share).
  again = matmul_peak()
  peaks = {k: max(v, again[k]) for k, v in peaks.items()}
  peak = max(peaks.values())
  print(
    "matmul peak (GFLOP/s, float32, best before/after our steps): "
    + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items())
    + f"; using {peak / 1e9:.1f}"
  )
  rows = [("ours (jax.jit)", first, sec)]
  if args.hf:
    import torch
    import transformers

    hf_first, hf_sec = hf(cfg, batch, state_dict, args)
    rows.append(
      (
        f"HF transformers {transformers.__version__} (torch {torch.__version__} eager, {args.hf_attn})",
        hf_first,
        hf_sec,
      )
    )
  compiled, how = compiled
  print(
    f"\nanalytic FLOPs per step {analytic / 1e9:.1f} G (3 x forward); our compiled matmul FLOPs "
    f"{compiled / 1e9:.1f} G ({how}): compiled/analytic {compiled / analytic:.3f}"
  )
  print(
    f"\n| implementation | first-step loss | step (median of {args.steps}) | tokens/s | useful GFLOP/s | "
    f"of matmul peak |\n|---|---|---|---|---|---|"
  )
  for name, loss, s in rows:
    gf = analytic / s
    print(f"| {name} | {loss:.5f} | {s:.3f} s | {fmt_rate(b * t / s)} | {gf / 1e9:.1f} | {gf / peak:.1%} |")
  if args.hf:
    print(
      f"\nours / HF tokens/s: {rows[1][2] / rows[0][2]:.2f}x; first-step losses differ by "
      f"{abs(rows[0][1] - rows[1][1]) / abs(rows[1][1]):.1e} (relative)"
    )
  print(
    "useful GFLOP/s = analytic FLOPs / step time (work a perfect sparse implementation must do; HF "
    "computes every expert for every token, so its own FLOP rate is higher than its useful rate)"
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
