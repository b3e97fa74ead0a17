"""Config loading, validation errors that name the field, overrides, HF config mapping."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from behemoth_jax.config import ConfigError, ModelConfig, load_config, to_dict
from behemoth_jax.convert.hf_config import from_hf_config, to_hf_config

CONFIGS = Path(__file__).parent.parent / "configs"


SHIPPED = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def test_every_shipped_config_is_tested():
  assert SHIPPED == ["behemoth", "maverick", "scout", "tiny", "tiny_mm"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_round_trip(name, tmp_path):
  cfg = load_config(CONFIGS / f"{name}.yaml")
  (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
  assert load_config(tmp_path / "c.yaml") == cfg
  assert cfg.model.cycle_length == 4


@pytest.mark.parametrize(
  "override,message",
  [
    ("model.hiden_size=3", "model.hiden_size: unknown key"),
    ("model.hidden_size=abc", "model.hidden_size: expected an integer"),
    ("model.hidden_size=true", "model.hidden_size: expected an integer"),
    ("model.num_heads=6", "model.num_heads: num_heads (6) must be divisible by num_kv_heads (4)"),
    ("model.attention_chunk_size=0", "model.attention_chunk_size: must be > 0"),
    ("model.num_experts_per_tok=9", "model.num_experts_per_tok: top-k (9) must be <= num_experts (8)"),
    ("model.moe_layers=[0,7]", "model.moe_layers: indices [7] out of range [0, 4)"),
    ("model.dtype=float8", "model.dtype: must be one of"),
    ("model.moe_exchange=ring", "model.moe_exchange: must be one of ('auto', 'padded', 'ragged'), got 'ring'"),
    ("model.moe_capacity=0", "model.moe_capacity: must be > 0, got 0"),
    ("model.rope_scaling.factor=-1", "rope_scaling.factor: must be > 0"),
    ("parallel.fsdp=0", "parallel.fsdp: must be >= 1 or -1"),
    ("train.steps=0", "train.steps: must be > 0"),
    ("nosection.x=1", "nosection: unknown key"),
    ("model.hidden_size", "override must look like section.key=value"),
  ],
)
def test_errors_name_field_and_rule(override, message):
  overrides = ["model.num_kv_heads=4", override] if "num_heads" in override else [override]
  with pytest.raises(ConfigError) as e:
    load_config(CONFIGS / "tiny.yaml", overrides)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_overrides_and_lists():
  cfg = load_config(CONFIGS / "tiny.yaml", ["model.moe_layers=[2,0]", "model.nope_layers=[]", "train.seed=3"])
  assert cfg.model.moe_layers == (0, 2) and cfg.train.seed == 3
  assert [k.moe for k in cfg.model.layer_kinds] == [True, False, True, False]
  assert all(k.rope for k in cfg.model.layer_kinds)


def test_layer_pattern_rules():
  cfg = ModelConfig(num_layers=8, moe_layer_step=2)
  assert [cfg.uses_rope(i) for i in range(8)] == [1, 1, 1, 0, 1, 1, 1, 0]  # NoPE iff (i+1) % 4 == 0
  assert [cfg.is_moe_layer(i) for i in range(8)] == [0, 1, 0, 1, 0, 1, 0, 1]
  assert cfg.cycle_length == 4
  assert ModelConfig(num_layers=5, moe_layers=(0, 2, 3), nope_layers=(1, 4)).cycle_length == 3
  assert ModelConfig(num_layers=5, moe_layers=(0, 2), nope_layers=(1, 4)).cycle_length == 5
  assert ModelConfig(num_layers=6, nope_layer_interval=0).cycle_length == 1


def test_missing_file_and_bad_yaml(tmp_path):
  with pytest.raises(ConfigError, match="config file not found"):
    load_config(tmp_path / "nope.yaml")
  (tmp_path / "bad.yaml").write_text("model: [1, 2")
  with pytest.raises(ConfigError, match="not valid YAML"):
    load_config(tmp_path / "bad.yaml")


# Our fields that HF's config.json does not carry: execution choices, and the vision prompt layout.
NOT_IN_HF = (
  "param_dtype",
  "dtype",
  "fp8",
  "scan_layers",
  "scan_unroll",
  "remat_policy",
  "attention_block",
  "moe_impl",
  "moe_block_size",
)
LAYOUT_IDS = ("image_marker_id", "tile_x_separator_id", "tile_y_separator_id", "max_tiles")


@pytest.mark.parametrize("name", SHIPPED)
def test_hf_config_round_trip_through_transformers(name):
  """ours → config.json → transformers' config class → to_dict → ours: every field the same, the
  layer pattern the same (HF spells it as explicit lists). Behemoth's routed and shared experts have
  different widths, which HF's one `intermediate_size` cannot say: export refuses it by name."""
  from transformers import Llama4Config, Llama4TextConfig

  ours = load_config(CONFIGS / f"{name}.yaml").model
  if ours.shared_intermediate_size != ours.intermediate_size:
    with pytest.raises(ConfigError) as e:
      to_hf_config(ours)
    assert str(e.value) == (
      "model.shared_intermediate_size: HF Llama4 has one width for routed and shared experts; "
      "cannot export differing widths"
    )
    ours = dataclasses.replace(ours, shared_intermediate_size=ours.intermediate_size)
  hf = (Llama4Config if ours.vision is not None else Llama4TextConfig)(**to_hf_config(ours)).to_dict()
  back = from_hf_config(hf, **{k: getattr(ours, k) for k in NOT_IN_HF})
  assert back.layer_kinds == ours.layer_kinds
  pattern = {"moe_layers", "nope_layers", "global_attn_layers", "moe_layer_step", "nope_layer_interval", "vision"}
  for f in dataclasses.fields(ModelConfig):
    if f.name not in pattern:
      assert getattr(back, f.name) == getattr(ours, f.name), f.name
  if ours.vision is not None:
    assert back.vision == dataclasses.replace(ours.vision, **{k: getattr(back.vision, k) for k in LAYOUT_IDS})
  else:
    assert back.vision is None


def test_hf_defaults_and_multimodal_wrapper():
  cfg = from_hf_config(
    {
      "model_type": "llama4",
      "text_config": {
        "num_hidden_layers": 6,
        "rope_scaling": {
          "rope_type": "llama3",
          "factor": 8.0,
          "low_freq_factor": 1.0,
          "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192,
        },
        "rope_theta": 500000.0,
      },
    }
  )
  assert cfg.hidden_size == 5120 and cfg.use_qk_norm and cfg.num_layers == 6
  assert cfg.rope_scaling.factor == 8.0 and cfg.rope_scaling.high_freq_factor == 4.0
  assert [cfg.uses_rope(i) for i in range(6)] == [1, 1, 1, 0, 1, 1]


def test_hf_unsupported_fields_are_named():
  with pytest.raises(ConfigError, match="hidden_act"):
    from_hf_config({"hidden_act": "gelu"})
  with pytest.raises(ConfigError, match="model_type"):
    from_hf_config({"model_type": "llama"})
