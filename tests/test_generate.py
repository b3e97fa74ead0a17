"""Generation: greedy decoding vs transformers `generate`, caches vs full forward, sampling, the CLI."""

import json

import jax
import numpy as np
import pytest
import torch
from hf_utils import MM_IDS, make_hf_mm_model, make_hf_model, save_hf

from behemoth_jax.convert import load_hf
from behemoth_jax.infer.engine import ContinuousBatcher
from behemoth_jax.infer.generate import Generator, Sampling, decode_logits, main, prefill_logits, sample

CONFIGS = {
  # 8 layers (scanned cycles), chunk 5: the 13-token prompt spans 3 chunks, decoding crosses 2 more
  "scout_like": dict(num_hidden_layers=8),
  # interleave 2, no qk-norm, chunk 3, 6 layers (cycle + tail)
  "maverick_like": dict(interleave_moe_layer_step=2, use_qk_norm=False, num_hidden_layers=6, attention_chunk_size=3),
  # top-2, irregular layer lists, MQA
  "irregular_top2": dict(
    num_hidden_layers=5,
    moe_layers=[0, 2, 3],
    no_rope_layers=[1, 0, 1, 1, 0],
    num_experts_per_tok=2,
    num_key_value_heads=1,
  ),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  out = {}
  for i, (name, overrides) in enumerate(CONFIGS.items()):
    hf = make_hf_model(seed=20 + i, **overrides)
    path = tmp_path_factory.mktemp(name)
    save_hf(hf, path)
    out[name] = (hf, load_hf(path, dtype="float32"))
  return out


def _hf_greedy(hf, prompt, n, **kw):
  with torch.no_grad():
    out = hf.generate(
      torch.as_tensor(np.asarray(prompt)[None]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0, **kw
    )
  return out[0, len(prompt) :].numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_padded_batch_equals_hf_generate_per_prompt(models, name):
  """A left-padded batch (true positions) decodes each row exactly as HF decodes it alone."""
  hf, ours = models[name]
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, 97, n) for n in (13, 4, 9)]
  got = Generator(ours, stop_ids=(2,), pad_id=0, bucket=8)(prompts, 12)
  for prompt, row in zip(prompts, got, strict=True):
    want = _hf_greedy(hf, prompt, 12)
    assert list(row) == list(want[: len(row)]), (len(prompt), row, want)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_continuous_batching_equals_hf_generate_per_prompt(models, name):
  """3 slots refilled from 8 prompts of 1-29 tokens: each slot is reused (its cache rows held a longer
  prompt before), prompts are prefilled packed several to a row, each record has its own limit.
  Every completion equals HF generating its prompt alone; one decode and one prefill program."""
  hf, ours = models[name]
  rng = np.random.default_rng(2)
  prompts = [rng.integers(3, 97, n) for n in (13, 1, 29, 4, 9, 20, 2, 17)]
  limits = [12, 3, 12, 1, 7, 12, 12, 5]
  engine = ContinuousBatcher(ours, slots=3, max_len=48, stop_ids=(2,), pad_id=0, prefill_tokens=64, refill=1)
  got = engine(prompts, limits)
  for prompt, k, row in zip(prompts, limits, got, strict=True):
    want = _hf_greedy(hf, prompt, k)
    assert list(row) == list(want[: len(row)]) and (len(row) == k or row[-1] == 2), (len(prompt), row, want)
  assert engine._decode._cache_size() == 1 and engine._prefill._cache_size() == 1
  assert [list(r) for r in engine(prompts[::-1], limits[::-1])] == [list(r) for r in got[::-1]]  # no recompile
  assert engine._decode._cache_size() == 1 and engine._prefill._cache_size() == 1


