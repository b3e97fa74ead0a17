"""train.py end to end: resume on another mesh, fp8, packing, 2 processes, init_from, distillation.

Faults (SIGKILL, SIGTERM, corrupt checkpoints, NaN) are in test_faults.py."""

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from flax import nnx

import train
from behemoth_jax.config import load_config
from behemoth_jax.data import load_tokenizer, make_iterator
from behemoth_jax.model.transformer import create_model

ROOT = Path(__file__).parent.parent
SMALL = ["train.seq_len=64", "train.batch_size=8", "train.eval_batches=1", "train.warmup_steps=2"]


def _metrics(out: Path) -> dict[int, dict]:
  """step → metrics; a step logged twice (before a kill and after the restart) keeps its last record."""
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if "loss" in r}


def _final_params(out: Path, step: int):
  path = out / "checkpoints" / str(step) / "state"
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(path)["params"])


def _train_cmd(out: Path, steps: int, *extra: str) -> list[str]:
  return [
    sys.executable,
    str(ROOT / "train.py"),
    *SMALL,
    f"train.steps={steps}",
    "train.checkpoint_every=4",
    f"train.out_dir={out}",
    *extra,
  ]


@pytest.mark.parametrize("moments", ["auto", "fp8"])
def test_resume_on_a_different_mesh(tmp_path, moments):
  """Stopped at step 4 and resumed on another mesh: the losses and final parameters of an uninterrupted
  run, also with 8-bit Adam moments (float8 values and row scales restored onto the new mesh)."""
  ref, moved = tmp_path / "ref", tmp_path / "moved"
  small = [*SMALL, f"train.adam_moments={moments}"]
  assert train.main(["--config", "configs/tiny.yaml", *small, "train.steps=8", f"train.out_dir={ref}"]) == 0
  assert (
    train.main(
      ["--config", "configs/tiny.yaml", *small, "train.steps=8", f"train.out_dir={moved}", "--stop-after", "4"]
    )
    == 0
  )
  assert (
    train.main(
      [
        "--config",
        "configs/tiny.yaml",
        *small,
        "train.steps=8",
        f"train.out_dir={moved}",
        "parallel.fsdp=2",
        "parallel.expert=1",
        "parallel.data=2",
        "parallel.tensor=2",
      ]
    )
    == 0
  )
  want, got = _metrics(ref), _metrics(moved)
  for step in range(1, 9):
    np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-6, atol=1e-6, err_msg=str(step))
  # On another mesh reductions round differently (~1e-7); an 8-bit moment sitting on an e4m3 rounding
  # boundary then rounds the other way: 1-2 of 16384 elements of a tensor move by up to ~1.4e-4 after 4
  # steps at lr 3e-3 (a lost or zeroed moment would move nearly all of them by ~1e-3).
  for a, b in zip(_final_params(ref, 8), _final_params(moved, 8), strict=True):
    if moments == "auto":
      np.testing.assert_allclose(a, b, atol=1e-6)
    else:
      diff = np.abs(np.asarray(a) - np.asarray(b))
      assert np.mean(diff > 1e-6) <= 1e-3 and diff.max() < 1e-3, (np.mean(diff > 1e-6), diff.max())


def test_fp8_matches_bf16_and_uses_f8_dots(tmp_path):
  losses = {}
  for fp8 in (False, True):
    out = tmp_path / f"fp8_{fp8}"
    assert (
      train.main(
        [
          "--config",
          "configs/tiny.yaml",
          *SMALL,
          "train.steps=12",
          "model.dtype=bfloat16",
          f"model.fp8={str(fp8).lower()}",
          f"train.out_dir={out}",
        ]
      )
      == 0
    )
    losses[fp8] = _metrics(out)[12]["loss"]
  assert abs(losses[True] / losses[False] - 1) <= 0.03, losses
  from behemoth_jax.model.layers import matmul

  x, w = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.float32)
  lowered = jax.jit(
    jax.value_and_grad(lambda x, w: matmul("TD,DF->TF", x, w, True).astype(jnp.float32).sum(), argnums=(0, 1))
  ).lower(x, w)
  dots = [line for line in lowered.as_text().splitlines() if "dot_general" in line]
  f8_dots = [line for line in dots if line.count("xf8E") == 2]
  assert len(f8_dots) == len(dots) == 3  # forward e4m3 x e4m3, backward e5m2 gradient x e4m3 (twice)
  assert sum("f8E5M2" in line for line in f8_dots) == 2
  # XLA:CPU upcasts f8 operands to f32 right before its dot (GPU/TPU keep them): the f8 values survive.
  assert "f8e4m3fn" in lowered.compile().as_text()


