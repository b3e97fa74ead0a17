"""A procedural image/video–caption dataset (`data.source: builtin_shapes`) for learning to see on CPU.

Example i is drawn from its own seed (same picture on every machine and run): a shape of one of
COLOURS and SHAPES at a random place and size on a dark noisy background, captioned "a red circle.";
a fraction of examples are short clips of the shape moving in one of DIRECTIONS, captioned
"a red circle moving left.". The caption words come from the generator, so a model's caption can be
checked word by word (`caption_candidates`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
  "red": (220, 40, 40),
  "green": (40, 190, 60),
  "blue": (50, 90, 230),
  "yellow": (235, 215, 40),
  "purple": (160, 60, 210),
  "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
NUM_EXAMPLES = 50_000
VIDEO_FRACTION = 0.3


def attributes(i: int) -> dict:
  """The generator's choices for example i (no drawing)."""
  rng = np.random.default_rng([7, i])
  video = bool(rng.random() < VIDEO_FRACTION)
  return {
    "colour": list(COLOURS)[rng.integers(len(COLOURS))],
    "shape": SHAPES[rng.integers(len(SHAPES))],
    "direction": list(DIRECTIONS)[rng.integers(len(DIRECTIONS))] if video else None,
    "video": video,
    "seed": int(rng.integers(2**31)),
  }


def caption(attrs: dict) -> str:
  moving = f" moving {attrs['direction']}" if attrs["direction"] else ""
  return f"a {attrs['colour']} {attrs['shape']}{moving}."


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == "square":
    draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
  else:  # cross
    w = 0.35 * r
    draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def render(i: int, size: int, frames: int) -> tuple[list[np.ndarray], dict]:
  """(uint8 frames [size, size, 3] — one for an image example, `frames` for a video — , attributes)."""
  attrs = attributes(i)
  rng = np.random.default_rng(attrs["seed"])
  r = size * (rng.uniform(0.17, 0.22) if attrs["video"] else rng.uniform(0.26, 0.36))
  fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[attrs["colour"]])
  n = frames if attrs["video"] else 1
  step = size * 0.1
  dx, dy = DIRECTIONS[attrs["direction"]] if attrs["video"] else (0, 0)
  travel_x, travel_y = dx * step * (n - 1), dy * step * (n - 1)
  lo, hi = r + 1, size - r - 1
  cx = rng.uniform(lo + max(0, -travel_x), hi - max(0, travel_x))
  cy = rng.uniform(lo + max(0, -travel_y), hi - max(0, travel_y))
  background = rng.integers(0, 50, (size, size, 3)).astype(np.uint8)
  out = []
  for t in range(n):
    im = Image.fromarray(background)
    _draw(ImageDraw.Draw(im), attrs["shape"], cx + dx * step * t, cy + dy * step * t, r, fill)
    out.append(np.asarray(im))
  return out, attrs


def caption_candidates(attrs: dict) -> dict[str, tuple[list[str], int]]:
  """For each attribute the caption states: (captions with every possible word there, index of the true one)."""
  out = {}
  fields = [("colour", list(COLOURS)), ("shape", list(SHAPES))]
  if attrs["direction"]:
    fields.append(("direction", list(DIRECTIONS)))
  for field, words in fields:
    out[field] = ([caption({**attrs, field: w}) for w in words], words.index(attrs[field]))
  return out