def test_continuous_samples_do_not_depend_on_slots_or_neighbours():
  """Sampled completions of continuous batching equal the static path's for each record alone, with
  2 slots or 5, rows of 64 or 128 tokens (a 70-token prompt), several prompts to a row."""
  from behemoth_jax.config import load_config
  from behemoth_jax.model.transformer import create_model

  model = create_model(load_config("configs/tiny.yaml", ["model.num_layers=4"]).model, seed=2)
  sampling = Sampling(temperature=1.0, top_p=0.9, seed=4)
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 256, n) for n in (9, 70, 3, 12, 30, 5, 21)]
  limits = [10, 4, 10, 7, 10, 2, 9]
  static = Generator(model, stop_ids=(257,), pad_id=258, sampling=sampling, bucket=16)
  want = [static([p], k, records=[i])[0] for i, (p, k) in enumerate(zip(prompts, limits, strict=True))]
  for slots in (2, 5):
    engine = ContinuousBatcher(
      model, slots=slots, max_len=96, stop_ids=(257,), pad_id=258, sampling=sampling, prefill_tokens=64
    )
    got = engine(prompts, limits)
    assert [list(r) for r in got] == [list(r) for r in want], slots
  assert len({len(r) for r in want}) > 2  # limits and lengths vary


@pytest.mark.parametrize("name", ["scout_like", "maverick_like"])
def test_incremental_decode_equals_full_forward(models, name):
  _, ours = models[name]
  ids = np.random.default_rng(2).integers(3, 97, (2, 19))
  full = np.asarray(jax.jit(lambda m, i: m(i))(ours, ids))
  logits, caches, pos = prefill_logits(ours, ids[:, :7], max_len=19)
  errs = [np.abs(np.asarray(logits) - full[:, 6]).max()]
  for t in range(7, 19):
    logits, caches = decode_logits(ours, caches, ids[:, t], pos + (t - 6))
    errs.append(np.abs(np.asarray(logits) - full[:, t]).max())
  assert max(errs) <= 1e-4, errs


def test_chunked_cache_size_is_independent_of_length(models):
  _, ours = models["scout_like"]  # chunk 5; layers 3 and 7 global
  short, long = ours.init_cache(2, 40), ours.init_cache(2, 4000)
  for s, l, kind in zip(short["cycles"], long["cycles"], range(4), strict=True):
    if kind == 3:  # the global (NoPE) layer of the cycle keeps every token
      assert s.k_BSKH.shape[2] == 40 and l.k_BSKH.shape[2] == 4000
    else:
      assert s.k_BSKH.shape == l.k_BSKH.shape == (2, 2, 5, 2, 10)  # [cycles, B, chunk, K, H]
      assert s.pos_BS.shape == l.pos_BS.shape


def test_multimodal_prompt_equals_hf_generate(tmp_path):
  hf = make_hf_mm_model(seed=3)
  save_hf(hf, tmp_path)
  ours = load_hf(tmp_path, dtype="float32")
  rng = np.random.default_rng(3)
  patch, tpt = MM_IDS["image_token_index"], ours.cfg.vision.tokens_per_tile
  prompt = np.concatenate([rng.integers(3, 88, 3), [90], [patch] * tpt, [91], rng.integers(3, 88, 4)])
  pixels = rng.normal(size=(1, 3, 28, 28)).astype(np.float32)
  got = Generator(ours, stop_ids=(2,), pad_id=0, bucket=4)([prompt], 8, pixel_values=pixels)[0]
  want = _hf_greedy(hf, prompt, 8, pixel_values=torch.as_tensor(pixels))
  assert list(got) == list(want[: len(got)])


