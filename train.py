"""Train a Llama 4 model: `python train.py [--config configs/tiny.yaml] [section.key=value ...]`.

With no arguments it trains the tiny config on the built-in corpus (Python's own pydoc topics,
byte-level tokens) on CPU over 8 fake devices (fsdp 4 × expert 2), then reports a held-out loss.
The run directory (`train.out_dir`) holds orbax checkpoints, TensorBoard events and metrics.jsonl;
starting again with the same directory resumes from the latest complete checkpoint, on whatever
mesh the config now asks for. SIGTERM saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from behemoth_jax.cli import ArgumentParser
from behemoth_jax.config import ConfigError, load_config
from behemoth_jax.hostmem import keep_freed_memory


def _fake_cpu_devices(count: int) -> None:
  """Before jax starts its backends: give the CPU `count` devices (harmless on TPU/GPU hosts)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


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
  p.add_argument("--stop-after", type=int, metavar="STEP",
                 help="stop at this step of the schedule with a checkpoint (time-boxed jobs); resume later")
  p.add_argument("--profile", metavar="START:END", type=_step_range,
                 help="write a jax profiler trace for steps [START, END)")
  p.add_argument("--coordinator", help="multi-process: coordinator address host:port (jax.distributed)")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--local-devices", type=int, default=None, help="CPU only: fake devices in this process")
  p.add_argument("--compile-topology", metavar="SLICE",
                 help="only compile the train step for a TPU slice (v5p-1024, v4-128, v5e-256, v6e-64; needs "
                      "libtpu: pip install -e '.[tpu]') and print per-chip memory and FLOPs; exit 1 if it does not fit")
  p.add_argument("--num-slices", type=int, default=1, help="with --compile-topology: slices joined over DCN "
                 "(parallel.dcn_axis spans them)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  keep_freed_memory()  # before JAX starts its backend threads (behemoth_jax/hostmem.py)
  try:
    cfg = load_config(args.config, args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.compile_topology:  # this process compiles for TPU; it never starts a TPU (or any accelerator) backend
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu's own settings: aot.Topology.devices
  sizes = [getattr(cfg.parallel, a) for a in ("data", "fsdp", "expert", "tensor", "context")]
  _fake_cpu_devices(args.local_devices or (math.prod(sizes) if -1 not in sizes else 8))
  from behemoth_jax.checkpoint import CheckpointError
  from behemoth_jax.data import DataError
  from sharding.mesh import ShardingError
  out = Path(cfg.train.out_dir)
  fresh = not out.exists()
  try:
    if args.compile_topology:
      return compile_only(cfg, args)
    return run(cfg, args)
  except (ConfigError, DataError, ShardingError, CheckpointError, NonFinite) as e:
    print(f"error: {e}", file=sys.stderr)
    if fresh and args.process_id == 0 and not any(p.name.isdigit() for p in out.glob("checkpoints/*")):
      shutil.rmtree(out, ignore_errors=True)  # this run created it and saved nothing: leave nothing behind
    return 3 if isinstance(e, NonFinite) else 1 if isinstance(e, CheckpointError) else 2


class NonFinite(RuntimeError):
  """train.on_nonfinite=halt and a step's loss or gradient norm was NaN/Inf."""


def run(cfg, args) -> int:
  """Trains; whatever way it ends, the data iterator's threads and the checkpointer are closed (a
  pending write finishes), so an error exits with its one line and no teardown noise."""
  closers = []
  try:
    return _run(cfg, args, closers)
  finally:
    for close in reversed(closers):
      try:
        close()
      except Exception:  # already failing: the first error is the one reported
        pass


def _run(cfg, args, closers: list) -> int:
  import jax
  from jax.sharding import NamedSharding
  from tqdm import tqdm

  import yaml

  from behemoth_jax.checkpoint import CONFIG_NAME, Checkpointer, params_dir, restore_params
  from behemoth_jax.config import to_dict
  from behemoth_jax.convert.hf import carry_source_configs
  from behemoth_jax.data import load_tokenizer
  from behemoth_jax.metrics import MetricsWriter, measure_cpu_peak_flops
  from behemoth_jax.training import (analytic_train_flops, make_init, make_optimizer,
                                     make_schedule, make_train_step, peak_flops_per_device, state_shardings)
  from sharding import axes as ax
  from sharding.api import logical_to_spec, use_mesh
  from sharding.mesh import make_mesh

  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
  mc, tc, dc = cfg.model, cfg.train, cfg.data
  lead = jax.process_index() == 0
  tokenizer = load_tokenizer(dc.tokenizer)
  if tokenizer.vocab_size > mc.vocab_size:
    raise ConfigError(f"model.vocab_size: {mc.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
  nproc = jax.process_count()
  if tc.batch_size % nproc:
    raise ConfigError(f"train.batch_size: {tc.batch_size} not divisible by {nproc} processes")
  mesh = make_mesh(cfg.parallel)
  for what, path in (("train.init_from", tc.init_from), ("distill.teacher", cfg.distill.teacher)):
    if path:  # checked before anything is written or compiled
      try:
        params_dir(path, what)
      except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
  data_args = dict(seq_len=tc.seq_len, batch_size=tc.batch_size // nproc, seed=dc.shuffle_seed,
                   process_index=jax.process_index(), process_count=nproc)
  train_iter = data_iterator(cfg, tokenizer, "train", data_args)  # bad data fails here, before compiling
  closers.append(train_iter.close)
  tx, schedule = make_optimizer(tc), make_schedule(tc)
  graphdef, abstract = state_shardings(cfg, mesh, tx)

  def to_global(batch):
    out = {}
    for k, v in batch.items():
      shape = (v.shape[0] * nproc, *v.shape[1:])
      logical = (ax.BATCH, ax.LENGTH) if v.ndim == 2 else (ax.BATCH,) + (None,) * (v.ndim - 1)
      out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, logical_to_spec(logical, mesh, shape)), v)
    return out
  out = Path(tc.out_dir)
  ckpt = Checkpointer(out / "checkpoints", every=tc.checkpoint_every, keep=tc.keep_checkpoints,
                      use_async=tc.async_checkpoints)
  closers.append(ckpt.close)
  writer = MetricsWriter(out, enabled=lead)
  closers.append(writer.close)
  if lead:  # the run's config, for generation and export (behemoth-convert to-hf) of its checkpoints
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if tc.init_from:  # the HF configs of a converted checkpoint travel with the run, for its export
      carry_source_configs(tc.init_from, out)
  stop = {"signal": None}
  signal.signal(signal.SIGTERM, lambda signum, _: stop.update(signal=signum))

  with use_mesh(mesh):
    state, latest = ckpt.restore_latest(abstract, train_iter, warn=lambda m: lead and print(m, file=sys.stderr))
    if latest is not None:
      if lead:
        print(f"resumed from {ckpt.directory / str(latest)} (step {latest}) on mesh {dict(mesh.shape)}")
    else:
      state = make_init(cfg, tx, jax.tree.map(lambda a: a.sharding, abstract["params"]), mesh)()
      if tc.init_from:
        try:
          state["params"] = restore_params(tc.init_from, abstract["params"])
        except FileNotFoundError as e:
          raise ConfigError(str(e)) from None
        if lead:
          print(f"initial parameters from {tc.init_from}")
    distill, teacher_params = load_teacher(cfg, mesh, lead)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    step_fn = jax.jit(make_train_step(graphdef, tx, tc, schedule, distill), donate_argnums=0,
                      out_shardings=(shardings, None))
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract["params"]))
    tokens_per_step = tc.batch_size * tc.seq_len
    flops_per_step = analytic_train_flops(mc, tc.batch_size, tc.seq_len)
    peak = peak_flops_per_device()
    peak = peak * jax.device_count() if peak else measure_cpu_peak_flops()
    first = int(state["step"])
    if lead:
      print(f"training {args.config}: {n_params:,} parameters on mesh {dict(mesh.shape)}, "
            f"{tc.steps} steps of {tokens_per_step:,} tokens; run directory {out.absolute()}")
    profile = args.profile
    last_step = min(tc.steps, args.stop_after or tc.steps)
    bar = tqdm(range(first, last_step), initial=first, total=tc.steps, unit="step", disable=not lead,
               dynamic_ncols=True)
    pending, t_last, first_loss = None, time.perf_counter(), None
    skipped = [int(state["skipped"])]

    def check_finite(record: dict) -> None:
      """Reports a skipped (non-finite) update; halts by train.on_nonfinite."""
      if record["skipped"] <= skipped[0]:
        return
      skipped[0] = int(record["skipped"])
      what = f"step {record['step']}: non-finite loss or gradients (loss {record['loss']}, " \
             f"grad_norm {record['grad_norm']}); the update was skipped ({skipped[0]} so far)"
      hint = "lower train.learning_rate, raise train.warmup_steps, or check the data of this step"
      if tc.on_nonfinite == "halt":
        ckpt.close()
        raise NonFinite(f"{what}; halting (train.on_nonfinite=halt): {hint}; latest checkpoint: step "
                        f"{ckpt.latest_step()}")
      if lead:
        tqdm.write(f"warning: {what}. Hint: {hint}", file=sys.stderr)

    for step in bar:
      if profile and step == profile[0]:
        jax.profiler.start_trace(str(out / "profile"))
      state, metrics = step_fn(state, to_global(next(train_iter)), teacher_params)
      if pending is not None:  # fetch step t-1's metrics while step t runs
        now = time.perf_counter()
        record = writer.log(pending[0], pending[1], seconds=now - t_last, tokens=tokens_per_step,
                            flops=flops_per_step, peak=peak)
        t_last = now
        first_loss = record["loss"] if first_loss is None else first_loss
        check_finite(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                        mfu=f"{record['mfu']:.1%}")
      pending = (step + 1, metrics)
      if profile and step + 1 == profile[1]:
        jax.profiler.stop_trace()
      ckpt.save(step + 1, state, train_iter)
      if stop["signal"] is not None:
        ckpt.save(step + 1, state, train_iter, force=True)
        ckpt.close()
        train_iter.close()
        if lead:
          print(f"received signal {stop['signal']}: saved step {step + 1} to {ckpt.directory}; exiting")
        return 0
    if pending is not None:
      record = writer.log(pending[0], pending[1], seconds=time.perf_counter() - t_last, tokens=tokens_per_step,
                          flops=flops_per_step, peak=peak)
      first_loss = record["loss"] if first_loss is None else first_loss
      check_finite(record)
      ckpt.save(int(state["step"]), state, train_iter, force=True)
    ckpt.close()
    train_iter.close()  # stop its prefetch threads before evaluation starts its own
    held = evaluate(cfg, graphdef, state["params"], tokenizer, to_global, data_args)
    writer.log_eval(int(state["step"]), held)
    accuracy = None
    if mc.vision is not None and dc.source == "builtin_shapes":
      from behemoth_jax.data.multimodal import MMSource
      from behemoth_jax.evaluation import caption_accuracy
      accuracy = caption_accuracy(graphdef, state["params"], MMSource(dc, mc.vision, tokenizer), dc.heldout_fraction)
    writer.close()
    if lead:
      last = writer.last.get("loss")
      summary = {"first_loss": first_loss, "final_loss": last, "heldout_loss": held,
                 "skipped_updates": skipped[0], "checkpoints": str(ckpt.directory)}
      if accuracy is not None:
        summary["caption_accuracy"] = accuracy
      (out / "summary.json").write_text(json.dumps(summary, indent=2))
      if first_loss is not None and last is not None:
        print(f"loss {first_loss:.3f} → {last:.3f} ({last / first_loss:.0%} of the first step); ", end="")
      print(f"held-out loss {held:.3f}; checkpoints in {ckpt.directory}")
      if accuracy is not None:
        words = ", ".join(f"{k} {accuracy[k]:.0%}" for k in ("colour", "shape", "direction") if k in accuracy)
        print(f"held-out caption accuracy ({accuracy['examples']} images and clips, {accuracy['clips']} clips): "
              f"{words} (chance: colour 17%, shape 25%, direction 25%)")
  return 0


