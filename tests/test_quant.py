"""Quantized weights (model.weight_quant: fp8 e4m3 / int8 with per-output-channel scales): restored from a
float checkpoint onto their shards, equal to an independent numpy quantization, and the model computes
with exactly the dequantized weights; a distillation step from a quantized teacher."""

import dataclasses

import ml_dtypes
import numpy as np
import pytest
from batches import random_batch
from flax import nnx
from quantized import QUANTIZED

from behemoth_jax.config import ConfigError, DistillConfig, load_config
from behemoth_jax.model.layers import contracted_axes
from behemoth_jax.model.transformer import create_model
from behemoth_jax.train.checkpoint import save_params
from behemoth_jax.train.state import restore_model_params, teacher_model_config
from behemoth_jax.train.step import loss_and_stats
from sharding.mesh import make_mesh


def _numpy_quantize(w: np.ndarray, reduce: tuple[int, ...], quant: str) -> tuple[np.ndarray, np.ndarray]:
  """The same per-output-channel recipe, written independently in numpy (ml_dtypes for e4m3)."""
  w = w.astype(np.float32)
  qmax = {"fp8": 448.0, "int8": 127.0}[quant]
  amax = np.abs(w).max(axis=reduce, keepdims=True)
  scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
  x = np.clip(w / scale, -qmax, qmax)
  q = x.astype(ml_dtypes.float8_e4m3fn) if quant == "fp8" else np.round(x).astype(np.int8)
  return q, scale


def test_contracted_axes_are_the_input_channels():
  from sharding import axes as ax

  assert contracted_axes((ax.EMBED, ax.HEADS, ax.HEAD_DIM)) == (0,)  # q: D → N, H
  assert contracted_axes((ax.HEADS, ax.HEAD_DIM, ax.EMBED)) == (0, 1)  # o: N, H → D
  assert contracted_axes((ax.LAYERS, ax.EXPERTS, ax.EMBED, ax.MLP)) == (2,)  # gate/up of stacked experts
  assert contracted_axes((ax.LAYERS, ax.EXPERTS, ax.MLP, ax.EMBED)) == (2,)  # down
  assert contracted_axes((ax.MLP, ax.EMBED)) == (0,)


