"""Early fusion vs transformers.Llama4ForConditionalGeneration (float32), and the vision pieces alone."""

import jax
import numpy as np
import pytest
from hf_utils import MM_IDS, hf_mm_logits, make_hf_mm_model, our_logits, save_hf
from transformers.models.llama4.processing_llama4 import Llama4Processor

from behemoth_jax.config import VisionConfig, load_config
from behemoth_jax.convert import load_hf
from behemoth_jax.data.images import image_prompt_ids
from behemoth_jax.model.vision import pixel_shuffle
from behemoth_jax.scale.params import count_params

TOL = 1e-4
PATCH = MM_IDS["image_token_index"]
# Separators and the <|image|> marker are not in HF's config: give them ids inside the tiny vocab.
LAYOUT = dict(image_marker_id=92, tile_x_separator_id=93, tile_y_separator_id=94)

CONFIGS = {
  # every text layer MoE + qk-norm; 2 ViT layers, 4 heads × 8, 4×4 patches → 2×2 = 4 tokens per tile
  "scout_like": (dict(), dict()),
  # Maverick-like text (interleave 2, no qk-norm); 3 ViT layers, 2 heads × 16, 32 px tiles of 8 px patches
  "maverick_like": (
    dict(interleave_moe_layer_step=2, use_qk_norm=False, num_hidden_layers=8),
    dict(num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8),
  ),
  # dense text, MQA; ViT 48 wide (head_dim 12), 6×6 patches → 9 tokens per tile, projector 24
  "dense_wide_grid": (
    dict(moe_layers=[], num_key_value_heads=1, num_hidden_layers=3),
    dict(
      hidden_size=48,
      intermediate_size=192,
      image_size=42,
      patch_size=7,
      projector_input_dim=24,
      projector_output_dim=24,
      vision_output_dim=24,
    ),
  ),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = {}
  for i, (name, (text, vision)) in enumerate(CONFIGS.items()):
    model = make_hf_mm_model(seed=10 + i, vision=vision, **text)
    path = tmp_path_factory.mktemp(name)
    save_hf(model, path)
    ours = load_hf(path, dtype="float32")
    vc = VisionConfig(**{**_vision_fields(ours.cfg.vision), **LAYOUT})
    out[name] = (model, ours, vc)
  return out


def _vision_fields(vc):
  return {f: getattr(vc, f) for f in vc.__dataclass_fields__}


def _text(rng, n):
  return list(rng.integers(0, 88, n))


def _prompt(vc, rng, grids):
  """Text, then for each image its block (our layout), then text."""
  ids = _text(rng, 4)
  for grid in grids:
    ids += list(image_prompt_ids(vc, grid)) + _text(rng, 3)
  return np.asarray(ids)[None]


def _tiles(vc, rng, grids):
  n = sum(r * c + (r * c > 1) for r, c in grids)
  return rng.normal(size=(n, 3, vc.image_size, vc.image_size)).astype(np.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
  "images",
  [[(1, 1)], [(1, 1), (1, 1), (1, 1)], [(2, 3), (1, 1), (2, 1)]],
  ids=["one_image", "three_images", "multi_tile"],
)
def test_logits_match_hf(saved, name, images):
  hf_model, ours, vc = saved[name]
  rng = np.random.default_rng(len(images))
  ids, pixels = _prompt(vc, rng, images), _tiles(vc, rng, images)
  got = our_logits(ours, ids, pixel_values=pixels)
  diff = np.abs(got - hf_mm_logits(hf_model, ids, pixels)).max()
  assert diff <= TOL, f"{name}: max |ours - HF| = {diff:.2e}"


def test_per_row_tile_slots_equal_hf_batch(saved):
  """[B, K, C, H, W] per-row slots (training layout, padding slots unused) == HF's flat batch order."""
  hf_model, ours, vc = saved["scout_like"]
  rng = np.random.default_rng(5)
  a, b = _prompt(vc, rng, [(1, 1), (1, 1)]), _prompt(vc, rng, [(2, 1)])
  t = max(a.shape[1], b.shape[1])
  ids = np.stack([np.pad(a[0], (0, t - a.shape[1])), np.pad(b[0], (0, t - b.shape[1]))])
  tiles_a, tiles_b = _tiles(vc, rng, [(1, 1), (1, 1)]), _tiles(vc, rng, [(2, 1)])
  slots = np.zeros((2, 4, *tiles_a.shape[1:]), np.float32)
  slots[0, :2], slots[1, :3] = tiles_a, tiles_b
  want = hf_mm_logits(hf_model, ids, np.concatenate([tiles_a, tiles_b]))
  assert np.abs(our_logits(ours, ids, pixel_values=slots) - want).max() <= TOL


def test_placeholder_count_mismatch_is_one_clear_error(saved):
  _, ours, vc = saved["scout_like"]
  rng = np.random.default_rng(0)
  ids = _prompt(vc, rng, [(1, 1)])
  with pytest.raises(
    ValueError,
    match=r"pixel_values: the images give 8 image features but input_ids hold 4 image "
    rf"tokens \(id {PATCH}\)",
  ):
    ours(ids, pixel_values=_tiles(vc, rng, [(1, 1), (1, 1)]))
  with pytest.raises(ValueError, match="tiles of shape"):
    ours(ids, pixel_values=np.zeros((1, 3, vc.image_size + 1, vc.image_size), np.float32))


def test_prompt_layout_matches_hf_processor():
  vc = VisionConfig(
    **{
      **_vision_fields(VisionConfig()),
      "hidden_size": 32,
      "num_heads": 4,
      "intermediate_size": 128,
      "image_size": 28,
      "patch_size": 7,
      "projector_input_dim": 40,
      "projector_output_dim": 40,
      "vision_output_dim": 40,
    }
  )
  names = {
    "<|image_start|>": vc.boi_token_id,
    "<|image_end|>": vc.eoi_token_id,
    "<|patch|>": vc.image_token_id,
    "<|image|>": vc.image_marker_id,
    "<|tile_x_separator|>": vc.tile_x_separator_id,
    "<|tile_y_separator|>": vc.tile_y_separator_id,
  }
  for grid in [(1, 1), (2, 3), (4, 1), (1, 2)]:
    text = Llama4Processor._prompt_split_image(None, grid, vc.tokens_per_tile)
    want = [names[tok + "|>"] for tok in text.replace("|>", "|>\n").split("|>\n") if tok]
    assert list(image_prompt_ids(vc, grid)) == want, grid


def test_pixel_shuffle_equals_hf():
  import torch
  from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_pixel_shuffle

  x = np.random.default_rng(0).normal(size=(3, 36, 8)).astype(np.float32)
  want = hf_pixel_shuffle(torch.as_tensor(x), 0.5).numpy()
  np.testing.assert_array_equal(np.asarray(pixel_shuffle(x, 0.5)), want)


def test_scout_vision_counts():
  counts = count_params(load_config("configs/scout.yaml", ["model.vision={}"]).model)
  assert counts["vision_tower"] == 850_960_896
  assert counts["projector"] == 20_971_520
  assert counts["total"] == 108_641_793_536


def test_multimodal_logits_on_mesh_equal_one_device():
  """Tiles sharded as batch over fsdp × expert (8 devices) give the single-device logits."""
  from behemoth_jax.model.transformer import create_model
  from behemoth_jax.train.state import init_sharded
  from sharding.api import use_mesh
  from sharding.mesh import make_mesh

  cfg = load_config("configs/tiny_mm.yaml", ["model.num_layers=2"])
  model = create_model(cfg.model, seed=3)
  vc = cfg.model.vision
  rng = np.random.default_rng(0)
  rows = [_prompt(vc, rng, [(1, 1)] * (b % 3 + 1))[0] for b in range(8)]
  t = max(len(r) for r in rows)
  ids = np.stack([np.pad(r, (0, t - len(r))) for r in rows])
  pixels = rng.normal(size=(8, 3, 3, vc.image_size, vc.image_size)).astype(np.float32)
  want = our_logits(model, ids, pixel_values=pixels)
  mesh = make_mesh(cfg.parallel)
  sharded = init_sharded(cfg.model, mesh, seed=3)
  with use_mesh(mesh):
    got = np.asarray(jax.jit(lambda m, i, p: m(i, pixel_values=p))(sharded, ids, pixels))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