def compile_only(cfg, args) -> int:
  """--compile-topology: the train step compiled for a TPU slice on this machine; 0 if it fits."""
  import dataclasses

  import jax

  from behemoth_jax import aot
  from behemoth_jax.params import count_params
  from behemoth_jax.training import analytic_train_flops, make_optimizer, make_schedule, make_train_step, \
      state_shardings
  from sharding.api import use_mesh
  from sharding.mesh import make_mesh

  topo = aot.parse_topology(args.compile_topology, args.num_slices)
  if cfg.distill.teacher or cfg.distill.topk:
    raise ConfigError("--compile-topology: distillation steps are not compiled here (compile the student alone)")
  cfg = aot.for_tpu(cfg)
  if topo.num_slices != cfg.parallel.num_slices:
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, num_slices=topo.num_slices))
  mc, tc = cfg.model, cfg.train
  t0 = time.perf_counter()
  mesh = make_mesh(cfg.parallel, topo.devices)
  print(f"compiling the train step of {args.config} for {topo.describe()}")
  print(f"  mesh {dict((k, v) for k, v in mesh.shape.items())}; batch {tc.batch_size} x {tc.seq_len} tokens "
        f"(grad_accum {tc.grad_accum}); dtypes: params {mc.param_dtype}, compute {mc.dtype}"
        f"{', fp8 matmuls' if mc.fp8 else ''}; remat {mc.remat_policy}; moe {mc.moe_impl}")
  tx, schedule = make_optimizer(tc), make_schedule(tc)
  graphdef, abstract = state_shardings(cfg, mesh, tx)
  step = jax.jit(make_train_step(graphdef, tx, tc, schedule), donate_argnums=0,
                 out_shardings=(jax.tree.map(lambda a: a.sharding, abstract), None))
  with use_mesh(mesh), jax.default_matmul_precision("default"):  # TPU kernels take bf16 operands as bf16
    lowered = step.lower(abstract, aot.train_batch_specs(cfg, mesh))
  mem, reason, _ = aot.compile_report(lowered, topo)
  hbm = topo.chip.hbm_bytes
  state = aot.per_device_bytes(abstract)
  flops = analytic_train_flops(mc, tc.batch_size, tc.seq_len)
  chips = topo.chips * topo.num_slices
  print(f"  parameters {count_params(mc)['total']:,}; train state (params + optimizer) per chip {aot.gib(state)}")
  print(f"  FLOPs per step {flops:.4g} (analytic, 3 x forward), per chip {flops / chips:.4g}; at 100% of the "
        f"bf16 peak ({topo.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s per chip) a step takes "
        f"{flops / chips / topo.chip.peak_bf16_flops:.2f} s, at 50% {2 * flops / chips / topo.chip.peak_bf16_flops:.2f} s")
  if mem is None:
    print(f"  DOES NOT FIT on {topo.chip.device_kind}: {reason} [{time.perf_counter() - t0:.0f}s]")
    return 1
  print(f"  per chip: arguments {aot.gib(mem.arguments)}, outputs {aot.gib(mem.outputs)} "
        f"({aot.gib(mem.aliased)} of them written over donated arguments), temporaries {aot.gib(mem.temporaries)}, "
        f"code {aot.gib(mem.generated_code)}")
  print(f"  peak {aot.gib(mem.total)} of {aot.gib(hbm)} HBM ({mem.total / hbm:.0%}; XLA's live-buffer peak): fits "
        f"[{time.perf_counter() - t0:.0f}s]")
  return 0


