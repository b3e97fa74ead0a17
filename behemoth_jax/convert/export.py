"""Our model → Hugging Face: safetensors shards + index + config.json + generation_config.json, and
in-memory torch state dicts.

Each HF tensor is built in place from the key table (convert/keymap.py): its buffer is allocated in
the HF layout, and each rule's `to_ours` applied to the buffer gives a view of it in our layout (a
transpose, a split of heads, one half of the fused expert `gate_up_proj`), which the parameter source
fills: one layer (one slice of a stacked leaf) at a time, read by tensorstore straight into the view
for a checkpoint (`train.checkpoint.ParamReader`). So host memory is the tensor being written plus the
next one, built on a second thread meanwhile, whatever the model and whether its layers are stacked:
at most 2 × the largest HF tensor and tensorstore's chunk buffers (`write_hf` builds them in two
reused buffers of that size). The directory is written under a temporary name, its files fsynced, and
renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from behemoth_jax.config import ModelConfig
from behemoth_jax.convert.hf_config import export_config, hf_pad_token_id
from behemoth_jax.convert.hostcopy import copy_tiled, host_buffer, transposes
from behemoth_jax.convert.keymap import Entry, entries
from behemoth_jax.convert.safetensors_io import write_safetensors
from behemoth_jax.train.checkpoint import HF_CONFIG, HF_GENERATION_CONFIG, find_beside


def _prefix(cfg: ModelConfig) -> str:
  return "language_model." if cfg.vision is not None else ""


def tensor_groups(cfg: ModelConfig, num_cycles: int) -> list[tuple[str, list[Entry]]]:
  """(HF name, its entries) in the key table's order (layer by layer): the same files whether our layers
  are stacked or not, since each tensor reads only its layer's slice."""
  groups: dict[str, list[Entry]] = OrderedDict()
  for e in entries(cfg, num_cycles, _prefix(cfg)):
    groups.setdefault(e.hf_name, []).append(e)
  for ents in groups.values():
    ents.sort(key=lambda e: e.rule.part[0] if e.rule.part else 0)
  return list(groups.items())


def hf_shape(group: list[Entry], cfg: ModelConfig, leaf_shape: tuple[int, ...], dtype) -> tuple[int, ...]:
  """The HF tensor's shape, from our leaf's (no data touched)."""
  per_layer = leaf_shape[1:] if group[0].stack is not None else leaf_shape
  out = jax.eval_shape(lambda a: group[0].rule.to_hf(a, cfg), jax.ShapeDtypeStruct(per_layer, dtype)).shape
  return (*out[:-1], out[-1] * len(group)) if len(group) > 1 else tuple(out)


# read_into(leaf path, index on the stacked layers axis or None, destination view, rows=None): fills the
# view with the leaf (its layer `index`; `rows`: a slice of the first axis after that), or starts filling
# it and returns a future (`.result()` waits).
ReadInto = Callable[..., object]
PIECE_BYTES = 16 << 20  # a transposed leaf is read in pieces of about this size (see `_build`)


def model_reader(model) -> tuple[dict, ReadInto]:
  """({leaf: (shape, dtype)}, read_into) of an in-memory model: one layer of a stacked leaf is sliced on
  its devices and copied to the host alone."""
  flat = {k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

  def read_into(leaf, index, out, rows=None):
    value = flat[leaf] if index is None else flat[leaf][index]
    out[...] = np.asarray(jax.device_get(value if rows is None else value[rows]))

  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}, read_into


def iter_hf_tensors(model, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy tensor) pairs of `model` (see the module docstring)."""
  shapes, read_into = model_reader(model)
  plan = hf_plan(model.cfg, model.decoder.num_cycles, shapes, dtype)
  return _iter_hf_tensors(model.cfg, plan, read_into)


def hf_plan(cfg: ModelConfig, num_cycles: int, leaf_shapes: dict, dtype: str | None) -> list:
  """[(HF name, shape, dtype, entries)] in `tensor_groups` order; a tensor's dtype is `dtype` or its
  leaves' (promoted if gate and up differ)."""
  plan = []
  for name, ents in tensor_groups(cfg, num_cycles):
    shape, leaf_dtype = leaf_shapes[ents[0].leaf]
    if dtype:
      out_dtype = np.dtype(dtype)
    else:
      out_dtype = np.result_type(*(leaf_shapes[e.leaf][1] for e in ents))
    plan.append((name, hf_shape(ents, cfg, shape, leaf_dtype), out_dtype, ents))
  return plan


