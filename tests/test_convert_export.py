"""Export to Hugging Face: bitwise round trips, transformers loading our directories, the CLI, state dicts."""

import json

import numpy as np
import pytest
import torch
from hf_utils import make_hf_mm_model, make_hf_model, our_logits
from hf_utils import save_hf as hf_save_pretrained

import train
from behemoth_jax.convert import from_torch_state_dict, load_hf, save_hf, to_torch_state_dict
from behemoth_jax.convert.cli import main as convert
from behemoth_jax.convert.hf_config import from_hf_config
from behemoth_jax.convert.safetensors_io import SafetensorsFile

MODELS = {
  "text_interleave1": lambda: make_hf_model(seed=30, num_hidden_layers=6),
  "text_interleave2": lambda: make_hf_model(seed=31, num_hidden_layers=6, interleave_moe_layer_step=2),
  "mm_interleave1": lambda: make_hf_mm_model(seed=32),
  "mm_interleave2": lambda: make_hf_mm_model(seed=33, interleave_moe_layer_step=2, num_hidden_layers=4),
}


def _tensors(path):
  out = {}
  for f in sorted(path.glob("*.safetensors")):
    sf = SafetensorsFile(f)
    out.update({k: np.array(sf.get(k)) for k in sf.keys()})
  return out