def load_teacher(cfg, mesh, lead: bool):
  """(distill spec, teacher parameters placed by their own sharding rules) or (None, None)."""
  import jax

  dc = cfg.distill
  if dc.topk:
    if lead:
      print(f"distilling from offline top-{dc.topk} targets in {cfg.data.source}: weight {dc.weight}, "
            f"alpha {dc.alpha}, temperature {dc.temperature}")
    return (dc, None), None
  if not dc.teacher:
    return None, None
  from behemoth_jax.checkpoint import restore_params
  from sharding.api import abstract_sharded_model

  tcfg = load_config(dc.teacher_config).model if dc.teacher_config else cfg.model
  if tcfg.vocab_size != cfg.model.vocab_size:
    raise ConfigError(f"distill.teacher_config: teacher vocab_size {tcfg.vocab_size} != student's "
                      f"{cfg.model.vocab_size} (distillation compares distributions token by token)")
  graphdef, abstract, _ = abstract_sharded_model(tcfg, mesh)
  try:
    params = restore_params(dc.teacher, abstract, what="distill.teacher")
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  if lead:
    n = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract))
    print(f"distilling from {dc.teacher} ({n:,} parameters, frozen): weight {dc.weight}, alpha {dc.alpha}, "
          f"temperature {dc.temperature}")
  return (dc, graphdef), params


def data_iterator(cfg, tokenizer, split: str, data_args: dict):
  """The text pipeline, or the multimodal one when the model has a vision encoder."""
  if cfg.model.vision is not None:
    from behemoth_jax.data.multimodal import make_mm_iterator
    return make_mm_iterator(cfg.data, cfg.model.vision, tokenizer, split=split, vocab_size=cfg.model.vocab_size,
                            **data_args)
  from behemoth_jax.data import make_iterator
  return make_iterator(cfg.data, tokenizer, split=split, teacher_topk=cfg.distill.topk, **data_args)


def evaluate(cfg, graphdef, params, tokenizer, to_global, data_args) -> float:
  import jax

  from behemoth_jax.training import make_eval_step

  it = data_iterator(cfg, tokenizer, "heldout", data_args)
  eval_step = jax.jit(make_eval_step(graphdef, cfg.train))
  nll = tokens = 0.0
  for _ in range(cfg.train.eval_batches):
    a, b = eval_step(params, to_global(next(it)))
    nll, tokens = nll + float(a), tokens + float(b)
  it.close()
  return nll / max(tokens, 1.0)


if __name__ == "__main__":
  sys.exit(main())
