"""load_hf: sharded checkpoints, and one-line errors that name the tensor."""

import json

import numpy as np
import pytest
from hf_utils import hf_logits, make_hf_model, save_hf
from safetensors.numpy import load_file, save_file

from behemoth_jax.convert import ConversionError, load_hf


@pytest.fixture(scope="module")
def hf_model():
  return make_hf_model(seed=11, num_hidden_layers=4, interleave_moe_layer_step=2)


def test_sharded_checkpoint_with_index(hf_model, tmp_path):
  hf_model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 3
  ids = np.random.default_rng(0).integers(0, 97, (2, 11))
  np.testing.assert_allclose(load_hf(tmp_path)(ids), hf_logits(hf_model, ids), atol=1e-4)


def test_bfloat16_checkpoint_loads(hf_model, tmp_path):
  hf_model.to(dtype=__import__("torch").bfloat16).save_pretrained(str(tmp_path), safe_serialization=True)
  hf_model.float()
  model = load_hf(tmp_path, dtype="bfloat16")
  assert str(model.embed.table_VD[...].dtype) == "bfloat16"


def _single_file_checkpoint(hf_model, path):
  save_hf(hf_model, path)
  files = list(path.glob("*.safetensors"))
  assert len(files) == 1
  return files[0], load_file(files[0])


@pytest.mark.parametrize(
  "mutation,message",
  [
    ("drop", "model.layers.1.feed_forward.router.weight: missing from checkpoint"),
    ("extra", "model.layers.9.extra.weight: unexpected tensor in checkpoint"),
    ("reshape", "model.layers.0.self_attn.q_proj.weight: shape (24, 24) does not match the config (expected (60, 24))"),
    ("dtype", "model.norm.weight: unsupported dtype int32"),
  ],
)
def test_checkpoint_errors_name_the_tensor(hf_model, tmp_path, mutation, message):
  file, tensors = _single_file_checkpoint(hf_model, tmp_path)
  if mutation == "drop":
    del tensors["model.layers.1.feed_forward.router.weight"]
  elif mutation == "extra":
    tensors["model.layers.9.extra.weight"] = np.zeros(3, np.float32)
  elif mutation == "reshape":
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((24, 24), np.float32)
  else:
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
  save_file(tensors, str(file), metadata={"format": "pt"})
  with pytest.raises(ConversionError) as e:
    load_hf(tmp_path)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_pickle_and_foreign_architectures_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
  with pytest.raises(ConversionError, match="not a Llama 4 model"):
    load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Llama4ForCausalLM"]}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
  with pytest.raises(ConversionError, match="pickled checkpoints are never loaded"):
    load_hf(tmp_path)
  with pytest.raises(ConversionError, match="config.json: not found"):
    load_hf(tmp_path / "missing")
