"""behemoth-convert: Hugging Face (PyTorch safetensors) checkpoints to and from behemoth-jax checkpoints.

  behemoth-convert from-hf HF_DIR OUT_DIR [--dtype auto|bfloat16|float32|float16] [--compress]
      → OUT_DIR/state (orbax: parameters, one leaf per layer, written leaf by leaf, each in its
        source dtype unless --dtype converts) + OUT_DIR/config.yaml + the source's config.json and
        generation_config.json (as hf_config.json, hf_generation_config.json); train.py loads it with
        train.init_from=OUT_DIR (re-stacked for its scanned layers and placed on its mesh),
        generation with --ckpt OUT_DIR.
  behemoth-convert to-hf CKPT OUT_DIR [--config C.yaml] [--max-shard-size 5GB] [--dtype bfloat16]
      CKPT: a from-hf output, a train.py run directory (its latest step; optimizer state is left
      behind) or a step directory. The config is read from --config or the config.yaml beside CKPT.
      → config.json, generation_config.json, model-000NN-of-000MM.safetensors (+ index), loadable by
        transformers: Llama4ForCausalLM (text) or Llama4ForConditionalGeneration (with vision).
        Tensors keep the checkpoint's dtypes unless --dtype converts; the source's config.json (kept
        by from-hf) is written back with only what our config changed, or ours if there is none.
Both write to a temporary directory renamed at the end; an existing OUT_DIR needs --overwrite.
Errors are one line naming the tensor, field or file, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import yaml
from flax import nnx

from behemoth_jax.cli import ArgumentParser
from behemoth_jax.config import Config, ConfigError, load_config, to_dict
from behemoth_jax.convert.export import fsync, source_configs, write_hf
from behemoth_jax.convert.hf import ConversionError
from behemoth_jax.convert.to_checkpoint import convert_hf_to_checkpoint
from behemoth_jax.model.transformer import create_model
from behemoth_jax.train.checkpoint import (
  CONFIG_NAME,
  CheckpointError,
  ParamReader,
  find_config,
  params_dir,
  shape_mismatch,
)
from sharding.mesh import ShardingError


def _check_out(out: Path, overwrite: bool) -> None:
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")


def from_hf(args) -> str:

  out = Path(args.out_dir)
  _check_out(out, args.overwrite)
  tmp = out.with_name(out.name + ".tmp-convert")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    cfg = convert_hf_to_checkpoint(args.hf_dir, tmp, dtype=args.dtype, progress=True, compress=args.compress)
    (tmp / CONFIG_NAME).write_text(yaml.safe_dump(to_dict(Config(model=cfg)), sort_keys=False))
    for name in os.listdir(tmp):  # orbax fsynced its own files; ours and the directory before the rename
      if not (tmp / name).is_dir():
        fsync(tmp / name)
    fsync(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if out.exists():
    shutil.rmtree(out)
  os.replace(tmp, out)
  fsync(out.parent)
  return f"wrote {out} (parameters, one leaf per layer, + {CONFIG_NAME}); train with train.init_from={out}"


def to_hf(args) -> str:

  out = Path(args.out_dir)
  _check_out(out, args.overwrite)
  config = args.config or find_config(args.ckpt)
  if config is None:
    raise FileNotFoundError(f"{args.ckpt}: no config.yaml beside the checkpoint; pass --config")
  cfg = load_config(config).model
  path = params_dir(args.ckpt, what="CKPT")
  abstract = nnx.eval_shape(lambda: create_model(cfg))
  reader = ParamReader(path)
  shapes = {}
  for key, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    want = tuple(var.get_value().shape)
    got = reader.shape(key)
    if got != want:
      raise shape_mismatch("CKPT", path, key, got, want)
    shapes[key] = (want, reader.dtype(key))  # as the checkpoint holds it (from-hf keeps the source's)
  # One layer read at a time, straight into the HF tensor being built (convert/export.py): host memory
  # is about two HF tensors whether the checkpoint's layers are stacked (train.py) or not (from-hf).
  write_hf(
    cfg,
    abstract.decoder.num_cycles,
    shapes,
    reader.start_read,
    out,
    max_shard_size=args.max_shard_size,
    dtype=args.dtype,
    overwrite=args.overwrite,
    progress=True,
    sources=source_configs(args.ckpt),
  )
  arch = "Llama4ForConditionalGeneration" if cfg.vision is not None else "Llama4ForCausalLM"
  return f"wrote {out} ({arch}); load with transformers {arch}.from_pretrained({str(out)!r})"


def main(argv: list[str] | None = None) -> int:
  p = ArgumentParser(
    prog="behemoth-convert",
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[1:]),
  )
  sub = p.add_subparsers(dest="command", required=True)
  a = sub.add_parser("from-hf", help="Hugging Face directory → orbax checkpoint + config.yaml")
  a.add_argument("hf_dir")
  a.add_argument("out_dir")
  a.add_argument(
    "--dtype",
    default="auto",
    choices=("auto", "bfloat16", "float32", "float16"),
    help="parameter dtype (default: %(default)s = each tensor's dtype in the source)",
  )
  a.add_argument(
    "--compress",
    action="store_true",
    help="zstd-compress the arrays (~23%% smaller for bf16 weights; slower to write and read on few cores)",
  )
  a.add_argument("--overwrite", action="store_true")
  b = sub.add_parser("to-hf", help="our checkpoint → Hugging Face directory (safetensors shards)")
  b.add_argument("ckpt")
  b.add_argument("out_dir")
  b.add_argument("--config", help="our YAML config (default: the config.yaml beside CKPT)")
  b.add_argument("--max-shard-size", default="5GB", help="per safetensors file (default: %(default)s)")
  b.add_argument(
    "--dtype",
    choices=("bfloat16", "float32", "float16"),
    help="tensor dtype (default: each parameter's dtype in the checkpoint)",
  )
  b.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  try:
    message = from_hf(args) if args.command == "from-hf" else to_hf(args)
  except (
    ConversionError,
    CheckpointError,
    ConfigError,
    ShardingError,
    FileExistsError,
    FileNotFoundError,
    ValueError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{message} [{time.perf_counter() - t0:.1f}s]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
