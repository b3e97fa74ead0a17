"""Ahead-of-time compilation for TPU topologies (libtpu, no TPU) and the memory calculator against it.

The compiles are skipped without libtpu (`pip install -e ".[test,tpu]"`, which the README's test
command and CI do); topology-name parsing and the calculator's arithmetic run everywhere.
"""

import importlib.util
import math
import re

import pytest
from quantized import element_counts

import train
from behemoth_jax.config import ConfigError, load_config
from behemoth_jax.scale import aot

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler",
)
TOPOLOGIES = [
  ("v5p-8", 4, (2, 2, 1), "TPU v5"),
  ("v5p-128", 64, (4, 4, 4), "TPU v5"),
  ("v5p-1024", 512, (8, 8, 8), "TPU v5"),
  ("v4-16", 8, (2, 2, 2), "TPU v4"),
  ("v5e-16", 16, (4, 4), "TPU v5 lite"),
  ("v6e-8", 8, (2, 4), "TPU v6 lite"),
]


@pytest.mark.parametrize("name,chips,shape,kind", TOPOLOGIES)
def test_topology_names_give_the_slices_shape(name, chips, shape, kind):
  topo = aot.parse_topology(name)
  assert (topo.chips, topo.shape) == (chips, shape)


@needs_libtpu
@pytest.mark.parametrize("name,chips,shape,kind", TOPOLOGIES)
def test_topology_names_give_the_slices_devices(name, chips, shape, kind):
  devices = aot.parse_topology(name).devices
  assert len(devices) == chips and {d.device_kind for d in devices} == {kind}
  two = aot.parse_topology(name, num_slices=2).devices
  assert len(two) == 2 * chips and {d.slice_index for d in two} == {0, 1}


def test_bad_topology_names_are_one_line():
  for bad, msg in [
    ("v5p-7", r"v5p-7: v5p-N counts TensorCores \(2 per chip\); N must be even"),
    (
      "v7x-8",
      r"'v7x-8' is not a TPU slice like v5p-1024, v4-128, v5e-256, v6e-64 or a GPU cluster NODESxGPUS like h100-8x8, h200-32x8",
    ),
    ("h200-2x16", r"h200-2x16: NODESxGPUS needs at least 1 node of 1 to 8 GPUs"),
    ("v5p-24", r"v5p-24: 12 chips; slices here are powers of two of at least 4 chips"),
  ]:
    with pytest.raises(ConfigError) as e:
      aot.parse_topology(bad)
    assert re.fullmatch("--compile-topology: " + msg, str(e.value)), str(e.value)


def _compile(capsys, config, *argv):
  rc = train.main(["--config", config, *argv])
  return rc, capsys.readouterr().out


def _gib(out: str, label: str) -> float:
  line = next(x for x in out.splitlines() if label in x)
  return float(line.split(label)[1].split("GiB")[0].strip().split()[-1].replace(",", ""))


@needs_libtpu
def test_scout_train_step_compiles_for_a_v5p_slice(capsys):
  """Scout's dimensions on 16 chips, fsdp x expert: one of its MoE layers (the expert exchange over 16
  chips with ragged_dot, chunked attention, the full vocabulary). Each Scout-sized MoE layer costs
  libtpu ~20-40 s of compilation on 2 cores, so the suite compiles one; the global (NoPE) layer kind
  is compiled by the calculator test below, and whole models by docs/SCALE.md's commands."""
  rc, out = _compile(
    capsys,
    "configs/scout.yaml",
    "--compile-topology",
    "v5p-32",
    "parallel.fsdp=1",
    "parallel.expert=16",
    "model.num_layers=1",
    "train.seq_len=2048",
    "train.batch_size=16",
  )
  assert rc == 0, out
  assert (
    "16 chips (2x2x4 TPU v5)" in out
    and "'expert': 16" in out
    and "moe ragged, ragged exchange" in out
    and "fits" in out
  )
  # The compiled matmuls against what the step must run (aot.program_flops: 3 x forward + the chunked
  # loss's logits + FlashAttention's scores + full remat's second forward): 0.997 on libtpu 0.0.42.1. A
  # windowed einsum's loop counted at twice its trips (flops._counter_step) read 1.454.
  must = float(out.split(" x what this step must run")[0].rsplit(", ", 1)[1])
  assert 0.95 <= must <= 1.05, out