def test_packed_rows_from_the_pipeline_equal_separate_documents(tmp_path):
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(["chunk", "expert", "router", "norm", "rope"], rng.integers(3, 12))) for _ in range(40)]
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
  cfg = load_config("configs/tiny.yaml", [f"data.source={tmp_path / 'docs.jsonl'}"])
  model = create_model(cfg.model, seed=1)
  batch = next(
    make_iterator(
      cfg.data,
      load_tokenizer("bytes"),
      split="train",
      seq_len=128,
      batch_size=2,
      seed=0,
      process_index=0,
      process_count=1,
    )
  )
  forward = jax.jit(lambda m, *a: m(*a))
  packed = np.asarray(forward(model, batch["inputs"], batch["positions"], batch["segment_ids"]))
  checked, t = 0, batch["inputs"].shape[1]
  for row in range(2):
    for seg in np.unique(batch["segment_ids"][row]):
      if seg == 0:
        continue
      idx = np.flatnonzero(batch["segment_ids"][row] == seg)
      # The document alone, right-padded to the row length so one program serves every document:
      # causal attention and dropless routing leave its own tokens untouched by what follows them.
      alone_ids = np.zeros((1, t), np.int32)
      alone_ids[0, : len(idx)] = batch["inputs"][row, idx]
      alone = forward(model, alone_ids, np.arange(t, dtype=np.int32)[None])
      np.testing.assert_allclose(packed[row, idx], np.asarray(alone)[0, : len(idx)], atol=1e-4)
      checked += 1
  assert checked >= 3  # rows really hold several documents


def test_init_from_checkpoint_and_missing_path(tmp_path, capsys):
  src, dst = tmp_path / "src", tmp_path / "dst"
  assert train.main(["--config", "configs/tiny.yaml", *SMALL, "train.steps=3", f"train.out_dir={src}"]) == 0
  # learning rate 0 (AdamW's decay is scaled by it too): the run's final parameters are its initial ones
  assert (
    train.main(
      [
        "--config",
        "configs/tiny.yaml",
        *SMALL,
        "train.steps=1",
        "train.learning_rate=0.0",
        f"train.init_from={src / 'checkpoints'}",
        f"train.out_dir={dst}",
      ]
    )
    == 0
  )
  for a, b in zip(_final_params(src, 3), _final_params(dst, 1), strict=True):
    np.testing.assert_array_equal(a, b)
  assert (
    train.main(
      [
        "--config",
        "configs/tiny.yaml",
        *SMALL,
        f"train.init_from={tmp_path / 'nope'}",
        f"train.out_dir={tmp_path / 'x'}",
      ]
    )
    == 2
  )
  assert "train.init_from:" in capsys.readouterr().err


