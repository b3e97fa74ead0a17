"""Generation with KV caches: jitted prefill + a jitted decode loop; sampling; a CLI for synthetic data.

`python -m behemoth_jax.generate --ckpt RUN_OR_CKPT --prompts prompts.jsonl --out OUT_DIR [--config CFG.yaml]`

`--out OUT_DIR` is a resumable job (infer/shards.py): numbered JSONL shards, each committed atomically;
rerunning the same command after any interruption generates only the missing shards, with the same
completions as an uninterrupted run — each record's samples are keyed by the seed, the record's index in
the prompt file and the token position, and a shard's batches are the same in every run. `--out
FILE.jsonl` writes one file (renamed into place when complete).

Caches (attention.KVCache): chunked (RoPE) layers keep one chunk of keys in a ring — O(chunk) memory
however long the generation — and global layers keep every token. Batches are left-padded; every row
uses its true positions (0 at its first real token), so a padded row decodes exactly as it would alone.
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
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from behemoth_jax.cli import ArgumentParser
from behemoth_jax.config import ConfigError, ParallelConfig, load_config, to_dict
from behemoth_jax.convert import load_hf
from behemoth_jax.data import DataError, load_tokenizer, scores
from behemoth_jax.infer.shards import ShardedOutput, file_sha256
from behemoth_jax.model.transformer import check_token_ids, create_model, unstack_layers
from behemoth_jax.train.checkpoint import CheckpointError, find_config, restore_params
from behemoth_jax.train.losses import chunked_topk_logprobs
from behemoth_jax.train.state import restore_model_params
from sharding.api import place, use_mesh
from sharding.mesh import ShardingError, make_mesh
from sharding.rules import BATCH_AXES


@dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  seed: int = 0


def sample(logits_BV: jax.Array, key: jax.Array, s: Sampling, rows_B: jax.Array | None = None) -> jax.Array:
  """Next tokens [B] from float32 logits [B, V]. Row b draws with `fold_in(key, rows_B[b])` (default:
  its index b): give each row its record's identity and its draw depends on no other row."""
  if s.temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV / s.temperature
  if s.top_k > 0:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    drop_sorted = jnp.cumsum(probs, axis=-1) - probs > s.top_p  # keep the smallest set reaching top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  # One key per row: a row's draw does not depend on which other rows share the batch (or its padding).
  rows_B = jnp.arange(logits.shape[0]) if rows_B is None else rows_B
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(rows_B)
  return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, logits).astype(jnp.int32)


