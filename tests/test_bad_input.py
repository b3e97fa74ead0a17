"""The bad-input table (docs/RELIABILITY.md): every case is one line naming the problem, a non-zero
exit (CLI) or a ValueError (Python API), and nothing written half-way.

Each case is a function of the fixtures returning (status, stderr, paths that must not exist). CLI
entry points run in this process (`main(argv)`), so a case costs no interpreter start.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

import train
from behemoth_jax.convert import cli as convert_cli
from behemoth_jax.infer import generate

ROOT = Path(__file__).parent.parent
PROGRESS = re.compile(r"\[\d\d:\d\d")  # a tqdm progress bar's elapsed-time field (conversion shows one)
CASES: dict[str, tuple[str, callable]] = {}  # id → (the whole message as a regex, case function)


def case(expect: str):
  """Registers a case whose one stderr line must be `error: ` + a full match of the regex `expect`
  (the test's temporary directory written as …)."""

  def register(fn):
    CASES[fn.__name__] = (expect, fn)
    return fn

  return register


class Env:
  """Lazily built inputs shared by the cases: a tiny HF checkpoint, one of ours, a multimodal model."""

  def __init__(self, root: Path):
    self.root = root
    self._cache = {}

  def once(self, key, build):
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  def hf_dir(self) -> Path:
    def build():
      from hf_utils import make_hf_model, save_hf

      path = self.root / "hf"
      save_hf(make_hf_model(), path)
      return path

    return self.once("hf", build)

  def hf_copy(self, name: str) -> Path:
    import shutil

    dst = self.root / name
    shutil.copytree(self.hf_dir(), dst)
    return dst

  def ckpt(self) -> Path:
    """Our checkpoint of a tiny model (configs/tiny.yaml with hidden 64) + its config.yaml."""

    def build():
      from flax import nnx

      from behemoth_jax.config import load_config, to_dict
      from behemoth_jax.model.transformer import create_model
      from behemoth_jax.train.checkpoint import save_params

      cfg = load_config("configs/tiny.yaml", ["model.hidden_size=64", "model.head_dim=16"])
      path = self.root / "ckpt"
      save_params(path, nnx.state(create_model(cfg.model, 0), nnx.Param))
      (path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
      return path

    return self.once("ckpt", build)

  def prompts(self) -> Path:
    path = self.root / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hello"}) + "\n")
    return path

  def mm_model(self):
    def build():
      from behemoth_jax.config import load_config
      from behemoth_jax.model.transformer import create_model

      return create_model(load_config("configs/tiny_mm.yaml").model, 0)

    return self.once("mm", build)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return Env(tmp_path_factory.mktemp("bad_input"))


def _cli(main, argv, capsys):
  try:
    status = main([str(a) for a in argv])
  except SystemExit as e:  # argparse
    status = e.code
  return status, capsys.readouterr().err


def _train(env, capsys, *overrides, config="configs/tiny.yaml"):
  out = env.root / f"run-{len(list(env.root.iterdir()))}"
  status, err = _cli(train.main, ["--config", config, *overrides, f"train.out_dir={out}"], capsys)
  return status, err, [out]


def _api(fn):
  try:
    fn()
  except ValueError as e:
    return 1, f"error: {e}\n", []
  return 0, "", []


# --- configs ---------------------------------------------------------------------------------------
@case(r"model\.hiden_size: unknown key \(valid: attention_block, .*, hidden_size, .*, vocab_size, weight_quant\)")
def config_unknown_key(env, capsys):
  return _train(env, capsys, "model.hiden_size=64")


@case(r"train\.steps: expected an integer, got 'many'")
def config_wrong_type(env, capsys):
  return _train(env, capsys, "train.steps=many")


@case(r"model\.num_heads: num_heads \(3\) must be divisible by num_kv_heads \(2\)")
def config_indivisible_heads(env, capsys):
  return _train(env, capsys, "model.num_heads=3")


@case(r"decoder/tail/0/ffn/w_down_EFD: dim 0 \(experts\) of size 3 is not divisible by mesh axes expert=2 \(= 2\)")
def config_experts_indivisible_by_expert_axis(env, capsys):
  return _train(env, capsys, "model.num_experts=3")


@case(r"parallel: mesh fsdp=16 x expert=2 needs 32 devices, but there are 8")
def config_mesh_larger_than_devices(env, capsys):
  return _train(env, capsys, "parallel.fsdp=16")


@case(r"…/nope\.yaml: config file not found")
def config_file_missing(env, capsys):
  return _train(env, capsys, config=env.root / "nope.yaml")


@case(r"…/bad\.yaml: not valid YAML \(ParserError\)")
def config_bad_yaml(env, capsys):
  (env.root / "bad.yaml").write_text("model: [unclosed\n")
  return _train(env, capsys, config=env.root / "bad.yaml")


@case(r"train\.steps: override must look like section\.key=value")
def config_override_without_value(env, capsys):
  return _train(env, capsys, "train.steps")


@case(r"train\.on_nonfinite: must be skip or halt: 'maybe'")
def config_bad_choice(env, capsys):
  return _train(env, capsys, "train.on_nonfinite=maybe")


@case(r"train\.adam_moments: must be auto or fp8: 'int4'")
def config_bad_moments(env, capsys):
  return _train(env, capsys, "train.adam_moments=int4")


@case(r"model\.vocab_size: 200 is smaller than the tokenizer's 259")
def config_vocab_smaller_than_tokenizer(env, capsys):
  return _train(env, capsys, "model.vocab_size=200")


@case(r"train\.batch_size: batch_size \(6\) must be divisible by grad_accum \(4\)")
def config_batch_indivisible_by_accumulation(env, capsys):
  return _train(env, capsys, "train.batch_size=6", "train.grad_accum=4")


# --- data ------------------------------------------------------------------------------------------
@case(r"…/missing\.jsonl: path not found")
def data_file_missing(env, capsys):
  return _train(env, capsys, f"data.source={env.root / 'missing.jsonl'}")


@case(r"…/empty\.jsonl: empty file")
def data_empty_file(env, capsys):
  (env.root / "empty.jsonl").write_bytes(b"")
  return _train(env, capsys, f"data.source={env.root / 'empty.jsonl'}")


@case(r"…/latin1\.txt: not valid UTF-8 \(byte 3: b'\\xe9 au'\)")
def data_not_utf8(env, capsys):
  (env.root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
  return _train(env, capsys, f"data.source={env.root / 'latin1.txt'}")


@case(r"…/field\.jsonl:1: missing field 'text' \(fields: body\)")
def data_missing_field(env, capsys):
  (env.root / "field.jsonl").write_text('{"body": "no text field"}\n' * 50)
  return _train(env, capsys, f"data.source={env.root / 'field.jsonl'}")


@case(r"…/short\.jsonl: no usable documents in split 'train' \(all 2 are shorter than 2 tokens\)")
def data_documents_shorter_than_two_tokens(env, capsys):
  (env.root / "short.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["", "", ""]) + "\n")
  return _train(env, capsys, f"data.source={env.root / 'short.jsonl'}")


@case(r"…/data\.csv: cannot tell the format from the extension; set data\.format \(text, jsonl, parquet, arrayrecord\)")
def data_unknown_format(env, capsys):
  (env.root / "data.csv").write_text("a,b\n")
  return _train(env, capsys, f"data.source={env.root / 'data.csv'}")


@case(r"…/tokenizer\.json: tokenizer file not found")
def data_tokenizer_missing(env, capsys):
  return _train(env, capsys, f"data.tokenizer={env.root / 'tokenizer.json'}")


@case(r"…/broken\.jsonl: line 2: invalid JSON \(Expecting value\)")
def data_prompts_invalid_json(env, capsys):
  path = env.root / "broken.jsonl"
  path.write_text('{"prompt": "fine"}\n{"prompt": \n')
  out = env.root / "gen-broken.jsonl"
  status, err = _cli(generate.main, ["--ckpt", env.ckpt(), "--prompts", path, "--out", out], capsys)
  return status, err, [out, out.with_name(out.name + ".tmp")]


def _bad_prompts(env, capsys, name: str, content: bytes):
  path = env.root / name
  path.write_bytes(content)
  out = env.root / f"gen-{name}"
  status, err = _cli(generate.main, ["--ckpt", env.ckpt(), "--prompts", path, "--out", out], capsys)
  return status, err, [out, out.with_name(out.name + ".tmp")]


@case(r"…/latin1\.jsonl: line 2: not UTF-8 \(byte 15\)")
def data_prompts_not_utf8(env, capsys):
  return _bad_prompts(env, capsys, "latin1.jsonl", b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')


@case(r"…/nofield\.jsonl: line 1: needs a string field 'prompt'")
def data_prompts_without_the_field(env, capsys):
  return _bad_prompts(env, capsys, "nofield.jsonl", b'{"text": "a prompt under another name"}\n')


@case(r"…/empty\.jsonl: no prompts")
def data_prompts_empty_file(env, capsys):
  return _bad_prompts(env, capsys, "empty.jsonl", b"\n\n")


@case(r"…/maxnew\.jsonl: line 1: max_new_tokens must be a positive integer, got '8'")
def data_prompts_bad_max_new_tokens(env, capsys):
  return _bad_prompts(env, capsys, "maxnew.jsonl", b'{"prompt": "hi", "max_new_tokens": "8"}\n')


# --- token ids -------------------------------------------------------------------------------------
def _tiny_model():
  from behemoth_jax.config import load_config
  from behemoth_jax.model.transformer import create_model

  return create_model(load_config("configs/tiny.yaml", ["model.num_layers=1"]).model, 0)


@case(r"input_ids: token id 512 at \[0, 2\] is outside \[0, 512\) \(model\.vocab_size; 1 of 4 ids are\)")
def tokens_id_at_least_vocab(env, capsys):
  model = env.once("tiny", _tiny_model)
  return _api(lambda: model(np.array([[1, 2, 512, 3]])))


@case(r"prompts\[1\]: token id -1 at \[1\] is outside \[0, 512\) \(model\.vocab_size; 1 of 2 ids are\)")
def tokens_negative_id(env, capsys):
  model = env.once("tiny", _tiny_model)
  gen = generate.Generator(model, stop_ids=(257,), pad_id=258)
  return _api(lambda: gen([np.array([5, 6]), np.array([7, -1])], max_new_tokens=2))


@case(r"prompts\[0\]: expected a non-empty 1-D list of token ids, got shape \(0,\)")
def tokens_empty_prompt(env, capsys):
  model = env.once("tiny", _tiny_model)
  gen = generate.Generator(model, stop_ids=(257,), pad_id=258)
  return _api(lambda: gen([np.array([], np.int32)], max_new_tokens=2))


# --- images ----------------------------------------------------------------------------------------
def _mm_ids(model, n_images: int) -> np.ndarray:
  vc = model.cfg.vision
  per_tile = (vc.image_size // vc.patch_size) ** 2 // int(1 / vc.pixel_shuffle_ratio**2)
  ids = [1] + [vc.image_token_id] * (per_tile * n_images) + [2]
  return np.array([ids], np.int32)


@case(
  r"pixel_values: tiles of shape \(3, 40, 40\), expected \(3, 32, 32\) \(channels, height, width\); see behemoth_jax\.data\.images\.preprocess_image"
)
def images_wrong_size(env, capsys):
  model = env.mm_model()
  return _api(lambda: model(_mm_ids(model, 1), pixel_values=np.zeros((1, 3, 40, 40), np.float32)))


@case(
  r"pixel_values: tiles of shape \(4, 32, 32\), expected \(3, 32, 32\) \(channels, height, width\); see behemoth_jax\.data\.images\.preprocess_image"
)
def images_wrong_channels(env, capsys):
  model = env.mm_model()
  return _api(lambda: model(_mm_ids(model, 1), pixel_values=np.zeros((1, 4, 32, 32), np.float32)))


@case(
  r"pixel_values: the images give 8 image features but input_ids hold 4 image tokens \(id 259\); each tile needs its placeholders"
)
def images_more_images_than_placeholders(env, capsys):
  model = env.mm_model()
  return _api(lambda: model(_mm_ids(model, 1), pixel_values=np.zeros((2, 3, 32, 32), np.float32)))


@case(
  r"pixel_values: the images give 4 image features but input_ids hold 8 image tokens \(id 259\); each tile needs its placeholders"
)
def images_fewer_images_than_placeholders(env, capsys):
  model = env.mm_model()
  return _api(lambda: model(_mm_ids(model, 2), pixel_values=np.zeros((1, 3, 32, 32), np.float32)))


@case(r"…/not-an-image\.png: not an image Pillow can read \(UnidentifiedImageError\)")
def images_unreadable_file(env, capsys):
  from behemoth_jax.data.images import preprocess_image

  (env.root / "not-an-image.png").write_text("plain text")
  vc = env.mm_model().cfg.vision
  return _api(lambda: preprocess_image(env.root / "not-an-image.png", vc))


# --- checkpoints -----------------------------------------------------------------------------------
@case(
  r"train\.init_from: …/ckpt/state: parameter decoder/tail/0/attn/wk_DKH has shape \(64, 2, 16\) in the checkpoint but the config needs \(128, 2, 32\) \(a checkpoint of another model\?\)"
)
def checkpoint_wrong_shapes(env, capsys):
  return _train(env, capsys, f"train.init_from={env.ckpt()}")


@case(r"train\.init_from: …/no-such-run not found")
def checkpoint_init_from_missing(env, capsys):
  return _train(env, capsys, f"train.init_from={env.root / 'no-such-run'}")


@case(r"model\.layers\.1\.feed_forward\.router\.weight: missing from checkpoint …/hf-missing")
def checkpoint_missing_tensor(env, capsys):
  from safetensors.numpy import save_file

  from behemoth_jax.convert.safetensors_io import SafetensorsFile

  hf = env.hf_copy("hf-missing")
  file = next(hf.glob("*.safetensors"))
  f = SafetensorsFile(file)
  tensors = {k: f.get(k) for k in f.keys() if k != "model.layers.1.feed_forward.router.weight"}
  f.close()
  save_file(tensors, str(file), metadata={"format": "pt"})
  out = env.root / "conv-missing"
  status, err = _cli(convert_cli.main, ["from-hf", hf, out], capsys)
  return status, err, [out, out.with_name(out.name + ".tmp-convert")]


@case(
  r"…/hf-pickle: no \.safetensors files \(found pytorch_model\.bin: pickled checkpoints are never loaded; re-save with safetensors\)"
)
def checkpoint_pickle_instead_of_safetensors(env, capsys):
  hf = env.hf_copy("hf-pickle")
  for f in hf.glob("*.safetensors"):
    f.unlink()
  (hf / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
  out = env.root / "conv-pickle"
  status, err = _cli(convert_cli.main, ["from-hf", hf, out], capsys)
  return status, err, [out, out.with_name(out.name + ".tmp-convert")]


@case(r"…/hf-llama3/config\.json: architecture 'LlamaForCausalLM' is not a Llama 4 model")
def checkpoint_other_architecture(env, capsys):
  hf = env.hf_copy("hf-llama3")
  (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
  out = env.root / "conv-llama3"
  status, err = _cli(convert_cli.main, ["from-hf", hf, out], capsys)
  return status, err, [out, out.with_name(out.name + ".tmp-convert")]


@case(
  r"model\.layers\.1\.self_attn\.o_proj\.weight: truncated or inconsistent in …/hf-truncated/model\.safetensors \(needs 5760 bytes at \[106368, 112128\), file has 107756\)"
)
def checkpoint_truncated_safetensors(env, capsys):
  hf = env.hf_copy("hf-truncated")
  file = next(hf.glob("*.safetensors"))
  file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
  out = env.root / "conv-truncated"
  status, err = _cli(convert_cli.main, ["from-hf", hf, out], capsys)
  return status, err, [out, out.with_name(out.name + ".tmp-convert")]


@case(r"--config: none given and no config\.yaml beside …/bare-ckpt")
def checkpoint_without_config(env, capsys):
  import shutil

  bare = env.root / "bare-ckpt"
  shutil.copytree(env.ckpt(), bare)
  (bare / "config.yaml").unlink()
  out = env.root / "gen-bare.jsonl"
  status, err = _cli(generate.main, ["--ckpt", bare, "--prompts", env.prompts(), "--out", out], capsys)
  return status, err, [out, out.with_name(out.name + ".tmp")]


# --- command lines ---------------------------------------------------------------------------------
@case(r"…/nothing-here/config\.json: not found \(expected a Hugging Face save_pretrained directory\)")
def cli_convert_missing_input(env, capsys):
  out = env.root / "conv-nothing"
  status, err = _cli(convert_cli.main, ["from-hf", env.root / "nothing-here", out], capsys)
  return status, err, [out, out.with_name(out.name + ".tmp-convert")]


@case(r"…/exists: already exists \(pass --overwrite to replace it\)")
def cli_convert_existing_output(env, capsys):
  out = env.root / "exists"
  out.mkdir(exist_ok=True)
  (out / "keep.txt").write_text("mine")
  status, err = _cli(convert_cli.main, ["from-hf", env.hf_dir(), out], capsys)
  assert (out / "keep.txt").read_text() == "mine"
  return status, err, [out.with_name(out.name + ".tmp-convert")]


@case(r"…/exists-hf: already exists \(pass --overwrite to replace it\)")
def cli_export_existing_output(env, capsys):
  out = env.root / "exists-hf"
  out.mkdir(exist_ok=True)
  (out / "keep.txt").write_text("mine")
  status, err = _cli(convert_cli.main, ["to-hf", env.ckpt(), out], capsys)
  assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
  return status, err, []


@case(r"CKPT: …/no-ckpt not found")
def cli_export_missing_checkpoint(env, capsys):
  out = env.root / "hf-out"
  status, err = _cli(convert_cli.main, ["to-hf", env.root / "no-ckpt", out, "--config", "configs/tiny.yaml"], capsys)
  return status, err, [out]


@case(r"…/prompts\.missing\.jsonl: prompts file not found")
def cli_generate_missing_prompts(env, capsys):
  out = env.root / "gen-none.jsonl"
  status, err = _cli(
    generate.main, ["--ckpt", env.ckpt(), "--prompts", env.root / "prompts.missing.jsonl", "--out", out], capsys
  )
  return status, err, [out, out.with_name(out.name + ".tmp")]


@case(r"…/gen-exists\.jsonl: already exists \(remove it or choose another --out\)")
def cli_generate_existing_output(env, capsys):
  out = env.root / "gen-exists.jsonl"
  out.write_text("mine\n")
  status, err = _cli(generate.main, ["--ckpt", env.ckpt(), "--prompts", env.prompts(), "--out", out], capsys)
  assert out.read_text() == "mine\n"
  return status, err, [out.with_name(out.name + ".tmp")]


@case(r"--ckpt: …/no-ckpt not found")
def cli_generate_missing_checkpoint(env, capsys):
  out = env.root / "gen-nockpt.jsonl"
  status, err = _cli(
    generate.main,
    ["--ckpt", env.root / "no-ckpt", "--prompts", env.prompts(), "--out", out, "--config", "configs/tiny.yaml"],
    capsys,
  )
  return status, err, [out, out.with_name(out.name + ".tmp")]


@case(r"argument --profile: expected START:END step numbers, got 'soon' \(see train\.py --help\)")
def cli_train_bad_option_value(env, capsys):
  return _train(env, capsys, "--profile", "soon")


@case(r"the following arguments are required: --prompts \(see python -m behemoth_jax\.generate --help\)")
def cli_generate_missing_option(env, capsys):
  status, err = _cli(generate.main, ["--ckpt", env.ckpt(), "--out", env.root / "x.jsonl"], capsys)
  return status, err, [env.root / "x.jsonl"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, env, capsys):
  expect, fn = CASES[name]
  status, err, must_not_exist = fn(env, capsys)
  lines = [x for x in err.strip().splitlines() if x.strip() and not PROGRESS.search(x)]
  assert status not in (0, None), f"{name}: exit status {status}; stderr {err[-1500:]}"
  assert len(lines) == 1, f"{name}: {len(lines)} lines on stderr:\n{err[-3000:]}"
  line = lines[0].replace(str(env.root), "…")
  assert line.startswith("error: ") and re.fullmatch(expect, line[len("error: ") :]), f"{name}: {line}"
  for path in must_not_exist:
    assert not Path(path).exists(), f"{name}: {path} was written"
  if os.environ.get("RELIABILITY_TABLE"):  # regenerating docs/RELIABILITY.md's table: record the answer
    with open(os.environ["RELIABILITY_TABLE"], "a") as f:
      f.write(json.dumps({"case": name, "status": status, "line": line}) + "\n")


def test_the_table_in_docs_lists_every_case():
  doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
  missing = [name for name in CASES if f"`{name}`" not in doc]
  assert not missing and len(CASES) >= 30, missing