def test_sampling_rules():
  import jax

  logits = jax.numpy.asarray(np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32))
  key = jax.random.key(0)
  greedy = np.asarray(sample(logits, key, Sampling()))
  assert (np.asarray(sample(logits, key, Sampling(temperature=1.0, top_k=1))) == greedy).all()
  assert (np.asarray(sample(logits, key, Sampling(temperature=1.0, top_p=1e-6))) == greedy).all()
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  draws = np.stack(
    [np.asarray(sample(logits, jax.random.key(s), Sampling(temperature=2.0, top_k=3))) for s in range(64)]
  )
  assert all(set(draws[:, b]) <= set(top3[b]) for b in range(4)) and len(set(draws[:, 0])) > 1
  # top-p 0.5 keeps the smallest prefix of the sorted distribution whose mass reaches 0.5
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  draws = np.stack(
    [np.asarray(sample(logits, jax.random.key(s), Sampling(temperature=1.0, top_p=0.5))) for s in range(64)]
  )
  for b in range(4):
    order = np.argsort(-probs[b])
    keep = order[: np.searchsorted(np.cumsum(probs[b][order]), 0.5) + 1]
    assert set(draws[:, b]) <= set(keep)


def test_a_records_samples_do_not_depend_on_its_batch_or_slot():
  """Sampled completions are keyed by the record's identity and the token position: record 9 gets the
  same completion beside another record, and in another slot of the batch."""
  from behemoth_jax.config import load_config
  from behemoth_jax.model.transformer import create_model

  model = create_model(load_config("configs/tiny.yaml", ["model.num_layers=2"]).model, seed=2)
  gen = Generator(model, stop_ids=(), pad_id=258, sampling=Sampling(temperature=1.0, seed=4), bucket=16)
  rng = np.random.default_rng(1)
  a, b, c = (rng.integers(0, 256, n) for n in (9, 12, 10))
  runs = [gen([a, b], 12, records=[5, 9])[1], gen([c, b], 12, records=[7, 9])[1], gen([b, a], 12, records=[9, 5])[0]]
  assert all(np.array_equal(runs[0], r) for r in runs[1:]), runs
  assert not np.array_equal(gen([b, a], 12, records=[8, 5])[0], runs[0])  # another identity, other samples


