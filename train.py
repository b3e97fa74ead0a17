"""Train a Llama 4 model: `python train.py [--config configs/tiny.yaml] [section.key=value ...]`.

With no arguments it trains the tiny config on the built-in corpus (Python's own pydoc topics,
byte-level tokens) on CPU over 8 fake devices (fsdp 4 × expert 2), then reports a held-out loss.
The run directory (`train.out_dir`) holds orbax checkpoints, TensorBoard events and metrics.jsonl;
starting again with the same directory resumes from the latest complete checkpoint, on whatever
mesh the config now asks for. SIGTERM saves a checkpoint and exits 0. The run itself is
`behemoth_jax.train.trainer.Trainer`; `--compile-topology` is `behemoth_jax.scale.aot`.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import jax

from behemoth_jax.cli import ArgumentParser
from behemoth_jax.config import ConfigError, load_config
from behemoth_jax.data import DataError
from behemoth_jax.scale import aot
from behemoth_jax.train import supervise
from behemoth_jax.train.checkpoint import CheckpointError
from behemoth_jax.train.hostmem import keep_freed_memory
from behemoth_jax.train.trainer import NonFinite, RunOptions, Trainer
from sharding.mesh import ShardingError
from sharding.rules import MESH_AXES


def use_cpu_devices(count: int) -> None:
  """Before jax starts its backends: give the CPU `count` devices (no effect on TPU/GPU hosts). An
  XLA_FLAGS device count (the test suite's) wins; so do backends already started in this process."""
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # backends already running (train.main called from a live process): keep them
    pass


def _step_range(text: str) -> tuple[int, int]:
  try:
    start, end = (int(x) for x in text.split(":"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected START:END step numbers, got {text!r}") from None
  if not 0 <= start < end:
    raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
  return start, end


def parse_args(argv):
  p = ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/tiny.yaml", help="YAML config (default: %(default)s)")
  p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=50")
  p.add_argument(
    "--stop-after",
    type=int,
    metavar="STEP",
    help="stop at this step of the schedule with a checkpoint (time-boxed jobs); resume later",
  )
  p.add_argument(
    "--profile", metavar="START:END", type=_step_range, help="write a jax profiler trace for steps [START, END)"
  )
  p.add_argument("--coordinator", help="multi-process: coordinator address host:port (jax.distributed)")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument(
    "--peer-timeout",
    type=float,
    default=30.0,
    metavar="SECONDS",
    help="multi-process: exit (status 4, one line naming it) when another process has sent no heartbeat "
    "for this long (default: %(default)s)",
  )
  p.add_argument("--local-devices", type=int, default=None, help="CPU only: fake devices in this process")
  p.add_argument(
    "--compile-topology",
    metavar="SLICE",
    help="only compile the train step for a TPU slice (v5p-1024, v4-128, v5e-256, v6e-64; needs "
    "libtpu: pip install -e '.[tpu]') or a GPU cluster of NODESxGPUS (h100-8x8, h200-32x8; needs "
    "pip install -e '.[gpu-compile]') and print per-device memory and FLOPs; exit 1 if it does not fit",
  )
  p.add_argument(
    "--num-slices",
    type=int,
    default=1,
    help="with --compile-topology: slices joined over DCN (parallel.dcn_axis spans them)",
  )
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.coordinator and not supervise.supervised():  # one of many processes: see train/supervise.py
    return supervise.supervise(
      [os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)], args.process_id, args.num_processes
    )
  keep_freed_memory()  # before jax starts its backend threads (behemoth_jax/train/hostmem.py)
  try:
    cfg = load_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.compile_topology:  # this process compiles for a TPU slice; it starts no accelerator itself
    aot.compile_only_host()
  sizes = [getattr(cfg.parallel, a) for a in MESH_AXES]
  use_cpu_devices(args.local_devices or (math.prod(sizes) if -1 not in sizes else 8))
  out = Path(cfg.train.out_dir)
  fresh = not out.exists()
  try:
    if args.compile_topology:
      return aot.compile_train_step(cfg, args.compile_topology, args.num_slices, name=args.config)
    options = RunOptions(
      config_path=args.config,
      stop_after=args.stop_after,
      profile=args.profile,
      coordinator=args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      peer_timeout=args.peer_timeout,
    )
    return Trainer(cfg, options).run()
  except (ConfigError, DataError, ShardingError, CheckpointError, NonFinite) as e:
    print(f"error: {e}", file=sys.stderr)
    if fresh and args.process_id == 0 and not any(p.name.isdigit() for p in out.glob("checkpoints/*")):
      shutil.rmtree(out, ignore_errors=True)  # this run created it and saved nothing: leave nothing behind
    status = 3 if isinstance(e, NonFinite) else 1 if isinstance(e, CheckpointError) else 2
    if args.coordinator:
      _leave(status, args.process_id)
    return status
  except BaseException:
    if not args.coordinator:
      raise
    traceback.print_exc()  # a bug's traceback, without jax's shutdown barrier waiting on the others
    _leave(1, args.process_id)


def _leave(status: int, process_id: int) -> None:
  """A failed process of many exits without jax's shutdown barrier, which would wait for processes
  that are exiting themselves. Process 0 first gives the others a moment to read its failure
  (peers.py): the coordination service they read it from goes with it."""
  sys.stderr.flush()
  sys.stdout.flush()
  if process_id == 0:
    time.sleep(3)
  os._exit(status)


if __name__ == "__main__":
  sys.exit(main())