def _logits(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.float().numpy()


DEFAULT_FLAG_SOURCES = {  # HF model, its dtype; vocabularies far below Llama 4's 202,048
  "text-float32-no-pad-vocab-211": lambda: make_hf_model(seed=40, vocab_size=211, pad_token_id=None),
  "text-bfloat16-pad": lambda: make_hf_model(seed=41, interleave_moe_layer_step=2).to(torch.bfloat16),
  "mm-float32-pad": lambda: make_hf_mm_model(seed=42),
  "mm-bfloat16-no-pad": lambda: make_hf_mm_model(seed=43, pad_token_id=None).to(torch.bfloat16),
}


@pytest.mark.parametrize("name", list(DEFAULT_FLAG_SOURCES))
def test_from_hf_to_hf_with_default_flags_gives_back_the_source(tmp_path, name):
  """behemoth-convert from-hf then to-hf, no flags: the same tensor names, dtypes and bytes, the same
  config.json and generation_config.json (transformers_version aside), and transformers' logits."""
  hf = DEFAULT_FLAG_SOURCES[name]()
  hf_save_pretrained(hf, tmp_path / "in")
  assert convert(["from-hf", str(tmp_path / "in"), str(tmp_path / "ours")]) == 0
  assert convert(["to-hf", str(tmp_path / "ours"), str(tmp_path / "out")]) == 0
  a, b = _tensors(tmp_path / "in"), _tensors(tmp_path / "out")
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  for fname in ("config.json", "generation_config.json"):
    want, got = (json.loads((tmp_path / d / fname).read_text()) for d in ("in", "out"))
    want.pop("transformers_version", None), got.pop("transformers_version", None)
    assert got == want, fname
  source, back = (type(hf).from_pretrained(tmp_path / d).eval() for d in ("in", "out"))
  ids = np.random.default_rng(4).integers(0, 88, (2, 11))
  np.testing.assert_array_equal(_logits(back, ids), _logits(source, ids))


def test_export_without_a_source_config_never_writes_an_out_of_vocabulary_pad():
  from behemoth_jax.config import ModelConfig
  from behemoth_jax.convert.export import generation_config
  from behemoth_jax.convert.hf_config import export_config

  small = dict(
    vocab_size=300,
    hidden_size=16,
    num_layers=4,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    intermediate_size=8,
    intermediate_size_mlp=8,
    num_experts=2,
  )
  default_pad = ModelConfig(**small)  # pad_token_id 200018 (Llama 4's), outside a 300-token vocabulary
  assert export_config(default_pad, None, "float32")["pad_token_id"] is None
  assert generation_config(default_pad)["pad_token_id"] is None
  assert export_config(ModelConfig(**small, pad_token_id=299), None, "float32")["pad_token_id"] == 299


def test_export_writes_over_the_source_config_only_what_changed():
  from behemoth_jax.convert.hf_config import export_config

  source = make_hf_model(seed=44).config.to_dict()
  source["some_field_we_do_not_model"] = 7
  cfg = from_hf_config(source, param_dtype="float32", dtype="float32")
  import dataclasses

  changed = dataclasses.replace(cfg, rms_norm_eps=1e-6, eos_token_ids=(2, 5))
  got = export_config(changed, source, "bfloat16")
  want = {**source, "rms_norm_eps": 1e-6, "eos_token_id": [2, 5], "dtype": "bfloat16"}
  assert got == want


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bitwise_and_transformers_loads_it(tmp_path, name):
  hf = MODELS[name]()
  hf_save_pretrained(hf, tmp_path / "in")
  ours = load_hf(tmp_path / "in", dtype="float32")
  save_hf(ours, tmp_path / "out", max_shard_size="30KB")
  a, b = _tensors(tmp_path / "in"), _tensors(tmp_path / "out")
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(a)
  back = type(hf).from_pretrained(tmp_path / "out").eval()
  ids = np.random.default_rng(0).integers(0, 88, (2, 11))
  assert np.abs(_logits(back, ids) - our_logits(ours, ids)).max() <= 1e-4


def test_bfloat16_round_trip_keeps_bits(tmp_path):
  hf = make_hf_model(seed=34).to(torch.bfloat16)
  hf_save_pretrained(hf, tmp_path / "in")
  save_hf(load_hf(tmp_path / "in", dtype="bfloat16"), tmp_path / "out")
  a, b = _tensors(tmp_path / "in"), _tensors(tmp_path / "out")
  assert all(b[k].dtype.name == "bfloat16" and a[k].tobytes() == b[k].tobytes() for k in a)
  assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Llama4ForCausalLM"]


def test_torch_state_dicts_both_ways(tmp_path):
  hf = make_hf_mm_model(seed=35)
  cfg = from_hf_config(hf.config.to_dict(), param_dtype="float32", dtype="float32")
  ours = from_torch_state_dict(hf.state_dict(), cfg)
  ids = np.random.default_rng(1).integers(0, 88, (1, 9))
  assert np.abs(our_logits(ours, ids) - _logits(hf, ids)).max() <= 1e-4
  fresh = make_hf_mm_model(seed=36)
  fresh.load_state_dict(to_torch_state_dict(ours), strict=True)
  assert np.array_equal(_logits(fresh, ids), _logits(hf, ids))


def test_cli_trained_checkpoint_to_hf_and_back(tmp_path, capsys):
  """A train.py run (optimizer state and all) exports its parameters; transformers agrees with us;
  from-hf of that export, then to-hf again, is bitwise the same directory."""
  run = tmp_path / "run"
  assert (
    train.main(
      [
        "--config",
        "configs/tiny.yaml",
        "train.seq_len=64",
        "train.steps=3",
        "train.eval_batches=1",
        "train.warmup_steps=1",
        f"train.out_dir={run}",
      ]
    )
    == 0
  )
  assert convert(["to-hf", str(run), str(tmp_path / "hf"), "--max-shard-size", "2MB"]) == 0
  from transformers import Llama4ForCausalLM

  hf = Llama4ForCausalLM.from_pretrained(tmp_path / "hf").eval()
  ours = load_hf(tmp_path / "hf", dtype="float32")
  ids = np.random.default_rng(2).integers(0, 256, (2, 70))  # > one chunk of 64
  assert np.abs(_logits(hf, ids) - our_logits(ours, ids)).max() <= 1e-4
  assert convert(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ours"), "--dtype", "float32"]) == 0
  assert convert(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2"), "--max-shard-size", "2MB"]) == 0
  a, b = _tensors(tmp_path / "hf"), _tensors(tmp_path / "hf2")
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  # refusals: one line, exit 2, nothing written
  capsys.readouterr()
  assert convert(["to-hf", str(tmp_path / "ours"), str(tmp_path / "hf2")]) == 2
  assert "hf2: already exists (pass --overwrite" in capsys.readouterr().err
  (tmp_path / "hf" / "model.safetensors.index.json").unlink()
  first = sorted((tmp_path / "hf").glob("*.safetensors"))[0]
  first.unlink()
  assert convert(["from-hf", str(tmp_path / "hf"), str(tmp_path / "broken")]) == 2
  errors = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error:" in line]
  assert len(errors) == 1 and "model.embed_tokens.weight: missing from checkpoint" in errors[0]
  assert not (tmp_path / "broken").exists() and not list(tmp_path.glob("broken*"))


def test_from_hf_writes_layer_leaves_and_restores_restacked_on_a_mesh(tmp_path, monkeypatch):
  """10 layers: from-hf stores one leaf per layer; a scanned model (2 cycles of 4 + a tail of 2) on an
  fsdp=8 mesh restores exactly load_hf's parameters, each read no larger than one device's shard of one
  layer (no host ever assembles a whole stacked leaf)."""
  import jax
  from flax import nnx

  from behemoth_jax.config import ParallelConfig
  from behemoth_jax.train.checkpoint import ParamReader, restore_params
  from behemoth_jax.train.state import abstract_sharded_model
  from sharding.mesh import make_mesh

  hf_save_pretrained(make_hf_model(seed=37, num_hidden_layers=10), tmp_path / "hf")
  assert convert(["from-hf", str(tmp_path / "hf"), str(tmp_path / "ours"), "--dtype", "float32"]) == 0
  want = load_hf(tmp_path / "hf", dtype="float32")
  assert want.decoder.num_cycles == 2
  mesh = make_mesh(ParallelConfig(fsdp=8))
  _, abstract, _ = abstract_sharded_model(want.cfg, mesh)
  reads = []
  real = ParamReader.read_into
  monkeypatch.setattr(
    ParamReader, "read_into", lambda self, leaf, *a: reads.append((leaf, a[1].shape)) or real(self, leaf, *a)
  )
  got = dict(nnx.to_flat_state(restore_params(tmp_path / "ours", abstract)))
  flat_abstract = dict(nnx.to_flat_state(abstract))
  largest = {}
  for key, var in flat_abstract.items():
    shard = var.get_value().sharding.shard_shape(var.get_value().shape)
    largest[key] = int(np.prod(shard[1:] if key[:2] == ("decoder", "cycles") else shard))
  assert max(int(np.prod(shape)) for _, shape in reads) <= max(largest.values())
  w_gate = ("decoder", "cycles", "blocks", 0, "ffn", "w_gate_EDF")
  assert largest[w_gate] < int(np.prod(flat_abstract[w_gate].get_value().shape[1:]))  # sharded: the test can fail
  for key, var in nnx.to_flat_state(nnx.state(want, nnx.Param)):
    assert got[key].get_value().sharding == flat_abstract[key].get_value().sharding
    np.testing.assert_array_equal(np.asarray(jax.device_get(got[key].get_value())), np.asarray(var.get_value()))


def test_truncated_or_foreign_safetensors_are_named(tmp_path):
  from behemoth_jax.convert import ConversionError

  hf_save_pretrained(make_hf_model(seed=38, num_hidden_layers=2), tmp_path)
  f = tmp_path / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:-100])
  with pytest.raises(ConversionError, match=r": truncated or inconsistent in .*model.safetensors"):
    load_hf(tmp_path)
  f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  with pytest.raises(ConversionError, match="model.safetensors: not a safetensors file"):
    load_hf(tmp_path)


def test_load_hf_onto_a_mesh(tmp_path):
  import jax

  from behemoth_jax.config import ParallelConfig
  from sharding.api import use_mesh
  from sharding.mesh import make_mesh

  hf = make_hf_model(seed=39, num_hidden_layers=4)
  hf_save_pretrained(hf, tmp_path)
  mesh = make_mesh(ParallelConfig(fsdp=8))
  ours = load_hf(tmp_path, dtype="float32", mesh=mesh)
  assert ours.embed.table_VD[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  ids = np.random.default_rng(3).integers(0, 97, (8, 9))
  with use_mesh(mesh):
    got = np.asarray(jax.jit(lambda m, i: m(i))(ours, ids))
  assert np.abs(got - _logits(hf, ids)).max() <= 1e-4


def test_scanned_checkpoint_exports_layer_by_layer_bitwise_like_the_unscanned(tmp_path, monkeypatch):
  """to-hf of a checkpoint in train.py's layout (layers stacked for the scan) equals to-hf of the same
  parameters saved one leaf per layer, file for file; the stacked leaves are stored one layer per chunk,
  and the reader fills a strided (transposed, half) view of an HF tensor exactly as numpy would. The
  scanned export reads transposed leaves in pieces of a few rows (`PIECE_BYTES`, 64 MiB by default:
  one piece at this size), the unscanned in one."""
  import yaml
  from flax import nnx

  from behemoth_jax.config import Config, load_config, to_dict
  from behemoth_jax.convert import export
  from behemoth_jax.model.transformer import create_model, unstack_layers
  from behemoth_jax.train.checkpoint import CONFIG_NAME, ParamReader, save_params

  cfg = load_config("configs/tiny.yaml", ["model.num_layers=8", "model.param_dtype=bfloat16"]).model
  assert cfg.num_cycles == 2
  scanned = create_model(cfg, seed=3)
  for name, model in (("scanned", scanned), ("unscanned", unstack_layers(scanned))):
    monkeypatch.setattr(export, "PIECE_BYTES", 3000 if name == "scanned" else 64 << 20)  # rows of 1-2 KiB
    save_params(tmp_path / name, nnx.state(model, nnx.Param))
    (tmp_path / name / CONFIG_NAME).write_text(yaml.safe_dump(to_dict(Config(model=model.cfg)), sort_keys=False))
    assert convert(["to-hf", str(tmp_path / name), str(tmp_path / f"{name}-hf"), "--max-shard-size", "1MB"]) == 0
  files = sorted(p.name for p in (tmp_path / "scanned-hf").iterdir())
  assert files == sorted(p.name for p in (tmp_path / "unscanned-hf").iterdir()) and len(files) > 3
  for f in files:
    assert (tmp_path / "scanned-hf" / f).read_bytes() == (tmp_path / "unscanned-hf" / f).read_bytes(), f

  reader = ParamReader(tmp_path / "scanned" / "state")
  leaf = ("decoder", "cycles", "blocks", 0, "ffn", "w_gate_EDF")
  store = reader._store(leaf)
  assert store.chunk_layout.read_chunk.shape[0] == 1 and reader.shape(leaf)[0] == 2  # one layer per chunk
  want = np.asarray(dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))[leaf].get_value()[1])
  hf = np.zeros((want.shape[0], want.shape[1], 2 * want.shape[2]), np.float32)  # gate_up, another dtype
  reader.read_into(leaf, 1, hf[..., : want.shape[2]])
  assert np.array_equal(hf[..., : want.shape[2]], want.astype(np.float32)) and not hf[..., want.shape[2] :].any()
  wq = ("decoder", "cycles", "blocks", 1, "attn", "wq_DNH")
  q = np.asarray(dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))[wq].get_value()[0])
  out = np.empty((q.shape[1] * q.shape[2], q.shape[0]), q.dtype)  # HF [N·H, D]: a transposed view
  reader.read_into(wq, 0, out.T.reshape(q.shape))
  assert np.array_equal(out, q.reshape(q.shape[0], -1).T)