@needs_libtpu
def test_a_step_that_does_not_fit_exits_1_with_the_reason(capsys):
  rc, out = _compile(
    capsys,
    "configs/tiny.yaml",
    "--compile-topology",
    "v5e-1",
    "parallel.fsdp=1",
    "parallel.expert=1",
    "model.vocab_size=262144",
    "model.hidden_size=8192",
    "model.head_dim=256",
    "model.num_heads=32",
    "model.num_kv_heads=8",
  )
  assert (
    rc == 1
    and "DOES NOT FIT on TPU v5 lite" in out
    and "the chip has 15.75 GiB" in out
    and "needs 85.33 GiB per chip" in out
  ), out


@needs_libtpu
def test_online_distillation_step_compiles_with_an_fp8_teacher(capsys, tmp_path):
  """The real distillation step (frozen teacher forward + student train step, each placed by the rules
  from its own logical axes on the same 4 chips) compiles for TPU with the teacher held in fp8: its
  per-chip bytes are those of e4m3 projections and experts + f32 per-channel scales + bf16 for the rest
  (counted here from the float model's shapes), and XLA's argument bytes hold teacher and student."""
  import yaml

  teacher = {
    "model": {
      **yaml.safe_load(open("configs/tiny.yaml"))["model"],
      **dict(vocab_size=4096, hidden_size=1024, num_heads=8, head_dim=128, intermediate_size=4096),
      **dict(num_experts=16, param_dtype="float32"),
    }
  }
  (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher))
  rc, out = _compile(
    capsys,
    "configs/tiny.yaml",
    "--compile-topology",
    "v5p-8",
    f"distill.teacher_config={tmp_path / 'teacher.yaml'}",
    "distill.teacher_dtype=fp8",
    "model.vocab_size=4096",
    "parallel.fsdp=2",
    "parallel.expert=2",
    "train.seq_len=512",
  )
  assert rc == 0 and "fits" in out, out
  quantized, scales, other = element_counts(load_config(tmp_path / "teacher.yaml").model)
  want = quantized + 4 * scales + 2 * other  # 1-byte values, float32 scales, bf16 for the rest
  got = _gib(out, "held as fp8:")
  assert got == pytest.approx(want / 4 / 2**30, abs=0.006), (got, want / 4 / 2**30)
  assert "(frozen: forward only, no optimizer state)" in out and "+ teacher forward" in out
  student = _gib(out, "train state (params + optimizer) per chip")
  assert _gib(out, "per chip: arguments") == pytest.approx(got + student, rel=0.03)


@needs_libtpu
def test_scoring_pass_compiles_without_vocabulary_sized_logits(capsys):
  """`generate --score`'s program (hidden states → top-K log-probs over vocabulary chunks) compiled
  for TPU: its temporaries stay under half of the [T, V] float32 logits it never forms (1 GiB here)."""
  from behemoth_jax.scale import memory

  rc = memory.main(
    [
      "--config",
      "configs/tiny.yaml",
      "--prefill",
      "4096",
      "--score",
      "32",
      "--compile-topology",
      "v5p-8",
      "parallel.fsdp=4",
      "parallel.expert=1",
      "model.vocab_size=65536",
    ]
  )
  out = capsys.readouterr().out
  assert rc == 0 and "4,096-token top-32 scoring pass" in out and "fits" in out, out
  assert _gib(out, "temporaries") < 0.5 * 4096 * 65536 * 4 / 2**30, out


@needs_libtpu
def test_prefill_reports_its_caches_in_their_own_dtype(capsys):
  """The prefill program's KV caches are reported as they are built (compute dtype float32 here: 4 bytes
  a value, where a 2-byte assumption would report half)."""
  import jax

  from behemoth_jax.config import load_config
  from behemoth_jax.model.transformer import abstract_model
  from behemoth_jax.scale import memory

  overrides = ["model.dtype=float32", "model.head_dim=256", "parallel.fsdp=4", "parallel.expert=1"]
  rc = memory.main(["--config", "configs/tiny.yaml", "--prefill", "65536", "--compile-topology", "v5p-8", *overrides])
  out = capsys.readouterr().out
  cfg = load_config("configs/tiny.yaml", overrides[:2])
  caches = jax.eval_shape(lambda: abstract_model(cfg.model).init_cache(1, 65536))
  kv = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches) if x.ndim >= 4)
  assert rc == 0 and kv > 2**28, out  # ~0.25 GiB: half of it would show
  assert _gib(out, "; KV caches") == pytest.approx(kv / 2**30, abs=0.01), out  # the weights line, not outputs