def _build(
  cfg: ModelConfig, item, read_into: ReadInto, buffer: np.ndarray | None = None, scratch: np.ndarray | None = None
) -> np.ndarray:
  """One HF tensor: its buffer (the front of `buffer`, bytes, when given), each entry's view of it in
  our layout filled by `read_into`. A view that transposes (an HF [out, in] weight) is filled in pieces
  of its first axis read contiguously into `scratch` (PIECE_BYTES, or allocated) and copied in tiles:
  tensorstore filled such a view at 0.12-0.14 GB/s (element by element, a row apart), against
  1.3-1.5 GB/s for a contiguous read, and the pieces bound the extra memory whatever the tensor."""
  _, shape, dtype, ents = item
  if buffer is None:
    out = np.empty(shape, dtype)
  else:
    out = buffer[: int(np.prod(shape, dtype=np.int64)) * dtype.itemsize].view(dtype).reshape(shape)
  started = []  # a source may return a future per read: the parts of a fused tensor are read at once
  for e in ents:
    view = e.rule.to_ours(out, cfg)
    if np.shares_memory(view, out):
      if transposes(view):
        _read_in_pieces(read_into, e, view, scratch)
      else:
        started.append(read_into(e.leaf, e.stack, view))
    else:  # a rule whose inverse is not a view of its input: fill a copy, then transform it back
      assert e.rule.part is None, f"{e.hf_name}: a fused part must be a view of the HF tensor"
      ours = np.empty(view.shape, dtype)
      _wait(read_into(e.leaf, e.stack, ours))
      out[...] = e.rule.to_hf(ours, cfg)
  for read in started:
    _wait(read)
  return out


