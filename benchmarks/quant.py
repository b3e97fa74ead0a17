"""Quantized teacher weights against bf16 on a trained tiny model: greedy agreement and log-prob drift.

    python benchmarks/quant.py [--ckpt RUN_DIR] [--prompts 64] [--new 64] [--prompt-len 32]

Without --ckpt it first trains configs/tiny.yaml (`python train.py`, 200 steps, ~3 minutes on 2 cores)
into runs/quant-teacher (reused when finished). Then it loads the checkpoint three ways, as
`python -m behemoth_jax.generate --weights` does (generate.load_model: bf16, or the attention, dense and
expert projections quantized per output channel to fp8 e4m3 / int8 as they are restored), takes
`--prompts` prompts of `--prompt-len` tokens from the built-in corpus (one window per document, in
corpus order), greedy-decodes `--new` tokens each (no stop token), and prints for fp8 and int8:

- tokens equal to bf16's at the same place (of prompts × new), and prompts whose whole continuation is;
- mean |Δ log-prob|: bf16's greedy continuations teacher-forced through each model, the log-probability
  each gives bf16's chosen tokens, against bf16's own (nats per token);
- the model's parameter bytes against bf16's (the tiny model's embedding and LM head stay bf16 and weigh
  much more here than in Behemoth: docs/SCALE.md has Behemoth's compiled weight memory).

Issue 23 aims for >= 95% of tokens equal. Greedy decoding compounds: after a first different token the
rest of a row usually differs too, so the token share is lower than the per-step agreement.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import numpy as np
from common import ROOT
from flax import nnx

from behemoth_jax.data import load_tokenizer
from behemoth_jax.data.sources import builtin_corpus
from behemoth_jax.infer.decoding import Generator
from behemoth_jax.infer.generate import load_model


def teacher(ckpt: str | None) -> str:
  """A trained tiny run directory: `ckpt`, or runs/quant-teacher (trained here once)."""
  if ckpt:
    return ckpt
  out = ROOT / "runs" / "quant-teacher"
  if not (out / "summary.json").exists():
    subprocess.run([sys.executable, str(ROOT / "train.py"), f"train.out_dir={out}"], check=True, cwd=ROOT)
  return str(out)


def prompts_from_corpus(tok, n: int, length: int) -> list[np.ndarray]:
  docs = [ids for ids in (np.asarray(tok.encode(d), np.int32) for d in builtin_corpus()) if len(ids) > 2 * length]
  return [docs[i % len(docs)][(i // len(docs)) * length :][:length] for i in range(n)]


def logprobs_of(model, ids: np.ndarray, start: int) -> np.ndarray:
  """log p(ids[:, t] | ids[:, :t]) for t >= start, teacher-forced in one forward pass."""
  logp = np.asarray(jax.nn.log_softmax(model(ids).astype(np.float32), axis=-1))  # tiny: eager is fine
  t = np.arange(start, ids.shape[1])
  return np.take_along_axis(logp[:, t - 1], ids[:, t, None], axis=-1)[..., 0]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  p.add_argument("--ckpt", help="a train.py run directory (default: train configs/tiny.yaml once)")
  p.add_argument("--prompts", type=int, default=64)
  p.add_argument("--new", type=int, default=64, help="greedy tokens per prompt")
  p.add_argument("--prompt-len", type=int, default=32)
  a = p.parse_args(argv)
  ckpt = teacher(a.ckpt)
  out, ids, params = {}, None, {}
  for weights in ("bf16", "fp8", "int8"):
    model, cfg = load_model(None, ckpt, None, [], weights)
    if ids is None:
      tok = load_tokenizer(cfg.data.tokenizer)
      prompts = prompts_from_corpus(tok, a.prompts, a.prompt_len)
    gen = Generator(model, stop_ids=(), pad_id=cfg.model.pad_token_id)
    out[weights] = np.stack(gen(prompts, a.new))
    if ids is None:  # bf16's continuations, teacher-forced through every model
      ids = np.concatenate([np.stack(prompts), out["bf16"]], axis=1)
    params[weights] = (sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))), logprobs_of(model, ids, a.prompt_len))
  print(
    f"{ckpt}: {a.prompts} prompts of {a.prompt_len} tokens from the built-in corpus, {a.new} greedy tokens each; "
    f"jax {jax.__version__} on {jax.default_backend()}\n\n"
    "| weights | tokens equal to bf16's | whole rows equal | mean abs delta log-prob (nats/token) "
    "| parameter bytes vs bf16 |\n"
    "|---|---|---|---|---|"
  )
  base_bytes, base_lp = params["bf16"]
  for weights in ("fp8", "int8"):
    same = out[weights] == out["bf16"]
    nbytes, lp = params[weights]
    print(
      f"| {weights} | {same.mean():.1%} | {same.all(axis=1).mean():.1%} | {np.abs(lp - base_lp).mean():.4f} | "
      f"{nbytes / base_bytes:.3f} |"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
