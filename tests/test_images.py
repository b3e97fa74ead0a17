"""Image tiling, video frame sampling and the multimodal input pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from behemoth_jax.config import load_config
from behemoth_jax.data import DataError, load_tokenizer
from behemoth_jax.data.images import (
  best_canvas,
  normalize,
  preprocess_image,
  preprocess_video,
  supported_canvases,
  video_frames,
)
from behemoth_jax.data.multimodal import make_mm_iterator


def test_canvases_and_best_fit_match_hf_docstrings():
  # HF find_supported_resolutions(4, 224) docstring, as (rows, cols).
  assert supported_canvases(4) == [(1, 4), (2, 2), (1, 1), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1)]
  # HF get_best_fit docstring: (200, 300) over 224×{672, 448, 224} canvases → [224, 448]: smallest
  # upscale (1.12) and, of the canvases allowing it, the smallest area.
  assert best_canvas(200, 300, 224, 3) == (1, 2)
  # A 1000 × 3000 image cannot be upscaled onto any canvas of ≤ 16 tiles of 336: the mildest downscale wins.
  scales = {g: min(g[0] * 336 / 1000, g[1] * 336 / 3000) for g in supported_canvases(16)}
  assert max(s for s in scales.values() if s < 1) == scales[best_canvas(1000, 3000, 336, 16)]


def test_preprocess_image_tiles_padding_and_thumbnail():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
  image = Image.fromarray(pixels)
  tiles, grid = preprocess_image(image, tile=28, max_tiles=6, hf_rounding=False)
  # 40 × 70 fits 2 × 3 tiles of 28 (scale min(56/40, 84/70) = 1.2, the smallest upscale), but upscaling
  # stops at the image's own size: resized to 40 × 70, padded to 56 × 84.
  assert grid == (2, 3) and tiles.shape == (7, 3, 28, 28)
  canvas = np.full((3, 56, 84), -1.0, np.float32)  # zero padding normalises to -1
  canvas[:, :40, :70] = normalize(np.asarray(image.resize((70, 40), Image.Resampling.BILINEAR)), hf_rounding=False)
  for r in range(2):
    for c in range(3):
      np.testing.assert_allclose(tiles[r * 3 + c], canvas[:, r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28], atol=1e-6)
  thumb = normalize(np.asarray(image.resize((28, 28), Image.Resampling.BILINEAR)), hf_rounding=False)
  np.testing.assert_allclose(tiles[-1], thumb, atol=1e-6)
  single, grid1 = preprocess_image(image, tile=28, max_tiles=1)
  assert grid1 == (1, 1) and single.shape == (1, 3, 28, 28)  # no thumbnail for one tile


def test_normalize_reproduces_hf_bfloat16_rounding():
  import torch

  x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
  t = torch.as_tensor(x.transpose(2, 0, 1)).to(torch.bfloat16) * (1 / 255)
  want = ((t - 0.5) / 0.5).float().numpy()
  np.testing.assert_array_equal(normalize(x), want)


def _gif(path, n, duration=100):
  frames = [Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)) for i in range(n)]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration, loop=0)


def test_video_sampling_from_gif_directory_and_array(tmp_path):
  _gif(tmp_path / "clip.gif", 10)
  level = lambda frames: [int(np.asarray(f)[0, 0, 0]) // 20 for f in frames]  # noqa: E731
  assert level(video_frames(tmp_path / "clip.gif", num_frames=4)) == [0, 3, 6, 9]
  assert level(video_frames(tmp_path / "clip.gif", num_frames=None, fps=5)) == [0, 2, 4, 6, 8]  # 100 ms frames
  (tmp_path / "frames").mkdir()
  for i in (3, 1, 2):  # written out of order: sorted by name
    Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(tmp_path / "frames" / f"f{i:02d}.png")
  assert level(video_frames(tmp_path / "frames", num_frames=8)) == [1, 2, 3]
  array = np.stack([np.full((12, 12, 3), 20 * i, np.uint8) for i in range(6)])
  assert level(video_frames(array, num_frames=None, fps=2, source_fps=6)) == [0, 3]
  tiles = preprocess_video(array, tile=14, num_frames=3)
  assert tiles.shape == (3, 3, 14, 14)
  np.testing.assert_allclose(
    tiles[:, 0, 0, 0], [normalize(np.full((1, 1, 3), 20 * i, np.uint8))[0, 0, 0] for i in (0, 2, 5)]
  )
  with pytest.raises(DataError, match="frame times unknown"):
    video_frames(array, num_frames=None, fps=2)
  with pytest.raises(DataError, match="missing.gif: video file or directory not found"):
    video_frames(tmp_path / "missing.gif")


def _mm_cfg(tmp_path, source, **data):
  overrides = [f"data.source={source}", "train.seq_len=128", *[f"data.{k}={v}" for k, v in data.items()]]
  return load_config("configs/tiny_mm.yaml", overrides)


def _iterator(cfg, split="train", batch=4):
  return make_mm_iterator(
    cfg.data,
    cfg.model.vision,
    load_tokenizer("bytes"),
    split=split,
    seq_len=cfg.train.seq_len,
    batch_size=batch,
    seed=0,
    process_index=0,
    process_count=1,
    vocab_size=cfg.model.vocab_size,
  )


def test_builtin_shapes_batches_are_consistent(tmp_path):
  cfg = _mm_cfg(tmp_path, "builtin_shapes")
  vc = cfg.model.vision
  batch = next(_iterator(cfg))
  layout = {vc.image_token_id, vc.boi_token_id, vc.eoi_token_id, vc.image_marker_id}
  for b in range(4):
    used_tiles = int((np.abs(batch["pixel_values"][b]).reshape(cfg.data.max_tiles_per_row, -1).sum(-1) > 0).sum())
    assert (batch["inputs"][b] == vc.image_token_id).sum() == vc.tokens_per_tile * used_tiles
    targets, mask = batch["targets"][b], batch["loss_mask"][b]
    assert not any(t in layout for t in targets[mask > 0])  # never trained to predict image layout
    text = bytes(int(t) for t in targets[(mask > 0) & (targets < 256)]).decode()
    assert text.startswith("a ") and text.count(".") == batch["segment_ids"][b].max()  # one caption per example


def test_jsonl_images_videos_and_text_records(tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(tmp_path / "tall.png")
  _gif(tmp_path / "clip.gif", 6)
  lines = [
    '{"text": "a tall picture", "image": "tall.png"}',
    '{"text": "a clip", "video": "clip.gif"}',
    '{"text": "just text"}',
  ]
  (tmp_path / "mm.jsonl").write_text("\n".join(lines * 20) + "\n")
  cfg = _mm_cfg(tmp_path, tmp_path / "mm.jsonl", video_frames=2, heldout_fraction=0.5)
  vc = cfg.model.vision
  batch = next(_iterator(cfg, "heldout", batch=8))
  # tall.png (64 × 32) tiles 2 × 1 at 32 px + a thumbnail: 3 tiles; the clip: 2 frames of one tile.
  per_example = {"a tall picture": 3, "a clip": 2, "just text": 0}
  for b in range(8):
    targets, mask = batch["targets"][b], batch["loss_mask"][b]
    texts = bytes(int(t) for t in targets[(mask > 0) & (targets < 256)]).decode()
    tiles = sum(per_example[t] * texts.count(t) for t in per_example)
    assert (batch["inputs"][b] == vc.image_token_id).sum() == vc.tokens_per_tile * tiles


def test_arrayrecord_of_json_records(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter

  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "grey.png")
  w = ArrayRecordWriter(str(tmp_path / "mm.array_record"), "group_size:1")
  for i in range(12):
    w.write(json.dumps({"text": f"picture {i}", "image": "grey.png"}).encode())
  w.close()
  cfg = _mm_cfg(tmp_path, tmp_path / "mm.array_record", heldout_fraction=0.5)
  batch = next(_iterator(cfg, "heldout", batch=2))
  vc = cfg.model.vision
  row = batch["inputs"][0]
  assert (row == vc.image_token_id).sum() == vc.tokens_per_tile * (row == vc.boi_token_id).sum() > 0
  # the tile is the grey picture: (200/255 − 0.5)/0.5 in every used slot
  used = int((row == vc.boi_token_id).sum())
  np.testing.assert_allclose(
    batch["pixel_values"][0, :used], normalize(np.full((1, 1, 3), 200, np.uint8))[0, 0, 0], atol=1e-6
  )


def test_example_too_big_for_a_row_names_the_limits(tmp_path):
  cfg = _mm_cfg(tmp_path, "builtin_shapes", max_tiles_per_row=2)
  with pytest.raises(DataError, match=r"needs \d+ tokens and 4 tiles.*data.max_tiles_per_row=2"):
    _iterator(cfg)


def test_iterator_state_resumes_the_same_batches(tmp_path):
  cfg = _mm_cfg(tmp_path, "builtin_shapes")
  it = _iterator(cfg)
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  fresh = _iterator(cfg)
  fresh.set_state(state)
  for a, b in zip(want, [next(fresh) for _ in range(2)], strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


# transformers' Llama4ImageProcessor needs torchvision. PyPI's Linux x86_64 torchvision is a CUDA
# build: beside the CPU torch the suite pins, its compiled ops fail to register and `import
# torchvision` raises, which would also break every `transformers` import in the test environment.
# Its pure-Python transforms (all the processor uses) work on the CPU, so the README's test command
# installs it apart (`pip install --no-deps --target .cache/torchvision torchvision==0.28.0`, the
# release built for torch 2.13.0) and the processor runs in a subprocess that skips the op registration.
TORCHVISION = Path(__file__).parent.parent / ".cache" / "torchvision"
HF_PROCESSOR = """
import sys, types
sys.path.insert(0, sys.argv[1])
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import numpy as np
from PIL import Image
from transformers import Llama4ImageProcessor
processor = Llama4ImageProcessor()
for path in sys.argv[2:]:
  out = processor(Image.open(path), return_tensors="pt")
  np.save(path + ".pixels.npy", out["pixel_values"].float().numpy())
  np.save(path + ".grid.npy", out["aspect_ratios"].numpy())