def _read_in_pieces(read_into: ReadInto, e: Entry, view: np.ndarray, scratch: np.ndarray | None) -> None:
  """view[...] = leaf (layer e.stack), read a few rows of its first axis at a time into `scratch`."""
  row_bytes = int(np.prod(view.shape[1:], dtype=np.int64)) * view.dtype.itemsize
  step = max(1, PIECE_BYTES // max(row_bytes, 1))
  if scratch is None or scratch.nbytes < min(step, view.shape[0]) * row_bytes:
    scratch = host_buffer(min(step, view.shape[0]) * row_bytes)
  for r0 in range(0, view.shape[0], step):
    r1 = min(r0 + step, view.shape[0])
    piece = scratch[: (r1 - r0) * row_bytes].view(view.dtype).reshape(r1 - r0, *view.shape[1:])
    _wait(read_into(e.leaf, e.stack, piece, slice(r0, r1)))
    copy_tiled(view[r0:r1], piece)


def _wait(read) -> None:
  if read is not None:
    read.result()


def _nbytes(item) -> int:
  return int(np.prod(item[1], dtype=np.int64)) * item[2].itemsize


def _iter_hf_tensors(
  cfg: ModelConfig, plan: list, read_into: ReadInto, reuse: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
  """The plan's tensors in order; the next is built on a second thread while the caller consumes this
  one (reading and writing overlap; two tensors alive). `reuse`: the tensors are built in two buffers
  of the largest tensor's size, taken in turn, so a yielded tensor is valid only until the next is
  asked for. Why: a fresh buffer's pages are zeroed by the kernel as they are first touched, which
  cost more than filling them (perf: 17% of to-hf's CPU time in clear_page)."""
  largest = max(map(_nbytes, plan), default=0)
  buffers = [host_buffer(largest), host_buffer(largest)] if reuse else [None, None]
  scratch = host_buffer(min(PIECE_BYTES, largest)) if reuse else None  # used by the one building thread
  with ThreadPoolExecutor(1, thread_name_prefix="hf-tensor") as pool:
    ahead = pool.submit(_build, cfg, plan[0], read_into, buffers[0], scratch) if plan else None
    for i, item in enumerate(plan):
      tensor = ahead.result()
      # The other buffer held tensor i - 1, which the caller is done with: it asked for tensor i.
      nxt = i + 1 < len(plan)
      ahead = pool.submit(_build, cfg, plan[i + 1], read_into, buffers[(i + 1) % 2], scratch) if nxt else None
      yield item[0], tensor
      del tensor


def to_torch_state_dict(model, dtype: str | None = None) -> dict:
  """HF-named torch tensors (CPU) for `model.load_state_dict` of transformers' Llama4 classes."""
  import torch  # optional (the test extra): only this in-memory bridge needs it

  out = {}
  for name, t in iter_hf_tensors(model, dtype):
    if t.dtype.name == "bfloat16":
      out[name] = torch.from_numpy(t.view(np.int16).copy()).view(torch.bfloat16)
    else:
      out[name] = torch.from_numpy(t.copy())
  return out


def parse_size(text: str | int) -> int:
  """'5GB', '500MB', '2GiB', 1000 → bytes (decimal units as HF uses them; *iB binary)."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size: cannot read {text!r} (e.g. 5GB, 500MB, 2GiB)")
  unit = m.group(2).upper().rstrip("B")
  scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[
    unit
  ]
  return int(float(m.group(1)) * scale)


def generation_config(cfg: ModelConfig, source: dict | None = None) -> dict:
  """generation_config.json: the source's as it was with our token ids written over it, or ours."""
  ours = {
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": list(cfg.eos_token_ids),
    "pad_token_id": hf_pad_token_id(cfg),
  }
  if source is None:
    return ours
  out = dict(source)
  for key, value in ours.items():
    old = out.get(key)
    same = old == value or (isinstance(old, int) and value == [old])  # HF writes one eos id as an int
    if not same and not (key == "pad_token_id" and value is None and key not in out):
      out[key] = value
  return out


def save_hf(
  model,
  path: str | Path,
  max_shard_size: str | int = "5GB",
  dtype: str | None = None,
  overwrite: bool = False,
  progress: bool = False,
  source: str | Path | None = None,
) -> Path:
  """Writes a directory `transformers` loads with from_pretrained: Llama4ForCausalLM for a text model,
  Llama4ForConditionalGeneration with `cfg.vision`. Tensors keep their dtypes unless `dtype` is given.
  `source`: the HF directory (or our checkpoint of it) the model came from; its config.json and
  generation_config.json are written back with only what our config changed. Returns the directory."""
  shapes, read_into = model_reader(model)
  return write_hf(
    model.cfg,
    model.decoder.num_cycles,
    shapes,
    read_into,
    path,
    max_shard_size,
    dtype,
    overwrite,
    progress,
    source_configs(source) if source is not None else (None, None),
  )


def source_configs(path: str | Path) -> tuple[dict | None, dict | None]:
  """(config.json, generation_config.json) of an HF directory, or the copies kept beside one of our
  checkpoints (behemoth-convert from-hf, or a train.py run started from one); None where absent."""

  out = []
  for ours, theirs in ((HF_CONFIG, "config.json"), (HF_GENERATION_CONFIG, "generation_config.json")):
    found = find_beside(path, ours)
    if found is None and (Path(path) / theirs).is_file():  # an HF directory itself
      found = Path(path) / theirs
    out.append(json.loads(found.read_text()) if found is not None else None)
  return out[0], out[1]


def write_hf(
  cfg: ModelConfig,
  num_cycles: int,
  leaf_shapes: dict,
  read_into: ReadInto,
  path: str | Path,
  max_shard_size: str | int = "5GB",
  dtype: str | None = None,
  overwrite: bool = False,
  progress: bool = False,
  sources: tuple[dict | None, dict | None] = (None, None),
) -> Path:
  """`save_hf` from any parameter source: `leaf_shapes` {path: (shape, dtype)}, `read_into(path, layer
  index or None, view)` fills a view (e.g. `ParamReader.read_into`, one layer of a checkpoint at a time);
  `sources` the source's (config.json, generation_config.json) dicts, or None each."""
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
  limit = parse_size(max_shard_size)
  plan = hf_plan(cfg, num_cycles, leaf_shapes, dtype)
  shards, size = [[]], 0
  for item in plan:
    nbytes = _nbytes(item)
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  n = len(shards)
  names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  tmp = path.with_name(path.name + ".tmp-export")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  total = sum(map(_nbytes, plan))
  bar = None
  if progress:
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"writing {path.name}")
  tensors = _iter_hf_tensors(cfg, plan, read_into, reuse=True)  # each is written before the next
  # Each shard is fsynced on a thread while the next is written, and the directory is renamed into place
  # only when all are on disk: a power loss never leaves a complete-looking directory of empty files.
  syncer = ThreadPoolExecutor(1, thread_name_prefix="hf-fsync")
  synced = []
  try:
    for fname, shard in zip(names, shards, strict=True):
      write_safetensors(
        tmp / fname,
        ((next(tensors)) for _ in shard),
        [item[:3] for item in shard],
        metadata={"format": "pt"},
        on_bytes=bar.update if bar else None,
      )
      synced.append(syncer.submit(fsync, tmp / fname))
    if n > 1:
      weight_map = {item[0]: fname for fname, shard in zip(names, shards, strict=True) for item in shard}
      (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
      )
    dtypes = {item[2].name for item in plan}
    hf_cfg = export_config(cfg, sources[0], dtypes.pop() if len(dtypes) == 1 else None)
    # As transformers writes them (sorted keys, 2-space indent, final newline).
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    (tmp / "generation_config.json").write_text(
      json.dumps(generation_config(cfg, sources[1]), indent=2, sort_keys=True) + "\n"
    )
    for f in [*(tmp / n for n in os.listdir(tmp) if not n.endswith(".safetensors")), tmp]:
      synced.append(syncer.submit(fsync, f))
    for done in synced:
      done.result()
  except BaseException:
    tensors.close()  # waits for the tensor being built on the other thread
    syncer.shutdown(wait=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    syncer.shutdown(wait=True)
    if bar is not None:
      bar.close()
  if path.exists():
    shutil.rmtree(path)
  os.replace(tmp, path)
  fsync(path.parent)  # the rename itself
  return path


def fsync(path: Path) -> None:
  """Flushes a file's (or a directory's entries') data to the disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