@needs_libtpu
def test_decode_step_compiles_with_fp8_weights_and_sharded_caches(capsys):
  """Generation's decode step (a batch of slots, one token each, against KV caches of --context tokens)
  compiled for TPU with fp8 weights: the caches' bytes equal those of the model's own init_cache
  (slots over the batch axes), the donated caches are updated in place, and a context too long for
  one chip is refused with exit 1."""
  import jax

  from behemoth_jax.config import load_config
  from behemoth_jax.model.transformer import abstract_model
  from behemoth_jax.scale import memory

  args = ["--config", "configs/tiny.yaml", "--decode", "8", "--context", "16384", "model.weight_quant=fp8"]
  rc = memory.main([*args, "--compile-topology", "v5p-8", "parallel.fsdp=2", "parallel.expert=2"])
  out = capsys.readouterr().out
  assert rc == 0 and "decode step of 8 slots x 16,384-token caches" in out and "(weights fp8)" in out, out
  cfg = load_config("configs/tiny.yaml", [])
  caches = jax.eval_shape(lambda: abstract_model(cfg.model).init_cache(8, 16384))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches))
  assert _gib(out, "KV caches") == pytest.approx(total / 2**30, abs=0.01)
  assert _gib(out, "GiB in all,") == pytest.approx(total / 4 / 2**30, abs=0.01)  # 8 slots over 4 chips
  assert _gib(out, "GiB (") == pytest.approx(total / 4 / 2**30, abs=0.01)  # the caches are updated in place
  rc = memory.main(
    [*args[:4], "--context", "8388608", "--compile-topology", "v5e-1", "parallel.fsdp=1", "parallel.expert=1"]
  )
  out = capsys.readouterr().out
  assert rc == 1 and "DOES NOT FIT" in out, out


MID = [
  "model.vocab_size=32768",
  "model.hidden_size=1024",
  "model.num_heads=8",
  "model.head_dim=128",
  "model.num_layers=4",
  "model.intermediate_size=2048",
  "model.intermediate_size_mlp=4096",
  "model.param_dtype=bfloat16",
  "model.dtype=bfloat16",
  "model.remat_policy=full",
  "model.attention_chunk_size=1024",
  "train.seq_len=2048",
  "parallel.fsdp=8",
  "parallel.expert=1",
  "model.moe_layers=[]",
  "train.batch_size=8",
]


@needs_libtpu
def test_calculator_against_compiled_memory(capsys):
  """A dense 4-layer model on v5p-16: the compiled arguments are exactly the train state the
  calculator counts, and its total is within 10% of XLA's (9.3% over it at these 2,048-token rows,
  measured 2026-12-03 with libtpu 0.0.42.1; 5.7% under at 4,096 tokens, whose compile took
  80 s instead of 50 s). Scout, Maverick and Behemoth at 8K tokens: docs/SCALE.md, within 3%; those
  compiles take minutes each, so they are not in the suite."""
  from behemoth_jax.scale.memory import train_estimate

  rc, out = _compile(capsys, "configs/tiny.yaml", "--compile-topology", "v5p-16", *MID)
  assert rc == 0, out
  est = train_estimate(load_config("configs/tiny.yaml", MID), 8)
  assert abs(_gib(out, "arguments") * 2**30 - (est.params + est.optimizer)) < 0.01 * 2**30
  compiled = _gib(out, "  peak ") * 2**30  # the report line, not the FLOPs line's "bf16 peak"
  assert abs(est.total / compiled - 1) <= 0.10, (est.total / 2**30, compiled / 2**30)


# Distillation from Behemoth compiled for v5p with libtpu 0.0.42.1 (docs/SCALE.md has the commands; 3-5
# minutes each, so not in the suite): (student, chips, expert, context, teacher dtype, XLA's peak GiB);
# fsdp 1, batch = expert sequences of 8,192 tokens.
DISTILL_COMPILED = [
  ("scout", 128, 16, 8, "bf16", 41.54),
  ("scout", 64, 16, 4, "bf16", 80.82),
  ("scout", 32, 16, 2, "bf16", 159.86),
  ("scout", 64, 16, 4, "fp8", 52.17),
  ("scout", 32, 8, 4, "fp8", 89.48),
  ("scout", 32, 16, 2, "fp8", 103.71),
  ("scout", 16, 8, 2, "fp8", 177.00),
  ("scout", 16, 16, 1, "fp8", 204.78),
  ("maverick", 128, 16, 8, "bf16", 59.00),
  ("maverick", 64, 16, 4, "bf16", 111.72),
  ("maverick", 64, 16, 4, "fp8", 84.36),
  ("maverick", 32, 16, 2, "fp8", 164.30),
]