def left_pad(prompts: list[np.ndarray], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(ids [B, T], mask [B, T]) with each prompt right-aligned; T rounded up to `multiple`."""
  t = max(len(p) for p in prompts)
  t = -(-t // multiple) * multiple
  ids = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for b, p in enumerate(prompts):
    ids[b, t - len(p) :], mask[b, t - len(p) :] = p, 1
  return ids, mask


def prefill(graphdef, params, ids_BT, mask_BT, pixel_values, max_len):
  model = nnx.merge(graphdef, params)
  positions = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)
  caches = model.init_cache(ids_BT.shape[0], max_len)
  x = model.embed_inputs(ids_BT, pixel_values)
  h, _, caches = model.forward(x, positions, mask_BT.astype(jnp.int32), caches)
  return model.logits(h[:, -1:])[:, 0], caches, positions[:, -1]


def decode_step(graphdef, params, caches, tokens_B, positions_B):
  """(next-token logits [B, V], updated caches) of one token per sequence at `positions_B`."""
  model = nnx.merge(graphdef, params)
  x = model.embed_tokens(tokens_B[:, None])
  ones = jnp.ones_like(tokens_B)[:, None]
  h, _, caches = model.forward(x, positions_B[:, None], ones, caches)
  return model.logits(h)[:, 0], caches


def _generate(
  graphdef,
  params,
  ids_BT,
  mask_BT,
  pixel_values,
  records_B,
  *,
  max_new: int,
  stop_ids: tuple[int, ...],
  pad_id: int,
  sampling: Sampling,
):
  logits, caches, pos = prefill(graphdef, params, ids_BT, mask_BT, pixel_values, ids_BT.shape[1] + max_new)
  b = ids_BT.shape[0]
  key = jax.random.key(sampling.seed)
  stop = jnp.asarray(stop_ids or (-1,), jnp.int32)

  def cond(state):
    i, _, done, *_ = state
    return (i < max_new) & ~jnp.all(done)

  def body(state):
    i, out, done, logits, caches, pos = state
    # The draw of new token i of record r: fold_in(fold_in(key(seed), i), r), whatever the batch.
    tok = sample(logits, jax.random.fold_in(key, i), sampling, records_B)
    tok = jnp.where(done, pad_id, tok)
    out = out.at[:, i].set(tok)
    done = done | jnp.isin(tok, stop)
    pos = pos + 1
    logits, caches = decode_step(graphdef, params, caches, tok, pos)
    return i + 1, out, done, logits, caches, pos

  out = jnp.full((b, max_new), pad_id, jnp.int32)
  init = (jnp.zeros((), jnp.int32), out, jnp.zeros((b,), bool), logits, caches, pos)
  n, out, *_ = jax.lax.while_loop(cond, body, init)
  return out, n


class Generator:
  """Compiled prefill + decode loop for one model (recompiles per prompt length bucket and batch).

  With `mesh`, the model's parameters are placed by the sharding rules and generation runs on the
  mesh (the batch is padded with empty rows to a multiple of the token-sharding axes). Layers are
  decoded from an unscanned copy of a scanned model (`transformer.unstack_layers`; one more copy of
  the layer weights while the caller keeps the original): faster decoding (docs/PERFORMANCE.md)."""

  def __init__(
    self, model, *, stop_ids: tuple[int, ...], pad_id: int, sampling: Sampling = Sampling(), bucket: int = 64, mesh=None
  ):

    self.graphdef, self.params = nnx.split(unstack_layers(model))  # no per-token slicing of stacked weights
    self.vocab_size = model.cfg.vocab_size
    self.stop_ids, self.pad_id, self.sampling, self.bucket = tuple(stop_ids), pad_id, sampling, bucket
    self.mesh, self.rows_multiple = mesh, 1
    if mesh is not None:
      self.params = place(self.params, mesh)
      self.rows_multiple = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    self._jit = {}

  def __call__(
    self,
    prompts: list[np.ndarray],
    max_new_tokens: int,
    pixel_values: np.ndarray | None = None,
    records: list[int] | None = None,
  ) -> list[np.ndarray]:
    """Completions (without the prompt, cut after the first stop token) for left-padded `prompts`.
    `records`: each prompt's identity (its index in the prompt file), which keys its samples
    (default: its position in this call)."""

    n = len(prompts)
    rows = [np.asarray(p, np.int32) for p in prompts]
    for i, row in enumerate(rows):
      if row.ndim != 1 or row.size == 0:
        raise ValueError(f"prompts[{i}]: expected a non-empty 1-D list of token ids, got shape {row.shape}")
      check_token_ids(row, self.vocab_size, f"prompts[{i}]")
    rows += [np.asarray([self.pad_id], np.int32)] * ((-n) % self.rows_multiple)  # filler rows, dropped below
    ids, mask = left_pad(rows, self.pad_id, self.bucket)
    mask[n:] = 0
    records_B = np.arange(len(rows), dtype=np.int32)
    if records is not None:
      records_B[:n] = records
    fn = self._jit.get(max_new_tokens)
    if fn is None:
      fn = self._jit[max_new_tokens] = jax.jit(
        partial(
          _generate,
          self.graphdef,
          max_new=max_new_tokens,
          stop_ids=self.stop_ids,
          pad_id=self.pad_id,
          sampling=self.sampling,
        )
      )
    if self.mesh is None:
      out, _ = fn(self.params, ids, mask, pixel_values, records_B)
    else:
      with use_mesh(self.mesh):
        out, _ = fn(self.params, ids, mask, pixel_values, records_B)
    out = np.asarray(out)[:n]
    results = []
    for row in out:
      hits = np.nonzero(np.isin(row, self.stop_ids))[0]
      results.append(row[: hits[0] + 1] if hits.size else row)
    return results


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
  if weights != "auto":
    if hf:
      raise ConfigError(
        f"--weights {weights}: converted weights load from --ckpt (behemoth-convert from-hf the HF directory first)"
      )
    quant = weights if weights in ("fp8", "int8") else "none"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype="bfloat16", weight_quant=quant))
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

  records = []
  try:
    lines = Path(path).read_text().splitlines()
  except FileNotFoundError:
    raise DataError(f"{path}: prompts file not found") from None
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
      raise DataError(f"{path}: line {i}: needs a string field {field!r}")
    records.append(rec)
  if not records:
    raise DataError(f"{path}: no prompts")
  return records


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
  p.add_argument("--batch-size", type=int, default=8)
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
    field = args.field or ("text" if args.score else "prompt")
    records = read_prompts(args.prompts, field)
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
  gen = Generator(
    model,
    stop_ids=stop,
    pad_id=tok.pad_id,
    sampling=Sampling(args.temperature, args.top_k, args.top_p, args.seed),
    mesh=mesh,
  )
  encode = lambda r: np.concatenate(  # noqa: E731
    [[tok.bos_id] if tok.bos_id is not None else [], tok.encode(r[field])]
  ).astype(np.int32)
  if sharded:
    job = {
      "checkpoint": str(Path(args.ckpt or args.hf).resolve()),
      "model": to_dict(cfg)["model"],
      "weights": args.weights,
      "prompts_sha256": file_sha256(args.prompts),
      "field": field,
      "max_new_tokens": args.max_new_tokens,
      "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed},
      "batch_size": args.batch_size,
    }
    try:
      shards = ShardedOutput(out, job, len(records), args.shard_records)
    except DataError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    mine = (args.process_id, args.num_processes)
    return _generate_shards(gen, shards, records, encode, tok, args.max_new_tokens, args.batch_size, mine)
  tmp = out.with_name(out.name + ".tmp")
  new_tokens, t0 = 0, time.perf_counter()
  bar = tqdm(total=len(records), unit="prompt", dynamic_ncols=True)
  # Scores into an ArrayRecord file are compact binary records (data/scores.py), else JSONL lines.
  binary = bool(args.score) and out.suffix.lower() in scores.SUFFIXES
  with scores.Writer(tmp, args.score_dtype) if binary else tmp.open("w") as f:
    for start in range(0, len(records), args.batch_size):
      batch = records[start : start + args.batch_size]
      encoded = [encode(r) for r in batch]
      if args.score:
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
      else:
        for r, c in zip(batch, gen(encoded, args.max_new_tokens), strict=True):
          f.write(json.dumps({**r, "completion": tok.decode(c), "completion_ids": c.tolist()}) + "\n")
          new_tokens += len(c)
      bar.update(len(batch))
      bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):,.0f}")
  bar.close()
  tmp.rename(out)
  print(
    f"wrote {len(records)} records to {out} ({new_tokens:,} tokens, "
    f"{new_tokens / (time.perf_counter() - t0):,.0f} tokens/s)"
  )
  return 0


def _generate_shards(
  gen, shards: ShardedOutput, records, encode, tok, max_new: int, batch_size: int, process=(0, 1)
) -> int:
  """The resumable job: the shards not yet committed, in order, each generated in batches of its own
  records (the same batches in every run: a resumed run computes what an uninterrupted one would).
  `process` (I, N): this process takes the shards k with k mod N = I."""
  me, count = process
  owned = [k for k in range(shards.num_shards) if k % count == me]
  pending = [k for k in shards.pending() if k % count == me]
  total = sum(len(shards.records(k)) for k in owned)
  before = total - sum(len(shards.records(k)) for k in pending)
  who = f" (process {me} of {count}: {len(owned)} of the job's {shards.num_shards} shards)" if count > 1 else ""
  if before:
    print(f"resuming {shards.dir}{who}: {before} of {total} records in {len(owned) - len(pending)} shards")
  new_tokens, t0 = 0, time.perf_counter()
  bar = tqdm(total=total, initial=before, unit="prompt", dynamic_ncols=True)
  for k in pending:
    shards.clean(k)
    lines, idx = [], list(shards.records(k))
    for start in range(0, len(idx), batch_size):
      batch = idx[start : start + batch_size]
      for i, c in zip(batch, gen([encode(records[i]) for i in batch], max_new, records=batch), strict=True):
        lines.append(json.dumps({**records[i], "completion": tok.decode(c), "completion_ids": c.tolist()}))
        new_tokens += len(c)
      bar.update(len(batch))
      bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):,.0f}")
    shards.commit(k, lines)
  bar.close()
  left = len(shards.pending())
  print(
    f"wrote {total - before} records to {shards.dir}{who} ({new_tokens:,} tokens, "
    f"{new_tokens / (time.perf_counter() - t0):,.0f} tokens/s); "
    + (f"{left} shards left to the other processes" if left else f"the job is complete: {shards.num_shards} shards")
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
