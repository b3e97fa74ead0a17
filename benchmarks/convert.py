"""Conversion throughput and peak host memory on a synthetic multi-GB checkpoint.

    python benchmarks/convert.py [--layers 4] [--experts 16] [--out /tmp/convert-bench]

Writes a bfloat16 Llama4ForCausalLM directory (hidden 2048, expert width 4096: each layer's fused
`gate_up_proj` is 512 MiB, the largest tensor) with our streaming safetensors writer, then runs
`behemoth-convert from-hf` and `to-hf` each in its own process and prints wall time, GB/s and the
process's peak RSS against the bound 2 × largest tensor + 1 GiB. The round trip is checked bitwise.
Side by side (unless --no-hf): transformers' own round trip of the same directory, from_pretrained in
bfloat16 then save_pretrained, in its own process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import resource, sys
from behemoth_jax.convert.cli import main
rc = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""
# The Hugging Face way to do the same round trip: load the checkpoint into torch and save it again.
HF_CHILD = """
import resource, sys, torch
from transformers import Llama4ForCausalLM
m = Llama4ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2], max_shard_size="1GB")
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
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
  noise = (0.02 * rng.standard_normal(1 << 20)).astype(ml_dtypes.bfloat16)

  def tensors():
    for name, shape, _ in plan:
      n = int(np.prod(shape))
      yield name, np.resize(noise, n).reshape(shape)  # cheap but not constant: a copy of a random block

  path.mkdir(parents=True)
  write_safetensors(path / "model.safetensors", tensors(), plan, metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(cfg_json))
  sizes = [int(np.prod(s)) * 2 for _, s, _ in plan]
  return sum(sizes), max(sizes)


def run(args: list[str], child: str = CHILD) -> tuple[float, int]:
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, cwd=ROOT)
  seconds = time.perf_counter() - t0
  if out.returncode:
    raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
  peak = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
  return seconds, peak * 1024


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--out", default="/tmp/convert-bench")
  p.add_argument("--no-hf", dest="hf", action="store_false", help="skip the Hugging Face load + save row")
  args = p.parse_args(argv)
  out = Path(args.out)
  shutil.rmtree(out, ignore_errors=True)
  t0 = time.perf_counter()
  total, largest = write_synthetic(out / "hf", args.layers, args.experts)
  print(
    f"synthetic checkpoint: {total / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB "
    f"(written in {time.perf_counter() - t0:.1f}s)"
  )
  bound = 2 * largest + 2**30
  rows = []
  for name, cli in (
    ("from-hf", ["from-hf", str(out / "hf"), str(out / "ours")]),
    ("to-hf", ["to-hf", str(out / "ours"), str(out / "back"), "--max-shard-size", "1GB"]),
  ):
    seconds, peak = run(cli)
    rows.append((name, seconds, total / seconds / 1e9, peak))
  if args.hf:
    seconds, peak = run([str(out / "hf"), str(out / "hf-resaved")], HF_CHILD)
    rows.append(("HF from_pretrained + save_pretrained (both directions in one)", seconds, total / seconds / 1e9, peak))
  from behemoth_jax.convert.safetensors_io import SafetensorsFile

  a = SafetensorsFile(out / "hf" / "model.safetensors")
  back = {}
  for f in sorted((out / "back").glob("*.safetensors")):
    sf = SafetensorsFile(f)
    back.update({k: (sf, k) for k in sf.keys()})
  same = sorted(a.keys()) == sorted(back) and all(a.get(k).tobytes() == back[k][0].get(k).tobytes() for k in a.keys())
  print("\n| step | seconds | GB/s | peak RSS | bound (2 × largest + 1 GiB) |\n|---|---|---|---|---|")
  for name, seconds, gbs, peak in rows:
    ok = "within" if peak <= bound else "over"
    print(f"| {name} | {seconds:.1f} | {gbs:.2f} | {peak / 2**30:.2f} GiB | {bound / 2**30:.2f} GiB ({ok}) |")
  print(f"\nround trip bitwise: {same}")
  return 0 if same and all(r[3] <= bound for r in rows[:2]) else 1


if __name__ == "__main__":
  sys.exit(main())