def test_calculator_counts_an_online_teacher():
  """The teacher's weights per chip are Behemoth's parameters at 2 bytes (bf16) or 1 byte for the
  quantized projections and experts + float32 scales (fp8), spread over every chip by the rules; the
  calculator adds them and the teacher's hidden states to the student's terms and stays within 10% of
  the compiled peaks (none of which was used to fit it)."""

  from behemoth_jax.scale.memory import train_estimate
  from behemoth_jax.scale.params import count_params

  behemoth = load_config("configs/behemoth.yaml").model
  n_teacher = count_params(behemoth)["total"]
  quantized, scales, _ = element_counts(behemoth)
  for student_cfg, chips, expert, context, dtype, compiled in DISTILL_COMPILED:
    mesh = ["parallel.fsdp=1", f"parallel.expert={expert}", f"parallel.context={context}"]
    batch = [f"train.batch_size={expert}", "train.seq_len=8192", "distill.teacher_config=configs/behemoth.yaml"]
    mesh.append("model.moe_exchange=padded")  # compiled before the ragged exchange
    cfg = load_config(f"configs/{student_cfg}.yaml", [*mesh, *batch, f"distill.teacher_dtype={dtype}"])
    est = train_estimate(cfg, chips)
    if dtype == "bf16":
      assert est.teacher_params == 2 * n_teacher / chips
    else:  # scales of heads-shaped weights are replicated (heads are split only by `tensor`): < 1 GiB
      low = (quantized + 2 * (n_teacher - quantized)) / chips
      assert low < est.teacher_params < low + 4 * scales
    student = train_estimate(
      load_config(f"configs/{student_cfg}.yaml", [*mesh, f"train.batch_size={expert}", "train.seq_len=8192"]), chips
    )
    assert est.teacher_hidden == 1 * (8192 / context) * 16384 * 2  # one sequence per chip, its slice of tokens
    assert est.total == pytest.approx(student.total + est.teacher_params + est.teacher_hidden, rel=1e-9)
    assert abs(est.total / 2**30 / compiled - 1) < 0.10, (chips, dtype, est.total / 2**30, compiled)


# Compiled 2026-12-04 for v5p-16 (8 chips) with libtpu 0.0.42.1 by `python -m behemoth_jax.plan` (docs/SCALE.md,
# 1-4 minutes each, not in the suite), none used to fit the calculator: Scout at 8,192 tokens with 8-bit Adam
# moments, (mesh, batch, grad_accum, XLA's peak GiB or what its out-of-memory error said it needs).
FP8_MOMENTS_COMPILED = [
  (dict(fsdp=2, expert=2, tensor=2), 8, 1, 93.5),
  (dict(fsdp=1, expert=4, tensor=2), 8, 1, 98.92),
  (dict(fsdp=2, expert=2, tensor=2), 16, 4, 108.48),
  (dict(fsdp=1, expert=4, context=2), 16, 4, 108.08),
]
# Maverick, batch 16 x 8192, fp8 moments, v5p-64 (32 chips): (mesh, XLA's peak GiB).
# All compiled with the padded expert exchange, the only one then (the calculator follows the config's).
PADDED = "model.moe_exchange=padded"
FP8_MOMENTS_MAVERICK = [(dict(fsdp=2, expert=8, tensor=2), 84.2), (dict(fsdp=1, expert=16, tensor=2), 88.5)]


def test_calculator_follows_fp8_moments_and_accumulation():
  """The optimizer state is the parameters' float8 moments plus row scales (exact, from the abstract
  state: ~1/2 of bf16 moments); with accumulation two whole gradients are live (the running sum and a
  micro-batch's); within 10% of the compiled points (Scout 0.0-6.7%, Maverick 0.6% and 3.1%)."""
  from behemoth_jax.scale.memory import train_estimate

  for mesh, batch, accum, compiled in FP8_MOMENTS_COMPILED:
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1, **mesh}
    over = [f"parallel.{k}={v}" for k, v in sizes.items()]
    run = [f"train.batch_size={batch}", "train.seq_len=8192", f"train.grad_accum={accum}", PADDED]
    cfg = aot.for_tpu(load_config("configs/scout.yaml", [*over, *run, "train.adam_moments=fp8"]))
    est = train_estimate(cfg, 8)
    bf16 = train_estimate(aot.for_tpu(load_config("configs/scout.yaml", [*over, *run])), 8)
    assert 0.5 <= est.optimizer / bf16.optimizer < 0.51, (est.optimizer, bf16.optimizer)
    assert est.gradients == est.params * (2 if accum > 1 else 1)
    assert abs(est.total / 2**30 / compiled - 1) < 0.10, (mesh, batch, accum, est.total / 2**30, compiled)
  for mesh, compiled in FP8_MOMENTS_MAVERICK:
    over = [f"parallel.{k}={v}" for k, v in {"data": 1, "context": 1, **mesh}.items()]
    run = ["train.batch_size=16", "train.seq_len=8192", "train.adam_moments=fp8", PADDED]
    est = train_estimate(aot.for_tpu(load_config("configs/maverick.yaml", [*over, *run])), 32)
    assert abs(est.total / 2**30 / compiled - 1) < 0.10, (mesh, est.total / 2**30, compiled)


