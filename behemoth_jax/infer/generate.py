"""Generation with KV caches (continuous batching or static batches), sampling, scoring; a CLI for synthetic data.

`python -m behemoth_jax.generate --ckpt RUN_OR_CKPT --prompts prompts.jsonl --out OUT_DIR [--config CFG.yaml]`

`--out OUT_DIR` is a resumable job (infer/shards.py): numbered JSONL shards, each committed atomically;
rerunning the same command after any interruption generates only the missing shards, with the same
completions as an uninterrupted run — each record's samples are keyed by the seed, the record's index in
the prompt file and the token position, and a shard's batches are the same in every run. `--out
FILE.jsonl` writes one file (renamed into place when complete).

Continuous batching (default; infer/engine.py): `--batch-size` decode slots, each refilled from the prompt
stream as soon as its row ends, new prompts prefilled packed and copied into the running caches, with
no recompilation per batch. `--batching static` (infer/decoding.py) runs left-padded batches to their
longest row. A record may set its own `max_new_tokens`; a prompt that does not fit `--context` gets an
`error` field instead of a completion. Caches (attention.KVCache): chunked (RoPE) layers keep one chunk
of keys in a ring — O(chunk) memory however long the generation — and global layers keep every token.
Every row uses its true positions (0 at its first real token), so a row decodes exactly as it would alone.
Sampling: greedy (temperature 0), temperature, top-k, top-p, seeded; rows stop at any stop token.
`--score` writes, instead of completions, the model's top-k log-probabilities at every position of
each record's text (offline distillation targets): JSONL lines, or with `--out F.array_record` compact
binary records (data/scores.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from behemoth_jax.cli import ArgumentParser
from behemoth_jax.config import ConfigError, ParallelConfig, load_config, to_dict
from behemoth_jax.convert import load_hf
from behemoth_jax.data import DataError, load_tokenizer, scores
from behemoth_jax.infer.decoding import Generator, Sampling, decode_step, left_pad, prefill, sample  # noqa: F401
from behemoth_jax.infer.engine import ContinuousBatcher
from behemoth_jax.infer.shards import ShardedOutput, file_sha256
from behemoth_jax.model.transformer import create_model
from behemoth_jax.train import peers
from behemoth_jax.train.checkpoint import CheckpointError, find_config, restore_params
from behemoth_jax.train.losses import chunked_topk_logprobs
from behemoth_jax.train.state import restore_model_params
from sharding.mesh import ShardingError, make_mesh


def prefill_logits(model, ids_BT, mask_BT=None, pixel_values=None, max_len=None):
  """(last-position logits, caches, positions) of a left-padded batch: for tests and scoring."""
  graphdef, params = nnx.split(model)
  mask_BT = np.ones_like(ids_BT) if mask_BT is None else mask_BT
  return _jit_prefill(
    graphdef, params, jnp.asarray(ids_BT), jnp.asarray(mask_BT), pixel_values, max_len or ids_BT.shape[1]
  )


def decode_logits(model, caches, tokens_B, positions_B):
  """(next-token logits, caches) of one decode step (jitted; compiled once per shape)."""
  graphdef, params = nnx.split(model)
  return _jit_decode(graphdef, params, caches, jnp.asarray(tokens_B), jnp.asarray(positions_B))


_jit_prefill = jax.jit(prefill, static_argnums=(0, 5))
_jit_decode = jax.jit(decode_step, static_argnums=0)


SCORE_CHUNK = 8192  # vocabulary columns per step of the scoring scan (as train.ce_chunk)


def topk_logprobs(
  model, ids_BT: np.ndarray, k: int, segment_ids_BT: np.ndarray | None = None, chunk: int = SCORE_CHUNK
):
  """(top-k ids [B, T, k], their log-probs [B, T, k]) of the next token at every position, over
  vocabulary chunks of `chunk` columns (no [B, T, V] logits)."""
  graphdef, params = nnx.split(model)
  seg = None if segment_ids_BT is None else jnp.asarray(segment_ids_BT)
  idx, logp = score_step(graphdef, k, chunk)(params, jnp.asarray(ids_BT), seg)
  return np.asarray(idx), np.asarray(logp)


def score_step(graphdef, k: int, chunk: int = SCORE_CHUNK, **jit_kwargs):
  """jit(params, ids [B, T], segment ids or None) → (top-k ids, log-probs): the scoring program, also
  compiled for TPU slices by `python -m behemoth_jax.memory --prefill T --score K`."""
  return _score_jit(graphdef, k, chunk, tuple(sorted(jit_kwargs.items())))


@lru_cache(maxsize=16)
def _score_jit(graphdef, k: int, chunk: int, jit_kwargs: tuple):
  def score(params, ids_BT, segment_ids_BT):
    model = nnx.merge(graphdef, params)
    h = model.hidden_states(model.embed_inputs(ids_BT), None, segment_ids_BT)
    return chunked_topk_logprobs(h, model.lm_head_weight().astype(h.dtype), k, chunk)

  return jax.jit(score, **dict(jit_kwargs))


# --- CLI ------------------------------------------------------------------------------------------
WEIGHTS = ("auto", "bf16", "fp8", "int8")


def load_model(config: str | None, ckpt: str | None, hf: str | None, overrides: list[str], weights: str = "auto"):
  """(model, config) from an orbax checkpoint (config: given, or the config.yaml beside it) or from a
  Hugging Face directory (its config.json; `config` then only supplies dtypes and the tokenizer).
  `weights` (checkpoints only): bf16, or fp8 / int8 (`model.weight_quant`: projections and experts
  quantized per output channel weight by weight on their shards as the float checkpoint is restored)."""

  if config is None and ckpt is not None:
    config = find_config(ckpt)
    if config is None:
      raise ConfigError(f"--config: none given and no config.yaml beside {ckpt}")
  cfg = load_config(config, overrides)
  distributed = jax.process_count() > 1
  if weights != "auto" or distributed:
    if hf:
      raise ConfigError(
        f"--weights {weights}: converted weights load from --ckpt (behemoth-convert from-hf the HF directory first)"
      )
    if weights != "auto":
      quant = weights if weights in ("fp8", "int8") else "none"
      model_cfg = dataclasses.replace(cfg.model, param_dtype="bfloat16", weight_quant=quant)
      cfg = dataclasses.replace(cfg, model=model_cfg)
    if jax.device_count() > 1:  # placed on the config's mesh, as generation runs
      mesh = make_mesh(cfg.parallel)
    else:
      mesh = make_mesh(ParallelConfig(fsdp=1), jax.devices()[:1])
    graphdef, params = restore_model_params(ckpt, cfg.model, mesh, what="--ckpt")
    return nnx.merge(graphdef, params), cfg
  if hf:
    return load_hf(hf, dtype=cfg.model.param_dtype, compute_dtype=cfg.model.dtype), cfg

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(cfg.model)))
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
  params = restore_params(ckpt, target, what="--ckpt")
  return nnx.merge(graphdef, params), cfg


def read_prompts(path: str, field: str) -> list[dict]:
  """The records of a JSONL prompt file; one line naming the file and line for anything unusable."""
  records = []
  try:
    lines = Path(path).read_bytes().splitlines()
  except FileNotFoundError:
    raise DataError(f"{path}: prompts file not found") from None
  for i, raw in enumerate(lines, 1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: line {i}: not UTF-8 (byte {e.start})") from None
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
      raise DataError(f"{path}: line {i}: needs a string field {field!r}")
    n = rec.get("max_new_tokens")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
      raise DataError(f"{path}: line {i}: max_new_tokens must be a positive integer, got {n!r}")
    records.append(rec)
  if not records:
    raise DataError(f"{path}: no prompts")
  return records


class Completer:
  """Completions of records by index: continuous batching (`ContinuousBatcher`, default) or static
  batches (`Generator`). Each record may carry its own `max_new_tokens` (default `max_new`); a prompt of
  `context` tokens or more gets an error string instead of token ids; a completion stops at the context.
  Caches are sized once for the whole prompt file (`encoded`), so nothing recompiles between shards."""

  def __init__(self, model, records, encoded, *, batching: str, batch_size: int, context: int, max_new: int, **kw):
    self.records, self.encoded = records, encoded
    self.batching, self.batch_size, self.context, self.max_new = batching, batch_size, context, max_new
    fits = [i for i, ids in enumerate(encoded) if len(ids) < context]
    need = max((len(encoded[i]) + self.limit(i) for i in fits), default=context)
    if batching == "static":
      self.gen = Generator(model, **{k: v for k, v in kw.items() if k != "prefill_tokens"})
    else:
      max_len = min(context, -(-need // 64) * 64)
      self.engine = ContinuousBatcher(model, slots=batch_size, max_len=max_len, **kw)

  def limit(self, i: int) -> int:
    return min(self.records[i].get("max_new_tokens", self.max_new), self.context - len(self.encoded[i]))

  def __call__(self, idx: list[int], on_done) -> dict:
    """{record index: completion ids or an error string} of records `idx`; `on_done(n)` as n complete."""
    out, todo = {}, []
    for i in idx:
      if len(self.encoded[i]) >= self.context:
        out[i] = f"prompt of {len(self.encoded[i])} tokens does not fit the context of {self.context} tokens"
        on_done(1)
      else:
        todo.append(i)
    if not todo:
      return out
    if self.batching == "continuous":
      prompts, limits = [self.encoded[i] for i in todo], [self.limit(i) for i in todo]
      got = self.engine(prompts, limits, records=todo, on_done=lambda *_: on_done(1))
      return {**out, **dict(zip(todo, got, strict=True))}
    for s in range(0, len(todo), self.batch_size):
      batch = todo[s : s + self.batch_size]
      limits = [self.limit(i) for i in batch]
      got = self.gen([self.encoded[i] for i in batch], max(limits), records=batch)
      out.update({i: c[:k] for i, c, k in zip(batch, got, limits, strict=True)})
      on_done(len(batch))
    return out


def _output(rec: dict, c, tok) -> str:
  if isinstance(c, str):
    return json.dumps({**rec, "error": c})
  return json.dumps({**rec, "completion": tok.decode(c), "completion_ids": c.tolist()})


def main(argv: list[str] | None = None) -> int:
  p = ArgumentParser(prog="python -m behemoth_jax.generate", description=__doc__.splitlines()[0])
  p.add_argument(
    "--config",
    help="YAML config of the model and data.tokenizer (default: the config.yaml "
    "beside --ckpt; with --hf: dtypes and tokenizer only)",
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--ckpt", help="orbax checkpoint: a step directory or a train.py run directory (latest step)")
  src.add_argument("--hf", help="Hugging Face save_pretrained directory instead")
  p.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field (or --field); 'text' for --score")
  p.add_argument(
    "--out",
    required=True,
    help="output: a directory of JSONL shards, resumable (rerun the same command after any interruption), "
    "or one FILE.jsonl / FILE.array_record (written to FILE.tmp, renamed when complete)",
  )
  p.add_argument(
    "--num-processes",
    type=int,
    default=1,
    help="with --out DIR: processes sharing the job, each on its own devices (replicas); process I "
    "generates the shards k with k mod N = I, so every record is generated once (default: %(default)s)",
  )
  p.add_argument("--process-id", type=int, default=0, help="with --num-processes: this process's index I")
  p.add_argument(
    "--coordinator",
    help="with --num-processes/--process-id: one job over one mesh of every process's devices (jax.distributed; "
    "coordinator address host:port, as train.py): a model larger than one host; process 0 writes the shards",
  )
  p.add_argument(
    "--peer-timeout",
    type=float,
    default=30.0,
    metavar="SECONDS",
    help="with --coordinator: exit (one line naming it) when another process has sent no heartbeat for this "
    "long (default: %(default)s)",
  )
  p.add_argument(
    "--shard-records",
    type=int,
    default=256,
    help="with --out DIR: records per shard, the work a crash can lose (default: %(default)s)",
  )
  p.add_argument("--field", default=None, help="prompt field (default: prompt; text with --score)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--batch-size",
    type=int,
    default=8,
    help="decode slots (continuous batching) or rows per batch (static; and per scoring batch) (default: %(default)s)",
  )
  p.add_argument(
    "--batching",
    default="continuous",
    choices=("continuous", "static"),
    help="continuous: a row's slot is refilled from the prompt stream as soon as it ends; static: batches run "
    "until their longest row ends (default: %(default)s)",
  )
  p.add_argument(
    "--prefill-tokens",
    type=int,
    default=2048,
    help="continuous batching: tokens of new prompts prefilled together, packed into rows as long as the "
    "longest of them (default: %(default)s)",
  )
  p.add_argument(
    "--context",
    type=int,
    default=None,
    help="positions per record, prompt + completion (default: the model's max_position_embeddings); a longer "
    "prompt gets an 'error' field instead of a completion, a completion stops at the context",
  )
  p.add_argument(
    "--score",
    type=int,
    metavar="K",
    default=0,
    help="instead of generating, write the top-K log-probs of every next token of each text",
  )
  p.add_argument(
    "--score-dtype",
    default="bfloat16",
    choices=tuple(scores.LOGPROB_DTYPES),
    help="log-prob precision of binary score records (--out *.array_record; default: %(default)s)",
  )
  p.add_argument(
    "--weights",
    default="auto",
    choices=WEIGHTS,
    help="how the model's weights are held: auto (the config's param_dtype), bf16, or fp8 / int8 (projections "
    "and experts quantized per output channel, e4m3 or int8, from the float checkpoint; --ckpt only)",
  )
  p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dtype=float32")
  args = p.parse_args(argv)

  out = Path(args.out)
  sharded = out.suffix.lower() not in (".jsonl", ".json", *scores.SUFFIXES)
  try:
    if sharded and args.score:
      raise DataError(f"{out}: --score writes one file: give --out FILE.jsonl or FILE.array_record")
    if not 0 <= args.process_id < args.num_processes:
      raise DataError(f"--process-id: must be in [0, {args.num_processes}), got {args.process_id}")
    if args.num_processes > 1 and not sharded:
      raise DataError(f"--num-processes: processes share a job directory: give --out DIR, not {out}")
    if out.exists() and not sharded:
      raise DataError(f"{out}: already exists (remove it or choose another --out)")
    for name in ("max_new_tokens", "batch_size", "prefill_tokens"):
      if getattr(args, name) < 1:
        raise DataError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.context is not None and args.context < 2:
      raise DataError(f"--context: must be >= 2, got {args.context}")
    if args.coordinator and (args.score or not sharded or args.hf):
      raise DataError("--coordinator: one job over many processes generates into --out DIR from --ckpt")
    field = args.field or ("text" if args.score else "prompt")
    records = read_prompts(args.prompts, field)
    watch = None
    if args.coordinator:
      watch = peers.join(args.coordinator, args.num_processes, args.process_id, args.peer_timeout)
    model, cfg = load_model(args.config, args.ckpt, args.hf, args.overrides, args.weights)
    tok_path = cfg.data.tokenizer
    if args.hf and args.config is None and (Path(args.hf) / "tokenizer.json").is_file():
      tok_path = str(Path(args.hf) / "tokenizer.json")
    tok = load_tokenizer(tok_path)
  except (CheckpointError, ConfigError, DataError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  mesh = None
  if jax.device_count() > 1:  # a multi-device host: generate on the config's mesh
    try:
      mesh = make_mesh(cfg.parallel)
    except ShardingError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  stop = tuple(model.cfg.eos_token_ids) or ((tok.eos_id,) if tok.eos_id is not None else ())
  encode = lambda r: np.concatenate(  # noqa: E731
    [[tok.bos_id] if tok.bos_id is not None else [], tok.encode(r[field])]
  ).astype(np.int32)
  context = args.context or model.cfg.max_position_embeddings
  sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
  if not args.score:
    complete = Completer(
      model,
      records,
      [encode(r) for r in records],
      batching=args.batching,
      batch_size=args.batch_size,
      context=context,
      max_new=args.max_new_tokens,
      stop_ids=stop,
      pad_id=tok.pad_id,
      sampling=sampling,
      prefill_tokens=args.prefill_tokens,
      mesh=mesh,
    )
  if sharded:
    job = {
      "checkpoint": str(Path(args.ckpt or args.hf).resolve()),
      "model": to_dict(cfg)["model"],
      "weights": args.weights,
      "prompts_sha256": file_sha256(args.prompts),
      "field": field,
      "max_new_tokens": args.max_new_tokens,
      "context": context,
      "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed},
      # The schedule (which records share a decode step) is part of the computation: a resumed shard
      # is generated as the uninterrupted run generated it.
      "batching": {"kind": args.batching, "batch_size": args.batch_size, "prefill_tokens": args.prefill_tokens},
    }
    try:
      shards = ShardedOutput(out, job, len(records), args.shard_records)
    except DataError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    if watch is None:
      return _generate_shards(complete, shards, records, tok, (args.process_id, args.num_processes))
    status = _generate_shards(complete, shards, records, tok, writer=jax.process_index() == 0)
    watch.stop("done")
    return status
  if not args.score:
    return _generate_file(complete, out, records, tok)
  tmp = out.with_name(out.name + ".tmp")
  new_tokens, t0 = 0, time.perf_counter()
  bar = tqdm(total=len(records), unit="prompt", dynamic_ncols=True)
  # Scores into an ArrayRecord file are compact binary records (data/scores.py), else JSONL lines.
  binary = out.suffix.lower() in scores.SUFFIXES
  with scores.Writer(tmp, args.score_dtype) if binary else tmp.open("w") as f:
    for start in range(0, len(records), args.batch_size):
      batch = records[start : start + args.batch_size]
      encoded = [encode(r) for r in batch]
      ids, mask = left_pad(encoded, tok.pad_id)
      top_ids, top_lp = topk_logprobs(model, ids, args.score, segment_ids_BT=mask)
      for r, e, ti, tl in zip(batch, encoded, top_ids, top_lp, strict=True):
        n = len(e)
        if binary:
          f.write(r, e, ti[-n:], tl[-n:])
        else:
          rec = {**r, "ids": e.tolist(), "topk_ids": ti[-n:].tolist(), "topk_logprobs": np.round(tl[-n:], 5).tolist()}
          f.write(json.dumps(rec) + "\n")
        new_tokens += n
      bar.update(len(batch))
      bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):,.0f}")
  bar.close()
  tmp.rename(out)
  print(f"wrote {len(records)} records to {out} ({new_tokens:,} tokens, {_rate(new_tokens, t0)} tokens/s)")
  return 0


def _rate(tokens: int, t0: float) -> str:
  return f"{tokens / (time.perf_counter() - t0):,.0f}"


def _tokens(c) -> int:
  return 0 if isinstance(c, str) else len(c)


def _generate_file(complete: Completer, out: Path, records, tok) -> int:
  """The small-job form: every record into one JSONL file (written to FILE.tmp, renamed when complete)."""
  t0 = time.perf_counter()
  with tqdm(total=len(records), unit="prompt", dynamic_ncols=True) as bar:
    got = complete(list(range(len(records))), bar.update)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_text("".join(_output(records[i], got[i], tok) + "\n" for i in range(len(records))))
  tmp.rename(out)
  new_tokens = sum(_tokens(c) for c in got.values())
  print(f"wrote {len(records)} records to {out} ({new_tokens:,} tokens, {_rate(new_tokens, t0)} tokens/s)")
  return 0


def _generate_shards(
  complete: Completer, shards: ShardedOutput, records, tok, process=(0, 1), writer: bool = True
) -> int:
  """The resumable job: the shards not yet committed, in order, each generated from empty decode slots
  with its own records (the same schedule in every run: a resumed run computes what an uninterrupted
  one would). `process` (I, N): this process takes the shards k with k mod N = I. One job over the
  processes of one mesh (`writer`: whether this one commits) does every shard process 0 finds pending."""
  me, count = process
  owned = [k for k in range(shards.num_shards) if k % count == me]
  todo = np.isin(np.arange(shards.num_shards), shards.pending())
  if jax.process_count() > 1:  # every process of the mesh runs the same shards, in lockstep
    todo = multihost_utils.broadcast_one_to_all(todo)
  pending = [k for k in range(shards.num_shards) if todo[k] and k % count == me]
  total = sum(len(shards.records(k)) for k in owned)
  before = total - sum(len(shards.records(k)) for k in pending)
  who = f" (process {me} of {count}: {len(owned)} of the job's {shards.num_shards} shards)" if count > 1 else ""
  if before:
    print(f"resuming {shards.dir}{who}: {before} of {total} records in {len(owned) - len(pending)} shards")
  new_tokens, t0 = 0, time.perf_counter()
  bar = tqdm(total=total, initial=before, unit="prompt", dynamic_ncols=True, disable=not writer)
  for k in pending:
    idx = list(shards.records(k))
    got = complete(idx, bar.update)
    new_tokens += sum(_tokens(c) for c in got.values())
    bar.set_postfix(tok_s=_rate(new_tokens, t0))
    if writer:
      shards.clean(k)
      shards.commit(k, [_output(records[i], got[i], tok) for i in idx])
  bar.close()
  if not writer:
    return 0
  left = len(shards.pending())
  print(
    f"wrote {total - before} records to {shards.dir}{who} ({new_tokens:,} tokens, {_rate(new_tokens, t0)} tokens/s); "
    + (f"{left} shards left to the other processes" if left else f"the job is complete: {shards.num_shards} shards")
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
