"""Train a Llama 4 model: `python train.py [--config configs/tiny.yaml] [key=value ...]`.

With no arguments it trains the tiny config on the built-in corpus (Python's own pydoc topics,
byte-level tokens) on CPU and reports a held-out loss. This first version is a single-host loop
(AdamW, warmup + cosine, global-norm clipping); sharded meshes, grain input pipelines and orbax
checkpoints come with the training issue.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from behemoth_jax import ConfigError, create_model, load_config
from behemoth_jax.data import batches, builtin_corpus, split_stream, token_stream


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets_BT[..., None], axis=-1))


def make_step(graphdef, tx):
  def loss_fn(params, batch_BT):
    return cross_entropy(nnx.merge(graphdef, params)(batch_BT[:, :-1]), batch_BT[:, 1:])

  @jax.jit
  def train_step(params, opt_state, batch_BT):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch_BT)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

  return train_step, jax.jit(loss_fn)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: %(default)s)")
  parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=50")
  args = parser.parse_args(argv)
  try:
    cfg = load_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tc, mc = cfg.train, cfg.model
  train_tokens, heldout_tokens = split_stream(token_stream(builtin_corpus()))
  if mc.vocab_size <= 258:
    print(f"error: model.vocab_size: byte tokenizer needs > 258 ids, got {mc.vocab_size}", file=sys.stderr)
    return 2
  model = create_model(mc, seed=tc.seed)
  graphdef, params = nnx.split(model)
  schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps, tc.steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=tc.weight_decay))
  opt_state = tx.init(params)
  train_step, eval_loss = make_step(graphdef, tx)
  data = batches(train_tokens, tc.batch_size, tc.seq_len, tc.seed)
  tokens_per_step = tc.batch_size * tc.seq_len
  print(f"training {args.config}: {sum(x.size for x in jax.tree.leaves(params)):,} parameters, "
        f"{len(train_tokens):,} training tokens, {tc.steps} steps of {tokens_per_step:,} tokens")
  first = last = None
  bar = tqdm(range(tc.steps), unit="step", dynamic_ncols=True)
  t0 = time.perf_counter()
  for step in bar:
    params, opt_state, loss, gnorm = train_step(params, opt_state, jnp.asarray(next(data)))
    loss = float(loss)
    first = loss if first is None else first
    last = loss
    rate = tokens_per_step * (step + 1) / (time.perf_counter() - t0)
    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{float(schedule(step)):.2e}", gnorm=f"{float(gnorm):.2f}",
                    tok_s=f"{rate:,.0f}")
  heldout = batches(heldout_tokens, tc.batch_size, tc.seq_len, seed=12345)
  held = float(np.mean([eval_loss(params, jnp.asarray(next(heldout))) for _ in range(8)]))
  print(f"first loss {first:.3f} → final loss {last:.3f} ({last / first:.0%} of first); "
        f"held-out loss {held:.3f} ({held / np.log(2):.2f} bits/byte)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
