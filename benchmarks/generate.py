"""bench-moe generation, side by side: ours (continuous batching, static batches) vs Hugging Face `generate`.

    python benchmarks/generate.py                  # the mixed job: 256 prompts of 8-512 tokens (~45 min on 2 cores)
    python benchmarks/generate.py --workload fixed [--batch 2] [--prompt 128] [--new 128] [--repeats 3]

`--workload mixed` (default) is a synthetic-data job: `--prompts` random prompts with lengths drawn
uniformly from 8 to 512, up to `--new` new tokens, greedy, and stop tokens that end rows early (picked
on a probe of 32 prompts so that about 60% of greedy completions hold one: completions end anywhere
from the first token to `--new`). Three ways, the same weights, one sitting: ours with continuous batching
(`--batch` slots, refilled as rows end), ours in static batches of `--batch` (each runs to its longest
row), and HF `generate` in left-padded batches of `--batch` (ended rows wait for the batch's longest).
Tokens/s counts generated tokens (each completion up to and including its stop token) over wall
time; ours are timed after a warm-up run that compiles (the compile-inclusive first run is printed
too); completions are compared token by token with HF's.

`--workload fixed`: equal-length prompts, prefill and decode timed apart. The same weights in both
(ours exported with to_torch_state_dict), the same random prompts, greedy
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

from behemoth_jax.infer.decoding import Generator, left_pad
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


def mixed_prompts(n: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, int(t)).astype(np.int32) for t in rng.integers(8, 513, n)]


def pick_stops(model, prompts, new: int, share: float = 0.6) -> tuple[int, ...]:
  """Stop tokens that end rows early: greedily, the token found in most of a probe's greedy completions
  (32 prompts) not yet ended by an earlier pick, until `share` of them would end early (a random
  model's completions rarely share a token: one stop token ends ~10% of them)."""
  gen = Generator(model, stop_ids=(), pad_id=model.cfg.pad_token_id)
  rows = [set(np.unique(r).tolist()) for r in gen(prompts[:32], new)]
  stops: list[int] = []
  while sum(any(t in r for t in stops) for r in rows) < share * len(rows):
    left = [r for r in rows if not any(t in r for t in stops)]
    stops.append(int(np.bincount(np.concatenate([list(r) for r in left])).argmax()))
  return tuple(stops)


def mixed(args, model) -> int:
  import time

  from behemoth_jax.infer.engine import ContinuousBatcher

  cfg, slots, new = model.cfg, args.batch, args.new
  prompts = mixed_prompts(args.prompts, cfg.vocab_size)
  stops = pick_stops(model, prompts, new)
  pad = cfg.pad_token_id
  lengths = [len(p) for p in prompts]
  print(
    f"bench-moe generation job: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens "
    f"(mean {np.mean(lengths):.0f}), up to {new} new tokens, greedy, {len(stops)} stop tokens, "
    f"{slots} slots / batch rows; "
    f"float32; {cores()} cores; jax {jax.__version__} on {jax.default_backend()}"
  )
  max_len = -(-(max(lengths) + new) // 64) * 64
  engine = ContinuousBatcher(model, slots=slots, max_len=max_len, stop_ids=stops, pad_id=pad, refill=args.refill)
  static = Generator(model, stop_ids=stops, pad_id=pad)

  def continuous():
    return engine(prompts, [new] * len(prompts))

  def batched():
    out = []
    for s in range(0, len(prompts), slots):
      out += static(prompts[s : s + slots], new)
    return out

  rows, outputs = [], {}
  for name, fn in (("ours, continuous batching", continuous), ("ours, static batches", batched)):
    t0 = time.perf_counter()
    fn()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    outputs[name] = fn()
    rows.append((name, time.perf_counter() - t0, cold))
  if args.hf:
    import torch
    import transformers

    from behemoth_jax.convert.export import to_torch_state_dict

    m = hf_model(cfg, to_torch_state_dict(model)).eval()

    def hf_batches():
      out = []
      for s in range(0, len(prompts), slots):
        ids, mask = left_pad(prompts[s : s + slots], pad)
        with torch.no_grad():
          g = m.generate(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=list(stops),
            pad_token_id=pad,
          )
        for row in g[:, ids.shape[1] :].numpy():
          hit = np.nonzero(np.isin(row, stops))[0]
          out.append(row[: hit[0] + 1] if hit.size else row)
      return out

    t0 = time.perf_counter()
    outputs["hf"] = hf_batches()
    name = f"HF transformers {transformers.__version__} generate (torch {torch.__version__}, sdpa), padded batches"
    rows.append((name, time.perf_counter() - t0, None))
  tokens = sum(len(c) for c in outputs["ours, continuous batching"])
  ended = np.mean([len(c) and c[-1] in stops for c in outputs["ours, continuous batching"]])
  print(
    f"\n{tokens:,} tokens generated (mean {tokens / len(prompts):.1f} a prompt; {ended:.0%} of rows ended by "
    f"a stop token)\n\n| implementation | seconds | tokens/s | first run (compiles) s |\n|---|---|---|---|"
  )
  for name, sec, cold in rows:
    print(f"| {name} | {sec:.1f} | {fmt_rate(tokens / sec)} | {'' if cold is None else f'{cold:.1f}'} |")
  cont = rows[0][1]
  ratios = f"continuous / static {rows[1][1] / cont:.2f}x"
  if args.hf:
    ratios += f", continuous / HF {rows[2][1] / cont:.2f}x, static / HF {rows[2][1] / rows[1][1]:.2f}x"
  for other in [k for k in outputs if k != "ours, continuous batching"]:
    a, b = outputs["ours, continuous batching"], outputs[other]
    same = np.mean([list(x) == list(y) for x, y in zip(a, b, strict=True)])
    ratios += f"; completions equal to {other.replace('ours, ', '')}: {same:.1%}"
  print(f"\ntokens/s {ratios}")
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  p.add_argument("--workload", choices=("mixed", "fixed"), default="mixed")
  p.add_argument("--batch", type=int, default=None, help="rows per batch / decode slots (default: 2 fixed, 32 mixed)")
  p.add_argument("--prompts", type=int, default=256, help="mixed: prompts in the job")
  p.add_argument("--refill", type=int, default=None, help="mixed: ended slots that trigger a refill (default: slots/4)")
  p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
  p.add_argument("--new", type=int, default=128, help="generated tokens per row (>= 2)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
  p.add_argument("--no-hf", dest="hf", action="store_false", help="ours only")
  args = p.parse_args(argv)
  if args.batch is None:
    args.batch = 32 if args.workload == "mixed" else 2
  if args.new < 2 or args.repeats < 1 or args.batch < 1 or args.prompt < 1:
    p.error("--new must be >= 2; --repeats, --batch, --prompt >= 1")
  n = cores()
  set_torch_threads(n)
  model = create_model(BENCH_MOE)
  if args.workload == "mixed":
    return mixed(args, model)
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