@pytest.mark.parametrize("quant", ["fp8", "int8"])
def test_quantized_model_restored_on_its_shards_computes_with_the_dequantized_weights(tmp_path, quant):
  # Two scanned cycles of (dense RoPE layer, MoE NoPE layer): stacked and unstacked weights of both kinds.
  layers = ["model.num_layers=4", "model.nope_layer_interval=2", "model.moe_layer_step=2"]
  cfg = load_config("configs/tiny.yaml", [*layers, "model.dtype=float32"])
  assert cfg.model.cycle_length == 2 and cfg.model.scan_layers
  float_model = create_model(cfg.model, seed=3)
  save_params(tmp_path / "ckpt", nnx.state(float_model, nnx.Param))
  mesh = make_mesh(cfg.parallel)  # fsdp 4 x expert 2 on the 8 fake devices
  qcfg = dataclasses.replace(cfg.model, weight_quant=quant)
  graphdef, params = restore_model_params(tmp_path / "ckpt", qcfg, mesh, what="test")

  flat_f = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(float_model, nnx.Param))}
  flat_q = dict(nnx.to_flat_state(params))
  dequantized = {}
  n_quantized = 0
  for key, var in flat_q.items():
    value = var.get_value()
    assert len(value.sharding.device_set) == 8  # placed on the mesh, not on one device
    if key[-1] == "scale":
      continue
    if key[-1] == "q":
      n_quantized += 1
      assert key[-2] in QUANTIZED, key
      want_q, want_s = _numpy_quantize(flat_f[key[:-1]], contracted_axes(var.get_metadata("out_sharding")), quant)
      got_s = np.asarray(flat_q[(*key[:-1], "scale")].get_value())
      assert value.dtype == want_q.dtype
      np.testing.assert_allclose(got_s, want_s, rtol=3e-7)  # XLA may divide by 448 as a product (1 ulp)
      # Rounded to the format: the same values but for rare ties, where XLA's w / scale (computed as a
      # product with the reciprocal) lands an ulp away from numpy's and rounds to the neighbour.
      got_q = np.asarray(value).astype(np.float32)
      diff = got_q != want_q.astype(np.float32)
      assert diff.mean() < 1e-4, diff.mean()
      step = np.abs(want_q.astype(np.float32)) * 2.0**-3 + 2.0**-9 if quant == "fp8" else 1.0  # one e4m3 ulp
      assert np.all(np.abs(got_q - want_q.astype(np.float32)) <= step)
      dequantized[key[:-1]] = got_q * got_s
    else:  # router, norms, embeddings, LM head: kept as they were
      assert key[-1] not in QUANTIZED, key
      np.testing.assert_array_equal(np.asarray(value), flat_f[key])
      dequantized[key] = flat_f[key]
  # Every projection and expert weight of the float model is quantized (4 attention + 3 expert + 3 shared
  # or dense per layer).
  assert n_quantized == sum(1 for k in flat_f if k[-1] in QUANTIZED) > 0
  assert {k[-2] for k in flat_q if k[-1] == "q"} == set(QUANTIZED)

  # The quantized model's logits are those of the float model holding the dequantized weights.
  ids = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 24))
  reference = create_model(cfg.model, seed=3)
  nnx.update(reference, nnx.from_flat_state(dequantized))
  forward = nnx.jit(lambda m, ids: m(ids))
  want = forward(reference, ids)
  got = forward(nnx.merge(graphdef, params), ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
  # And they stay near the float model's (per-channel fp8 / int8: a few percent of the logit spread).
  exact = forward(float_model, ids)
  err = np.sqrt(np.mean((np.asarray(got) - np.asarray(exact)) ** 2)) / np.asarray(exact).std()
  assert 0 < err < (0.2 if quant == "fp8" else 0.05), err


def test_distillation_step_from_a_quantized_teacher(tmp_path):
  """The step's soft loss against an fp8 teacher equals the one against the float teacher holding the
  dequantized weights, and differs from the unquantized teacher's."""
  cfg = load_config(
    "configs/tiny.yaml",
    ["model.num_layers=2", "model.dtype=float32", "distill.teacher_dtype=fp8", "distill.weight=fixed"],
  )
  teacher = create_model(cfg.model, seed=1)
  save_params(tmp_path / "t", nnx.state(teacher, nnx.Param))
  tcfg = teacher_model_config(cfg)
  assert (tcfg.weight_quant, tcfg.param_dtype) == ("fp8", "bfloat16")
  tcfg = dataclasses.replace(tcfg, param_dtype="float32")  # bf16 rounding apart, to compare exactly
  t_graphdef, t_params = restore_model_params(tmp_path / "t", tcfg, make_mesh(cfg.parallel), what="test")
  ref_teacher = _dequantized_reference(cfg.model, t_params)
  graphdef, student = nnx.split(create_model(cfg.model, seed=2))
  batch = random_batch(2, 16)
  dc = DistillConfig(weight="fixed", alpha=1.0)

  def soft(t_graphdef, t_params):
    return float(loss_and_stats(graphdef, student, batch, cfg.train, 32.0, (dc, t_graphdef), t_params, 0.0)[0])

  got = soft(t_graphdef, t_params)
  want = soft(*nnx.split(ref_teacher))
  exact = soft(*nnx.split(teacher))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(got - exact) > 1e-6 * abs(exact)


def test_teacher_dtype_is_checked():
  with pytest.raises(ConfigError, match=r"^distill\.teacher_dtype: must be one of .*got 'fp16'$"):
    load_config("configs/tiny.yaml", ["distill.teacher_dtype=fp16"])
  with pytest.raises(ConfigError, match=r"^model\.weight_quant: must be one of .*got 'fp4'$"):
    load_config("configs/tiny.yaml", ["model.weight_quant=fp4"])
  cfg = load_config("configs/tiny.yaml", ["distill.teacher_dtype=bf16"])
  assert teacher_model_config(cfg).param_dtype == "bfloat16" and teacher_model_config(cfg).weight_quant == "none"


def test_train_refuses_a_quantized_student_and_a_teacher_config_without_a_teacher(capsys, tmp_path):
  import train

  for override, message in [
    ("model.weight_quant=int8", "model.weight_quant: int8 weights are for a frozen teacher"),
    ("distill.teacher_config=configs/tiny.yaml", "distill.teacher_config: set without distill.teacher"),
    ("distill.teacher_dtype=fp8", "distill.teacher_dtype: set without distill.teacher"),
  ]:
    rc = train.main(["--config", "configs/tiny.yaml", override, f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # nothing written


def _dequantized_reference(cfg, params):
  """A float model of `cfg` holding exactly the values a quantized model computes with."""
  flat = dict(nnx.to_flat_state(params))
  values = {}
  for key, var in flat.items():
    if key[-1] == "q":
      values[key[:-1]] = np.asarray(var.get_value()).astype(np.float32) * np.asarray(
        flat[(*key[:-1], "scale")].get_value()
      )
    elif key[-1] != "scale":
      values[key] = np.asarray(var.get_value()).astype(np.float32)
  model = create_model(cfg, seed=0)
  nnx.update(model, nnx.from_flat_state(values))
  return model


def test_generate_and_score_with_quantized_weights(tmp_path):
  """`generate --weights int8` decodes, and `--weights fp8 --score` scores, exactly as a float model
  holding the dequantized weights (and bf16 for the rest) does."""
  import json

  import yaml

  from behemoth_jax.config import Config, to_dict
  from behemoth_jax.infer import generate

  cfg = load_config("configs/tiny.yaml", ["model.num_layers=2", "model.dtype=float32"])
  save_params(tmp_path / "ckpt", nnx.state(create_model(cfg.model, seed=7), nnx.Param))
  (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(Config(model=cfg.model)), sort_keys=False))
  (tmp_path / "p.jsonl").write_text(
    '{"prompt": "def f(", "text": "the quick brown fox"}\n{"prompt": "x", "text": "ab"}\n'
  )
  common = [
    "--config",
    str(tmp_path / "cfg.yaml"),
    "--ckpt",
    str(tmp_path / "ckpt"),
    "--prompts",
    str(tmp_path / "p.jsonl"),
  ]
  assert generate.main([*common, "--out", str(tmp_path / "g.jsonl"), "--max-new-tokens", "8", "--weights", "int8"]) == 0
  assert generate.main([*common, "--out", str(tmp_path / "s.jsonl"), "--score", "5", "--weights", "fp8"]) == 0
  mesh = make_mesh(cfg.parallel)
  for weights, out in (("int8", "g.jsonl"), ("fp8", "s.jsonl")):
    qcfg = dataclasses.replace(cfg.model, param_dtype="bfloat16", weight_quant=weights)
    _, params = restore_model_params(tmp_path / "ckpt", qcfg, mesh, what="test")
    reference = _dequantized_reference(cfg.model, params)
    rows = [json.loads(x) for x in (tmp_path / out).read_text().splitlines()]
    if weights == "int8":
      gen = generate.Generator(reference, stop_ids=(257,), pad_id=258)
      want = gen([[256, *r["prompt"].encode()] for r in rows], 8)
      assert [r["completion_ids"] for r in rows] == [w.tolist() for w in want]
    else:
      exact = create_model(cfg.model, seed=7)  # the float model: visibly different scores
      for r in rows:
        ids, lp = generate.topk_logprobs(reference, np.asarray(r["ids"])[None], 5)
        np.testing.assert_array_equal(r["topk_ids"], ids[0])
        np.testing.assert_allclose(r["topk_logprobs"], lp[0], atol=1e-5)
        _, lp_float = generate.topk_logprobs(exact, np.asarray(r["ids"])[None], 5)
        assert np.abs(np.asarray(r["topk_logprobs"]) - lp_float[0]).max() > 1e-3


def test_weights_flag_needs_a_checkpoint(capsys, tmp_path):
  from behemoth_jax.infer import generate

  (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
  argv = ["--hf", str(tmp_path), "--prompts", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl")]
  assert generate.main([*argv, "--weights", "fp8"]) == 2
  assert capsys.readouterr().err.strip() == (
    "error: --weights fp8: converted weights load from --ckpt (behemoth-convert from-hf the HF directory first)"
  )