# Behemoth, 128 v5p chips, batch 16 x 8192, fp8 moments, layer-by-layer update with exact clipping (its
# norm pass; ragged exchange), compiled with libtpu 0.0.42.1 on 2026-12-05: (mesh, XLA's peak GiB per chip).
LAYERWISE_BEHEMOTH = [(dict(fsdp=1, expert=16, context=2, tensor=4), 89.84)]


def test_calculator_follows_the_layerwise_update():
  """The gradient live at once is one layer cycle's (exact: the stacked cycles' bytes / cycles) plus
  the parameters' outside the cycles, ~1/35 of the whole gradient for Behemoth; the total within 10% of
  the compiled point (-3.8%: the norm pass's live ranges are not modelled)."""
  from behemoth_jax.scale.memory import train_estimate

  for mesh, compiled in LAYERWISE_BEHEMOTH:
    over = [f"parallel.{k}={v}" for k, v in {"data": 1, **mesh}.items()]
    run = ["train.batch_size=16", "train.seq_len=8192", "train.adam_moments=fp8"]
    whole = train_estimate(aot.for_tpu(load_config("configs/behemoth.yaml", [*over, *run])), 128)
    cfg = aot.for_tpu(load_config("configs/behemoth.yaml", [*over, *run, "train.layerwise_update=true"]))
    est = train_estimate(cfg, 128)
    assert whole.gradients == whole.params and est.params == whole.params
    assert 0.02 < est.gradients / whole.gradients < 0.05, est.gradients / whole.gradients
    assert abs(est.total / 2**30 / compiled - 1) < 0.10, (mesh, est.total / 2**30, compiled)


def test_calculator_cli_takes_overrides_on_either_side_of_the_options(capsys):
  from behemoth_jax.scale import memory

  mesh = ["parallel.fsdp=1", "parallel.expert=16", "parallel.context=2", "train.batch_size=16"]
  assert memory.main(["train.seq_len=2048", "--config", "configs/scout.yaml", "--chips", "32", *mesh]) == 0
  out = capsys.readouterr().out
  est = memory.train_estimate(load_config("configs/scout.yaml", ["train.seq_len=2048", *mesh]), 32)
  total = float(re.search(r"^  total\s+([\d.,]+) GiB$", out, re.M).group(1).replace(",", ""))
  assert total == round(est.total / 2**30, 2) and "teacher" not in out, out


def test_serving_weights_count_quantization_scales():
  """fp8 / int8 weights as model.weight_quant stores them: 1 byte per projection/expert element, 4 per
  scale, 2 for the rest; Behemoth's fp8 scoring pass compiled on 32 v5p chips held 58.07 GiB per chip
  (docs/SCALE.md), within 1% (the rules replicate the scales of heads-shaped weights)."""

  from behemoth_jax.scale.memory import weight_bytes
  from behemoth_jax.scale.params import count_params

  mc = load_config("configs/scout.yaml").model
  quantized, scales, other = element_counts(mc)
  want = quantized + 4 * scales + 2 * other
  assert weight_bytes(mc, "fp8") == weight_bytes(mc, "int8") == want
  assert weight_bytes(mc, "bfloat16") == 2 * count_params(mc)["total"]
  behemoth = weight_bytes(load_config("configs/behemoth.yaml").model, "fp8")
  assert abs(behemoth / (32 * 58.07 * 2**30) - 1) < 0.01


def test_memory_serving_table_counts_weights_and_the_chunked_kv_ring():
  from behemoth_jax.model.cost import kv_cache_bytes

  cfg = load_config("configs/scout.yaml")
  per_token_layer = 2 * 8 * 128 * 2
  # 48 layers, every 4th global: 36 chunked layers keep one 8192-token chunk, 12 keep everything.
  assert kv_cache_bytes(cfg, 1 << 20) == (36 * 8192 + 12 * (1 << 20)) * per_token_layer
  assert kv_cache_bytes(cfg, 4096) == 48 * 4096 * per_token_layer
  assert math.isclose(kv_cache_bytes(cfg, 8192, batch=3), 3 * kv_cache_bytes(cfg, 8192))