def test_distill_from_a_run_and_generate_from_its_checkpoint(tmp_path, capsys):
  from behemoth_jax.infer import generate
  from behemoth_jax.train.checkpoint import restore_params

  teacher, student = tmp_path / "teacher", tmp_path / "student"
  assert train.main(["--config", "configs/tiny.yaml", *SMALL, "train.steps=2", f"train.out_dir={teacher}"]) == 0
  small = ["model.num_layers=2", "model.hidden_size=64", "model.head_dim=16"]
  assert (
    train.main(
      [
        "--config",
        "configs/tiny.yaml",
        *SMALL,
        *small,
        "train.steps=2",
        f"distill.teacher={teacher}",
        "distill.teacher_config=configs/tiny.yaml",
        "distill.teacher_dtype=fp8",  # quantized weight by weight on its shards as it is restored
        f"train.out_dir={student}",
      ]
    )
    == 0
  )
  rec = _metrics(student)[2]
  assert rec["soft_kl"] > 0 and 0 < rec["soft_weight"] < 1 and rec["hard_ce"] > 0
  assert "(3,871,872 parameters, frozen, held as fp8:" in capsys.readouterr().out
  assert (
    train.main(
      [
        "--config",
        "configs/tiny.yaml",
        *SMALL,
        f"distill.teacher={tmp_path / 'nope'}",
        f"train.out_dir={tmp_path / 'x'}",
      ]
    )
    == 2
  )
  assert "distill.teacher:" in capsys.readouterr().err
  # A teacher of another vocabulary: one line, nothing written.
  other = yaml.safe_load(open("configs/tiny.yaml"))
  other["model"]["vocab_size"] = 1024
  (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
  argv = ["--config", "configs/tiny.yaml", *SMALL, f"distill.teacher={teacher}", f"train.out_dir={tmp_path / 'y'}"]
  assert train.main([*argv, f"distill.teacher_config={tmp_path / 'other.yaml'}"]) == 2
  assert capsys.readouterr().err.strip() == (
    "error: distill.teacher_config: teacher vocab_size 1024 != student's 512 (distillation compares "
    "distributions token by token)"
  )
  assert not (tmp_path / "y").exists()
  # A teacher config that does not describe the teacher's checkpoint: one line naming a parameter.
  wrong = yaml.safe_load(open("configs/tiny.yaml"))
  wrong["model"]["intermediate_size"] = 128
  (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
  assert train.main([*argv, f"distill.teacher_config={tmp_path / 'wrong.yaml'}", "distill.teacher_dtype=int8"]) == 1
  err = capsys.readouterr().err.strip()
  assert re.fullmatch(
    r"error: distill\.teacher: \S+/teacher/checkpoints/2/state: parameter decoder/\S+/w_\w+ has shape "
    r"\([\d, ]*256[\d, ]*\) in the checkpoint but the config needs \([\d, ]*128[\d, ]*\) \(a checkpoint of "
    r"another model\?\)",
    err,
  ), err
  assert not (tmp_path / "y").exists()
  # The generate CLI on the teacher's run directory (latest step; 8 devices: on the config's mesh)
  (tmp_path / "p.jsonl").write_text('{"prompt": "def "}\n')
  assert (
    generate.main(
      [
        "--config",
        "configs/tiny.yaml",
        "--ckpt",
        str(teacher),
        "--prompts",
        str(tmp_path / "p.jsonl"),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--max-new-tokens",
        "6",
      ]
    )
    == 0
  )
  got = json.loads((tmp_path / "o.jsonl").read_text())["completion_ids"]
  cfg = load_config("configs/tiny.yaml")
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: create_model(cfg.model)))
  params = restore_params(teacher, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract))
  want = generate.Generator(nnx.merge(graphdef, params), stop_ids=(257,), pad_id=258)([[256, *b"def "]], 6)[0]
  assert got == want.tolist()


def test_weight_decay_follows_parameter_kinds():
  """Decided by each parameter's kind and rank (not its name): on a scanned multimodal model every
  norm scale, bias and 1-D parameter is left alone and every matrix and embedding table decays, and
  one AdamW step with zero gradients moves exactly those by lr·wd·p."""
  from behemoth_jax.train.step import decay_mask, make_optimizer, make_schedule

  cfg = load_config("configs/tiny_mm.yaml", ["model.num_layers=8", "train.weight_decay=0.25"])
  params = nnx.split(create_model(cfg.model, 0))[1]
  paths = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
  kept = {p for p, v in paths.items() if not v}
  blocks = [
    f"['decoder']['cycles']['blocks'][{j}]['{n}']['weight_D']"
    for j in range(4)
    for n in ("input_norm", "post_attn_norm")
  ]
  vision = [f"['vision']['layers']['{n}']" for n in ("bq_NH", "bk_NH", "bv_NH", "bo_D", "fc1_b_F", "fc2_b_D")]
  vision += [
    f"['vision']{ln}['{n}']"
    for ln in ("['layers']['ln1']", "['layers']['ln2']", "['ln_pre']", "['ln_post']")
    for n in ("weight_D", "bias_D")
  ]
  assert kept == {*blocks, "['final_norm']['weight_D']", "['vision']['class_embedding_D']", *vision}
  for must_decay in (
    "['embed']['table_VD']",
    "['lm_head_DV']",
    "['vision']['pos_embedding_SD']",
    "['vision']['layers']['wq_DNH']",
    "['decoder']['cycles']['blocks'][0]['ffn']['w_gate_EDF']",
  ):
    assert paths[must_decay], must_decay

  tx, lr = make_optimizer(cfg.train), float(make_schedule(cfg.train)(1))

  @jax.jit
  def second_update(params):  # the schedule's first step has lr 0
    opt, zeros = tx.init(params), jax.tree.map(jnp.zeros_like, params)
    opt = tx.update(zeros, opt, params)[1]
    return tx.update(zeros, opt, params)[0]

  updates = second_update(params)
  for (path, u), p in zip(
    jax.tree_util.tree_leaves_with_path(updates, is_leaf=lambda x: isinstance(x, nnx.Variable)),
    jax.tree.leaves(params),
    strict=True,
  ):
    want = -lr * 0.25 * np.asarray(p) if paths[jax.tree_util.keystr(path)] else np.zeros_like(p)
    np.testing.assert_allclose(np.asarray(u[...]), want, rtol=1e-6, atol=1e-12, err_msg=jax.tree_util.keystr(path))
