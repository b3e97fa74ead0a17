"""Image and video preprocessing for the vision encoder (numpy + Pillow), and the prompt token layout.

Images (HF `Llama4ImageProcessor`'s algorithm, docs/ARCHITECTURE.md §3):
  1. canvases: every (rows × cols) grid of tiles with rows·cols ≤ max_tiles;
  2. best fit: the smallest upscale that fits the image without distortion, or if none, the mildest
     downscale; ties go to the smallest canvas area; upscaling is capped at the tile size;
  3. aspect-preserving bilinear resize, zero padding right/bottom, split into tiles row-major;
  4. multi-tile images get a global thumbnail tile (the whole image resized to one tile) last;
  5. pixels / 255, normalised with mean = std = 0.5. HF does this in bfloat16 (as Meta's reference
     code did); `hf_rounding=True` (default) reproduces that rounding, False keeps float32.
Resizing uses Pillow's bilinear filter where HF uses torchvision's; pixels can differ by a few 1/255.

Prompt layout per image: <|image_start|> [tiles: 144 × <|patch|> per tile, <|tile_x_separator|>
between tiles of a row, <|tile_y_separator|> after each row] <|image|> 144 × <|patch|> <|image_end|>.
Single-tile images have no tile section.

Video (no public Llama 4 video path; our convention): frames sampled in time order, each encoded as
a single-tile image in its own <|image_start|> … <|image_end|> block. Sources: an array [T, H, W, C],
a directory of image files (sorted by name), or any file Pillow reads as frames (animated GIF, APNG,
WebP, multi-page TIFF).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from behemoth_jax.config import VisionConfig
from behemoth_jax.data.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def supported_canvases(max_tiles: int) -> list[tuple[int, int]]:
  """(rows, cols) grids with rows·cols ≤ max_tiles, in HF's order (grouped by aspect ratio)."""
  by_ratio: dict[float, list[tuple[int, int]]] = {}
  for n in range(max_tiles, 0, -1):
    for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
      by_ratio.setdefault(rows / (n // rows), []).append((rows, n // rows))
  return [grid for grids in by_ratio.values() for grid in grids]


def best_canvas(
  height: int, width: int, tile: int, max_tiles: int, resize_to_max_canvas: bool = False
) -> tuple[int, int]:
  """The canvas (rows, cols) an image of `height` × `width` is fitted to (HF `get_best_fit`)."""
  grids = np.array(supported_canvases(max_tiles))
  scale_h, scale_w = grids[:, 0] * tile / height, grids[:, 1] * tile / width
  scales = np.where(scale_h > scale_w, scale_w, scale_h)
  up = scales[scales >= 1]
  if up.size:
    chosen = up.max() if resize_to_max_canvas else up.min()
  else:
    chosen = scales[scales < 1].max()
  candidates = grids[scales == chosen]
  best = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
  return int(best[0]), int(best[1])


def _fit_without_distortion(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
  scale_h, scale_w = target_h / height, target_w / width
  if scale_w < scale_h:
    return max(min(math.floor(height * scale_w), target_h), 1), max(target_w, 1)
  return max(target_h, 1), max(min(math.floor(width * scale_h), target_w), 1)


def load_image(image: Any, where: str = "image") -> Image.Image:
  """A PIL image in RGB from a path, a PIL image, or a uint8 array [H, W] / [H, W, 3|4]."""
  if isinstance(image, (str, Path)):
    try:
      with Image.open(image) as im:
        im.load()
        return im.convert("RGB")
    except FileNotFoundError:
      raise DataError(f"{image}: image file not found") from None
    except (UnidentifiedImageError, OSError) as e:
      raise DataError(f"{image}: not an image Pillow can read ({e.__class__.__name__})") from None
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None].repeat(3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise DataError(f"{where}: expected an image array [H, W] or [H, W, 1|3|4], got shape {arr.shape}")
  if arr.dtype != np.uint8:
    raise DataError(f"{where}: expected uint8 pixels, got {arr.dtype}")
  if arr.shape[-1] == 1:
    arr = arr.repeat(3, axis=-1)
  return Image.fromarray(arr[..., :3], "RGB")


def normalize(pixels_HWC: np.ndarray, hf_rounding: bool = True) -> np.ndarray:
  """uint8 [H, W, 3] → float32 [3, H, W]: (x/255 - 0.5) / 0.5, with HF's bfloat16 steps if asked."""
  x = pixels_HWC.astype(np.float32).transpose(2, 0, 1)
  if not hf_rounding:
    return (x / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
  bf16 = ml_dtypes.bfloat16
  x = (x.astype(bf16).astype(np.float32) * np.float32(1 / 255)).astype(bf16).astype(np.float32)
  x = (x - np.float32(0.5)).astype(bf16).astype(np.float32)
  return (x / np.float32(0.5)).astype(bf16).astype(np.float32)


def preprocess_image(
  image: Any, tile: int = 336, max_tiles: int = 16, *, resize_to_max_canvas: bool = False, hf_rounding: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
  """An image → (tiles float32 [n, 3, tile, tile], (rows, cols)); n = rows·cols, plus one global
  thumbnail tile when rows·cols > 1."""
  im = load_image(image)
  width, height = im.size
  rows, cols = best_canvas(height, width, tile, max_tiles, resize_to_max_canvas)
  target_h, target_w = rows * tile, cols * tile
  if not resize_to_max_canvas:  # never upscale beyond what the tile size needs
    target_h, target_w = min(max(height, tile), target_h), min(max(width, tile), target_w)
  new_h, new_w = _fit_without_distortion(height, width, target_h, target_w)
  canvas = np.zeros((rows * tile, cols * tile, 3), np.uint8)
  canvas[:new_h, :new_w] = np.asarray(im.resize((new_w, new_h), Image.Resampling.BILINEAR))
  pixels = normalize(canvas, hf_rounding)
  tiles = pixels.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
  if rows * cols > 1:
    thumb = normalize(np.asarray(im.resize((tile, tile), Image.Resampling.BILINEAR)), hf_rounding)
    tiles = np.concatenate([tiles, thumb[None]], axis=0)
  return tiles, (rows, cols)


def check_layout_ids(vc: VisionConfig, vocab_size: int) -> None:
  for name in (
    "image_token_id",
    "boi_token_id",
    "eoi_token_id",
    "image_marker_id",
    "tile_x_separator_id",
    "tile_y_separator_id",
  ):
    if not 0 <= getattr(vc, name) < vocab_size:
      raise DataError(f"model.vision.{name}: {getattr(vc, name)} is outside the vocabulary [0, {vocab_size})")


def image_prompt_ids(vc: VisionConfig, grid: tuple[int, int]) -> np.ndarray:
  """Token ids of one image's block for a (rows, cols) canvas (HF `_prompt_split_image`)."""
  patches = [vc.image_token_id] * vc.tokens_per_tile
  rows, cols = grid
  ids = [vc.boi_token_id]
  if rows * cols > 1:
    for _ in range(rows):
      for x in range(cols):
        ids += patches + ([vc.tile_x_separator_id] if x < cols - 1 else [])
      ids.append(vc.tile_y_separator_id)
  ids += [vc.image_marker_id] + patches + [vc.eoi_token_id]
  return np.asarray(ids, np.int32)


def video_frames(
  video: Any, *, num_frames: int | None = 8, fps: float | None = None, source_fps: float | None = None
) -> list[Image.Image]:
  """Frames sampled in time order from an array [T, H, W, C], a list of frame files or images, a
  directory of images, or a file of frames.

  num_frames: that many frames spread evenly over the clip (all frames if the clip has fewer).
  fps: instead, one frame every 1/fps seconds; frame times come from the file (GIF/APNG durations) or
  from `source_fps` for arrays and directories.
  """
  frames, times = _read_frames(video, source_fps)
  if not frames:
    raise DataError(f"{_name(video)}: video has no frames")
  if fps is not None:
    if fps <= 0:
      raise DataError(f"fps: must be > 0, got {fps}")
    if times is None:
      raise DataError(f"{_name(video)}: frame times unknown; pass source_fps to sample by fps")
    picks, t = [], 0.0
    while t <= times[-1] + 1e-9:
      picks.append(int(np.searchsorted(times, t, side="right") - 1))
      t += 1.0 / fps
    idx = sorted(set(picks))
  else:
    if num_frames is None or num_frames < 1:
      raise DataError(f"num_frames: must be >= 1, got {num_frames}")
    n = len(frames)
    idx = (
      list(range(n))
      if n <= num_frames
      else [round(i * (n - 1) / (num_frames - 1)) if num_frames > 1 else 0 for i in range(num_frames)]
    )
  return [frames[i] for i in idx]


def _name(video: Any) -> str:
  return str(video) if isinstance(video, (str, Path)) else f"video array {getattr(video, 'shape', '')}"


def count_frames(video: Any) -> int:
  """Frames in a video source without decoding them (the header of a file, the listing of a directory)."""
  if isinstance(video, (list, tuple)):
    return len(video)
  if isinstance(video, (str, Path)):
    path = Path(video)
    if path.is_dir():
      return sum(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
    try:
      with Image.open(path) as im:
        return getattr(im, "n_frames", 1)
    except FileNotFoundError:
      raise DataError(f"{path}: video file or directory not found") from None
    except (UnidentifiedImageError, OSError) as e:
      raise DataError(f"{path}: not a file of frames Pillow can read ({e.__class__.__name__})") from None
  return len(np.asarray(video))


def _read_frames(video: Any, source_fps: float | None) -> tuple[list[Image.Image], np.ndarray | None]:
  """(frames, start time of each frame in seconds, or None when unknown)."""
  per_frame = None if source_fps is None else 1.0 / source_fps
  if isinstance(video, (list, tuple)):  # frame files or images, in time order
    frames = [load_image(f, where=f"video frame {i}") for i, f in enumerate(video)]
    return frames, None if per_frame is None else np.arange(len(frames)) * per_frame
  if isinstance(video, (str, Path)):
    path = Path(video)
    if path.is_dir():
      files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
      if not files:
        raise DataError(f"{path}: directory holds no image files ({', '.join(IMAGE_SUFFIXES)})")
      frames = [load_image(p) for p in files]
      return frames, None if per_frame is None else np.arange(len(frames)) * per_frame
    if not path.is_file():
      raise DataError(f"{path}: video file or directory not found")
    try:
      with Image.open(path) as im:
        frames, durations = [], []
        for frame in ImageSequence.Iterator(im):
          frames.append(frame.convert("RGB"))
          durations.append(frame.info.get("duration"))
    except (UnidentifiedImageError, OSError) as e:
      raise DataError(f"{path}: not a file of frames Pillow can read ({e.__class__.__name__})") from None
    if all(d for d in durations):
      return frames, np.concatenate([[0.0], np.cumsum(np.asarray(durations[:-1], float) / 1000.0)])
    return frames, None if per_frame is None else np.arange(len(frames)) * per_frame
  arr = np.asarray(video)
  if arr.ndim != 4:
    raise DataError(f"video: expected frames [T, H, W, C], got shape {arr.shape}")
  frames = [load_image(f, where=f"video frame {i}") for i, f in enumerate(arr)]
  return frames, None if per_frame is None else np.arange(len(frames)) * per_frame


def preprocess_video(
  video: Any,
  tile: int = 336,
  *,
  num_frames: int | None = 8,
  fps: float | None = None,
  source_fps: float | None = None,
  hf_rounding: bool = True,
) -> np.ndarray:
  """A video → tiles float32 [frames, 3, tile, tile], one single-tile image per sampled frame."""
  frames = video_frames(video, num_frames=num_frames, fps=fps, source_fps=source_fps)
  return np.stack([preprocess_image(f, tile, max_tiles=1, hf_rounding=hf_rounding)[0][0] for f in frames])


def video_prompt_ids(vc: VisionConfig, num_frames: int) -> np.ndarray:
  """One single-tile image block per frame, in time order."""
  return np.concatenate([image_prompt_ids(vc, (1, 1))] * num_frames)
