"""Conversion throughput and peak host memory on a synthetic multi-GB checkpoint.

    python benchmarks/convert.py [--layers 4] [--experts 16] [--scanned-layers 14] [--repeat 2] [--out DIR]

Writes a bfloat16 Llama4ForCausalLM directory (hidden 2048, expert width 4096: each layer's fused
`gate_up_proj` is 512 MiB, the largest tensor) with our streaming safetensors writer, then runs
`behemoth-convert from-hf` and `to-hf` each in its own process and prints wall time, GB/s and the
process's peak RSS against the bound 2 × largest tensor + 1 GiB. The round trip is checked bitwise.
Side by side (unless --no-hf): transformers' own round trip of the same directory, from_pretrained in
bfloat16 then save_pretrained, in its own process. Then `to-hf` of a checkpoint in train.py's layout
(layers stacked for the scan) whose largest stacked parameter is larger than the memory bound itself.
First, this disk's sequential write, read and copy speed, through the page cache and with O_DIRECT (the
physical limit: the faster of the two ways); each row prints its share.
Each step runs `--repeat` times, each from a synced disk with this benchmark's files evicted from the
page cache (input read from the disk); GB/s is from the fastest run, all runs are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Peak RSS from /proc/self/status VmHWM, not getrusage: Linux carries ru_maxrss across fork + exec, so a
# child of a parent holding 15 GiB reported 15 GiB (measured); VmHWM belongs to the exec'd image.
PEAK = "print('PEAK_RSS_KB', next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')))"
CHILD = f"""
import sys
from behemoth_jax.convert.cli import main
rc = main(sys.argv[1:])
{PEAK}
sys.exit(rc)
"""
# The Hugging Face way to do the same round trip: load the checkpoint into torch and save it again.
HF_CHILD = f"""
import sys, torch
from transformers import Llama4ForCausalLM
m = Llama4ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2], max_shard_size="1GB")
{PEAK}
"""


def hf_config(layers: int, experts: int) -> dict:
  return dict(
    model_type="llama4_text",
    architectures=["Llama4ForCausalLM"],
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=4096,
    intermediate_size_mlp=8192,
    num_hidden_layers=layers,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    num_local_experts=experts,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    attention_chunk_size=8192,
    rope_theta=500000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    dtype="bfloat16",
  )


def write_synthetic(path: Path, layers: int, experts: int) -> tuple[int, int]:
  """(total bytes, largest tensor bytes); tensors are produced and written one at a time."""
  from behemoth_jax.convert.export import tensor_groups
  from behemoth_jax.convert.hf_config import from_hf_config
  from behemoth_jax.convert.safetensors_io import write_safetensors
  from behemoth_jax.model.transformer import abstract_model

  cfg_json = hf_config(layers, experts)
  cfg = from_hf_config(cfg_json, param_dtype="bfloat16", dtype="bfloat16", scan_layers=False)
  from flax import nnx

  from behemoth_jax.convert.export import hf_shape

  model = abstract_model(cfg)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  plan = [
    (name, hf_shape(ents, cfg, tuple(flat[ents[0].leaf].get_value().shape), np.float32), np.dtype(ml_dtypes.bfloat16))
    for name, ents in tensor_groups(cfg, model.decoder.num_cycles)
  ]
  rng = np.random.default_rng(0)
  # Tensors tile one 64 MiB block of normal noise: as incompressible as real weights (zstd finds no
  # repeat within its window; a 2 MiB block let orbax's zstd shrink the checkpoint 3.7×, measured).
  noise = (0.02 * rng.standard_normal(32 << 20, np.float32)).astype(ml_dtypes.bfloat16)

  def tensors():
    for i, (name, shape, _) in enumerate(plan):
      n = int(np.prod(shape))
      yield name, np.resize(np.roll(noise, i * 4099), n).reshape(shape)

  path.mkdir(parents=True)
  write_safetensors(path / "model.safetensors", tensors(), plan, metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(cfg_json))
  sizes = [int(np.prod(s)) * 2 for _, s, _ in plan]
  return sum(sizes), max(sizes)


def write_scanned(path: Path, layers: int) -> tuple[int, int, int]:
  """A train.py-layout checkpoint (layers stacked for the scan, saved with train.py's `save_args`) of a
  model whose layers are all alike (cycle length 1: the stacked axis is the layers), so that its largest
  stacked parameter exceeds 2 × the largest HF tensor + 1 GiB. Returns (total bytes, largest HF tensor
  bytes, largest stacked parameter bytes). Built in this process's memory (the export is measured)."""
  import yaml
  from flax import nnx

  from behemoth_jax.config import Config, to_dict
  from behemoth_jax.convert.hf_config import from_hf_config
  from behemoth_jax.model.transformer import abstract_model
  from behemoth_jax.train.checkpoint import CONFIG_NAME, save_params

  cfg_json = {**hf_config(layers, 16), "hidden_size": 1024, "no_rope_layers": [1] * layers}
  cfg = from_hf_config(cfg_json, param_dtype="bfloat16", dtype="bfloat16", scan_layers=True)
  assert cfg.cycle_length == 1 and cfg.num_cycles == layers
  state = nnx.state(abstract_model(cfg), nnx.Param)
  rng = np.random.default_rng(1)
  noise = (0.02 * rng.standard_normal(32 << 20, np.float32)).astype(ml_dtypes.bfloat16)
  flat = dict(nnx.to_flat_state(state))
  for i, (key, var) in enumerate(sorted(flat.items(), key=lambda kv: str(kv[0]))):
    shape = var.get_value().shape
    flat[key] = var.replace(np.resize(np.roll(noise, i * 4099), int(np.prod(shape))).reshape(shape))
  sizes = {k: v.get_value().nbytes for k, v in flat.items()}
  save_params(path, nnx.from_flat_state(flat))
  (path / CONFIG_NAME).write_text(yaml.safe_dump(to_dict(Config(model=cfg)), sort_keys=False))
  largest_hf = 16 * 1024 * 2 * 4096 * 2  # one layer's gate_up_proj [E, D, 2F] in bf16
  return sum(sizes.values()), largest_hf, max(sizes.values())


def _io_speed(directory: Path, nbytes: int, direct: bool) -> tuple[float, float, float]:
  """(write, read, copy) bytes/s: `nbytes` written sequentially and fsynced; read back uncached; copied
  to a second file (read + write + fsync, 64 MiB at a time, as `cp` does). `direct`: with O_DIRECT
  (no page cache: the device's own speed), else through the page cache with the file's pages dropped
  before reading (posix_fadvise DONTNEED; no root needed)."""
  from behemoth_jax.convert.hostcopy import host_buffer

  block = host_buffer(64 << 20)
  block[:] = np.random.default_rng(2).integers(0, 256, block.nbytes, dtype=np.uint8)
  f, g = directory / "disk-speed.bin", directory / "disk-speed-copy.bin"
  extra = os.O_DIRECT if direct else 0
  t0 = time.perf_counter()
  fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | extra)
  try:
    for i in range(nbytes // block.nbytes):
      os.pwrite(fd, block, i * block.nbytes)
    os.fsync(fd)
  finally:
    os.close(fd)
  write = nbytes / (time.perf_counter() - t0)
  fd = os.open(f, os.O_RDONLY | extra)
  try:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    for i in range(nbytes // block.nbytes):
      os.preadv(fd, [block], i * block.nbytes)
    read = nbytes / (time.perf_counter() - t0)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    out = os.open(g, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | extra)
    try:
      for i in range(nbytes // block.nbytes):
        os.preadv(fd, [block], i * block.nbytes)
        os.pwrite(out, block, i * block.nbytes)
      os.fsync(out)
    finally:
      os.close(out)
    copy = nbytes / (time.perf_counter() - t0)
  finally:
    os.close(fd)
    f.unlink()
    g.unlink(missing_ok=True)
  return write, read, copy


def disk_speed(directory: Path, nbytes: int = 2 << 30) -> dict[str, tuple[float, float, float]]:
  """{"buffered": (write, read, copy), "direct": (...)} bytes/s of this disk (`_io_speed`). The
  conversions write around the page cache and drop what they read, so the disk's limit is the faster
  of the two ways, each measured."""
  out = {"buffered": _io_speed(directory, nbytes, direct=False)}
  try:
    out["direct"] = _io_speed(directory, nbytes, direct=True)
  except OSError:  # a file system without O_DIRECT
    pass
  return out


def evict(directory: Path) -> None:
  """Drops this benchmark's files from the page cache (posix_fadvise DONTNEED; no root needed), so that
  every step reads its input from the disk, as a conversion of a real checkpoint (hundreds of GB) does,
  and finds memory free: with the cache full of earlier steps' files, every page a step wrote had to
  be reclaimed first, and the same step measured 8-15 s from run to run."""
  for f in directory.rglob("*"):
    if f.is_file():
      fd = os.open(f, os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def run(args: list[str], out: Path, repeat: int, child: str = CHILD, clean: Path | None = None) -> tuple[list, int]:
  """([seconds of each run], peak RSS): `repeat` runs of one step, each in its own process from a settled
  disk (`os.sync()`: without it a step competed with the writeback of the previous step's output) and an
  evicted page cache; `clean` (the step's output) is removed before each run."""
  times, peak = [], 0
  for _ in range(repeat):
    if clean is not None:
      shutil.rmtree(clean, ignore_errors=True)
    os.sync()
    evict(out)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, cwd=ROOT)
    times.append(time.perf_counter() - t0)
    if proc.returncode:
      raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
    peak = max(peak, kb * 1024)
  return times, peak


def _seconds(times: list[float]) -> str:
  """The fastest run, and every run when there were several (this VM's timings vary ~2x)."""
  best = f"{min(times):.1f}"
  return best if len(times) == 1 else f"{best} ({', '.join(f'{t:.1f}' for t in times)})"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--out", default="/tmp/convert-bench")
  p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the Hugging Face load + save row")
  p.add_argument("--repeat", type=int, default=2, help="runs of each step; GB/s from the fastest (default %(default)s)")
  p.add_argument(
    "--scanned-layers",
    type=int,
    default=14,
    help="layers of the scanned train.py-layout checkpoint exported in its own row (0: skip; default %(default)s)",
  )
  args = p.parse_args(argv)
  out = Path(args.out)
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  speeds = disk_speed(out)
  for way, (w, r, c) in speeds.items():
    print(
      f"disk ({way}): sequential write {w / 1e9:.2f} GB/s (fsynced), read {r / 1e9:.2f} GB/s (uncached), "
      f"copy {c / 1e9:.2f} GB/s (read + write + fsync)"
    )
  write_bps = max(v[0] for v in speeds.values())
  read_bps = max(v[1] for v in speeds.values())
  copy_bps = max(v[2] for v in speeds.values())
  t0 = time.perf_counter()
  total, largest = write_synthetic(out / "hf", args.layers, args.experts)
  print(
    f"synthetic checkpoint: {total / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB "
    f"(written in {time.perf_counter() - t0:.1f}s)"
  )
  bound = 2 * largest + 2**30
  rows = []
  for name, cli, dst in (
    ("from-hf", ["from-hf", str(out / "hf"), str(out / "ours")], out / "ours"),
    ("to-hf", ["to-hf", str(out / "ours"), str(out / "back"), "--max-shard-size", "1GB"], out / "back"),
  ):
    times, peak = run(cli, out, args.repeat, clean=dst)
    rows.append((name, times, total, peak))
  if args.hf:
    times, peak = run([str(out / "hf"), str(out / "hf-resaved")], out, args.repeat, HF_CHILD, out / "hf-resaved")
    rows.append(("HF from_pretrained + save_pretrained (both directions in one)", times, total, peak))
  scanned = None
  if args.scanned_layers:
    s_total, s_largest, s_stacked = write_scanned(out / "scanned", args.scanned_layers)
    cli = ["to-hf", str(out / "scanned"), str(out / "scanned-hf"), "--max-shard-size", "1GB"]
    times, peak = run(cli, out, args.repeat, clean=out / "scanned-hf")
    scanned = (times, peak, 2 * s_largest + 2**30, s_total, s_largest, s_stacked)
  from behemoth_jax.convert.safetensors_io import SafetensorsFile

  a = SafetensorsFile(out / "hf" / "model.safetensors")
  back = {}
  for f in sorted((out / "back").glob("*.safetensors")):
    sf = SafetensorsFile(f)
    back.update({k: (sf, k) for k in sf.keys()})
  same = sorted(a.keys()) == sorted(back) and all(a.get(k).tobytes() == back[k][0].get(k).tobytes() for k in a.keys())
  disk = min(write_bps, read_bps)  # a conversion reads and writes every byte: the slower is its limit
  print(
    "\n| step | seconds | GB/s | share of disk speed | share of disk copy speed | peak RSS "
    "| bound (2 × largest + 1 GiB) |\n"
    "|---|---|---|---|---|---|---|"
  )
  for name, times, nbytes, peak in rows:
    ok = "within" if peak <= bound else "over"
    gbs = nbytes / min(times) / 1e9
    print(
      f"| {name} | {_seconds(times)} | {gbs:.2f} | {gbs * 1e9 / disk:.0%} | {gbs * 1e9 / copy_bps:.0%} | "
      f"{peak / 2**30:.2f} GiB | "
      f"{bound / 2**30:.2f} GiB ({ok}) |"
    )
  scanned_ok = True
  if scanned is not None:
    times, peak, s_bound, s_total, s_largest, s_stacked = scanned
    scanned_ok = peak <= s_bound
    gbs = s_total / min(times) / 1e9
    print(
      f"| to-hf of a scanned train.py checkpoint ({s_total / 2**30:.2f} GiB, largest stacked parameter "
      f"{s_stacked / 2**30:.2f} GiB, largest HF tensor {s_largest / 2**20:.0f} MiB) | {_seconds(times)} | {gbs:.2f} | "
      f"{gbs * 1e9 / disk:.0%} | {gbs * 1e9 / copy_bps:.0%} | {peak / 2**30:.2f} GiB | {s_bound / 2**30:.2f} GiB "
      f"({'within' if scanned_ok else 'over'}) |"
    )
  print(
    f"\ndisk speed used for the shares: {disk / 1e9:.2f} GB/s (the slower of write and read, each the faster of "
    f"buffered and O_DIRECT); copy speed {copy_bps / 1e9:.2f} GB/s (a conversion reads and writes every byte "
    "on this one disk)"
  )
  print(f"round trip bitwise: {same}")
  return 0 if same and scanned_ok and all(r[3] <= bound for r in rows[:2]) else 1


if __name__ == "__main__":
  sys.exit(main())