def test_cli_generate_and_score(tmp_path):
  hf = make_hf_model(seed=4, vocab_size=272, bos_token_id=256, eos_token_id=257, pad_token_id=258)
  save_hf(hf, tmp_path / "hf")
  (tmp_path / "cfg.yaml").write_text("model: {dtype: float32, param_dtype: float32}\n")
  (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "a longer prompt"}\n')
  common = ["--config", str(tmp_path / "cfg.yaml"), "--hf", str(tmp_path / "hf")]
  assert (
    main([*common, "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "5"])
    == 0
  )
  rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
  want = _hf_greedy_bytes(hf, "hello", 5)
  assert rows[0]["prompt"] == "hello" and rows[0]["completion_ids"] == want[: len(rows[0]["completion_ids"])]
  # an existing output is refused with one line
  assert main([*common, "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
  (tmp_path / "t.jsonl").write_text('{"text": "score me"}\n')
  assert (
    main([*common, "--prompts", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "s.jsonl"), "--score", "3"]) == 0
  )
  rec = json.loads((tmp_path / "s.jsonl").read_text())
  ids = np.asarray(rec["ids"])[None]
  with torch.no_grad():
    logp = torch.log_softmax(hf(torch.as_tensor(ids)).logits, -1)[0].numpy()
  np.testing.assert_allclose(np.asarray(rec["topk_logprobs"]), -np.sort(-logp, axis=-1)[:, :3], atol=1e-4)


def test_cli_continuous_limits_errors_and_static(tmp_path):
  """`generate` with continuous batching (default) and static batches writes the same records: a
  record's own max_new_tokens honoured, a prompt that does not fit --context gets an `error` field."""
  hf = make_hf_model(seed=4, vocab_size=272, bos_token_id=256, eos_token_id=257, pad_token_id=258)
  save_hf(hf, tmp_path / "hf")
  (tmp_path / "cfg.yaml").write_text("model: {dtype: float32, param_dtype: float32}\n")
  texts = ["hello", "x" * 40, "a longer prompt", "hi"]
  lines = [{"prompt": texts[0], "max_new_tokens": 2}, {"prompt": texts[1]}, {"prompt": texts[2]}, {"prompt": texts[3]}]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  common = [
    "--config",
    str(tmp_path / "cfg.yaml"),
    "--hf",
    str(tmp_path / "hf"),
    "--prompts",
    str(tmp_path / "p.jsonl"),
  ]
  runs = {}
  for how in ("continuous", "static"):
    out = tmp_path / f"{how}.jsonl"
    opts = ["--max-new-tokens", "6", "--context", "30", "--batch-size", "2", "--batching", how]
    assert main([*common, "--out", str(out), *opts]) == 0
    runs[how] = [json.loads(x) for x in out.read_text().splitlines()]
  assert runs["continuous"] == runs["static"]
  rows = runs["continuous"]
  assert [r["prompt"] for r in rows] == texts
  assert rows[1]["error"] == "prompt of 41 tokens does not fit the context of 30 tokens" and "completion" not in rows[1]
  for i, n in ((0, 2), (2, 6), (3, 6)):
    want = _hf_greedy_bytes(hf, texts[i], n)
    got = rows[i]["completion_ids"]
    assert got == want[: len(got)] and (len(got) == n or got[-1] == 257), (i, got, want)


def _hf_greedy_bytes(hf, text, n):
  prompt = [256, *text.encode()]
  with torch.no_grad():
    out = hf.generate(torch.as_tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=257, pad_token_id=258)
  return out[0, len(prompt) :].tolist()


def test_generation_on_a_mesh_equals_one_device():
  """Parameters sharded fsdp 4 × expert 2 (experts exchanged by all-to-all), batch padded to 8 rows."""
  from behemoth_jax.config import ParallelConfig, load_config
  from behemoth_jax.model.transformer import create_model
  from sharding.mesh import make_mesh

  cfg = load_config("configs/tiny.yaml", ["model.num_layers=4", "model.attention_chunk_size=8"]).model
  model = create_model(cfg, seed=5)
  rng = np.random.default_rng(5)
  prompts = [rng.integers(0, 256, n) for n in (11, 3, 20)]
  sampling = Sampling(temperature=0.7, top_k=20, seed=3)
  want = Generator(model, stop_ids=(257,), pad_id=258, sampling=sampling, bucket=8)(prompts, 10)
  mesh = make_mesh(ParallelConfig(fsdp=4, expert=2))
  got = Generator(model, stop_ids=(257,), pad_id=258, sampling=sampling, bucket=8, mesh=mesh)(prompts, 10)
  for a, b in zip(got, want, strict=True):
    assert list(a) == list(b)


def test_continuous_batching_on_a_mesh_equals_one_device():
  """Slots over the batch axes of fsdp 4 × expert 2 (caches sharded by slot), sampled: the same
  completions as on one device."""
  from behemoth_jax.config import ParallelConfig, load_config
  from behemoth_jax.model.transformer import create_model
  from sharding.mesh import make_mesh

  cfg = load_config("configs/tiny.yaml", ["model.num_layers=4", "model.attention_chunk_size=8"]).model
  model = create_model(cfg, seed=5)
  rng = np.random.default_rng(6)
  prompts = [rng.integers(0, 256, n) for n in (11, 3, 20, 7, 15)]
  sampling = Sampling(temperature=0.7, top_k=20, seed=3)
  kw = dict(slots=3, max_len=40, stop_ids=(257,), pad_id=258, sampling=sampling, prefill_tokens=64)
  want = ContinuousBatcher(model, **kw)(prompts, [10] * 5)
  engine = ContinuousBatcher(model, mesh=make_mesh(ParallelConfig(fsdp=4, expert=2)), **kw)
  assert engine.slots == 8  # a multiple of the batch axes
  got = engine(prompts, [10] * 5)
  assert [list(r) for r in got] == [list(r) for r in want]