"""


def test_preprocess_image_matches_transformers_llama4_image_processor(tmp_path):
  """Seven sizes and aspect ratios (one tile, wide, tall, upscaled, downscaled, off-by-one), each as a
  smooth gradient and as noise: the same canvas, tile count and order, thumbnail and normalisation.
  Gradients agree bitwise. On noise the two bilinear resizes (Pillow's, torchvision's antialiased
  one) round a few pixels to the neighbouring uint8 level: at most 2 levels, in under 5% of values."""
  if not (TORCHVISION / "torchvision").is_dir():
    pytest.skip(
      f"torchvision for the HF oracle is not in {TORCHVISION}: pip install --no-deps --target "
      ".cache/torchvision torchvision==0.28.0 (the README's test command does)"
    )
  import subprocess
  import sys

  rng = np.random.default_rng(0)
  paths = {}
  for h, w in [(336, 336), (500, 700), (100, 1500), (1200, 300), (50, 60), (1000, 1000), (337, 673)]:
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 127 // (h + w - 2)], -1).astype(np.uint8)
    for kind, pixels in (("smooth", smooth), ("noise", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))):
      paths[h, w, kind] = tmp_path / f"{h}x{w}-{kind}.png"
      Image.fromarray(pixels).save(paths[h, w, kind])
  r = subprocess.run(
    [sys.executable, "-c", HF_PROCESSOR, str(TORCHVISION), *map(str, paths.values())],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  for (h, w, kind), path in paths.items():
    want, want_grid = np.load(f"{path}.pixels.npy"), np.load(f"{path}.grid.npy")
    got, grid = preprocess_image(path)
    assert got.shape == want.shape and [list(grid)] == want_grid.tolist(), (h, w)
    if kind == "smooth":
      np.testing.assert_array_equal(got, want, err_msg=f"{h}x{w}")
    else:
      diff = np.abs(got - want)
      assert diff.max() <= 2 * 2 / 255 + 2e-3 and (diff > 0).mean() < 0.05, (h, w, diff.max(), (diff > 0).mean())
