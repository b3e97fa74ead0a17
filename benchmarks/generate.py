"""bench-moe generation, side by side: ours (jitted prefill + decode loop) vs Hugging Face `generate`.

    python benchmarks/generate.py [--batch 2] [--prompt 128] [--new 128] [--repeats 3]

The same weights in both (ours exported with to_torch_state_dict), the same random prompts, greedy
decoding of exactly `--new` tokens (no stop token), the same thread count. Both are timed the same
way: prefill = generating 1 token; decode = (generating `--new` tokens − generating 1) / (new − 1)
steps, medians of `--repeats` runs after a warm-up run (which also compiles ours). The greedy
continuations are compared token by token (float32 both sides: they agree unless two logits tie to
rounding). Results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import numpy as np
from common import BENCH_MOE, cores, fmt_rate, hf_model, median_seconds, set_torch_threads

from behemoth_jax.infer.generate import Generator
from behemoth_jax.model.transformer import create_model


def ours(model, prompts: np.ndarray, new: int, repeats: int):
  gen = Generator(model, stop_ids=(), pad_id=model.cfg.pad_token_id, bucket=prompts.shape[1])
  rows = list(prompts)
  out = {}
  for n in (1, new):
    gen(rows, n)  # compile + warm up
    out[n] = median_seconds(lambda: gen(rows, n), repeats)[0]
  return out[1], out[new], np.stack(gen(rows, new))


def hf(model, prompts: np.ndarray, new: int, repeats: int):
  import torch

  from behemoth_jax.convert.export import to_torch_state_dict

  m = hf_model(model.cfg, to_torch_state_dict(model)).eval()
  ids = torch.as_tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)

  def run(n):
    with torch.no_grad():
      return m.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=model.cfg.pad_token_id,
      )

  out = {}
  for n in (1, new):
    run(n)
    out[n] = median_seconds(lambda: run(n), repeats)[0]
  return out[1], out[new], run(new)[:, prompts.shape[1] :].numpy()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
  p.add_argument("--new", type=int, default=128, help="generated tokens per row (>= 2)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
  p.add_argument("--no-hf", dest="hf", action="store_false", help="ours only")
  args = p.parse_args(argv)
  if args.new < 2 or args.repeats < 1 or args.batch < 1 or args.prompt < 1:
    p.error("--new must be >= 2; --repeats, --batch, --prompt >= 1")
  n = cores()
  set_torch_threads(n)
  model = create_model(BENCH_MOE)
  b, t, new = args.batch, args.prompt, args.new
  prompts = np.random.default_rng(0).integers(3, BENCH_MOE.vocab_size, (b, t)).astype(np.int32)
  print(
    f"bench-moe generation, batch {b}, prompt {t}, {new} new tokens (greedy), float32; {n} cores; "
    f"jax {jax.__version__} on {jax.default_backend()}"
  )
  rows = [("ours (jax.jit)", *ours(model, prompts, new, args.repeats))]
  if args.hf:
    import torch
    import transformers

    rows.append(
      (
        f"HF transformers {transformers.__version__} generate (torch {torch.__version__}, sdpa)",
        *hf(model, prompts, new, args.repeats),
      )
    )
  print("\n| implementation | prefill s | prefill tokens/s | decode ms/step | decode tokens/s |\n|---|---|---|---|---|")
  rates = []
  for name, t1, tn, _ in rows:
    step = (tn - t1) / (new - 1)
    rates.append((b * t / t1, b / step))
    print(f"| {name} | {t1:.3f} | {fmt_rate(b * t / t1)} | {1e3 * step:.1f} | {fmt_rate(b / step)} |")
  if args.hf:
    same = float(np.mean(rows[0][3] == rows[1][3]))
    print(
      f"\nours / HF: prefill {rates[0][0] / rates[1][0]:.2f}x, decode {rates[0][1] / rates[1][1]:.2f}x; "
      f"greedy tokens identical: {same:.1%}"
    )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
