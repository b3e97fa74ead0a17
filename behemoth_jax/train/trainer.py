"""The training run: set-up, the step loop, the finish (evaluation and summary), as one small class.

`python train.py` is its command line. A run directory (`train.out_dir`) holds orbax checkpoints,
metrics.jsonl, TensorBoard events, the run's config.yaml and summary.json; running again with the same
directory resumes from the latest complete checkpoint, on whatever mesh the config now asks for.
SIGTERM saves a checkpoint and ends the run with status 0.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from behemoth_jax.config import Config, ConfigError, to_dict
from behemoth_jax.data import load_tokenizer, make_iterator
from behemoth_jax.data.multimodal import MMSource, make_mm_iterator
from behemoth_jax.train.batch import to_global
from behemoth_jax.train.checkpoint import (
  CONFIG_NAME,
  Checkpointer,
  carry_source_configs,
  params_dir,
  restore_params,
)
from behemoth_jax.train.evaluation import caption_accuracy
from behemoth_jax.train.metrics import MetricsWriter, measure_cpu_peak_flops
from behemoth_jax.train.peers import join
from behemoth_jax.train.state import (
  abstract_train_state,
  make_init,
  restore_model_params,
  teacher_model_config,
)
from behemoth_jax.train.step import (
  analytic_train_flops,
  make_eval_step,
  make_optimizer,
  make_schedule,
  make_train_step,
  peak_flops_per_device,
)
from sharding.api import per_device_bytes, use_mesh
from sharding.mesh import make_mesh


class NonFinite(RuntimeError):
  """train.on_nonfinite=halt and a step's loss or gradient norm was NaN/Inf."""


@dataclass(frozen=True)
class RunOptions:
  """What the command line adds to the config."""

  config_path: str = "configs/tiny.yaml"  # for messages
  stop_after: int | None = None  # stop at this step of the schedule, with a checkpoint
  profile: tuple[int, int] | None = None  # profiler trace of steps [start, end)
  coordinator: str | None = None  # multi-process: jax.distributed coordinator host:port
  num_processes: int = 1
  process_id: int = 0
  peer_timeout: float = 30.0  # multi-process: seconds without a peer's heartbeat before exiting (peers.py)


class Trainer:
  """`run()` = `setup()`, `loop()`, `finish()`; whatever way it ends, `close()` stops the data
  iterator's threads and lets a pending checkpoint write finish, so an error is its one line."""

  def __init__(self, cfg: Config, options: RunOptions = RunOptions()):
    self.cfg, self.options = cfg, options
    self.out = Path(cfg.train.out_dir)
    self._closers = []
    self.peers = None

  def run(self) -> int:
    try:
      self.setup()
      if self.loop():
        self.finish()
    except BaseException as e:
      if self.peers is not None:  # a lost peer is named; else the others are told of this failure
        self.peers.failed(e)
      raise
    finally:
      self.close()
    if self.peers is not None:
      self.peers.stop("done")
    return 0

  # --- set-up --------------------------------------------------------------------------------------
  def setup(self) -> None:
    """Processes, data, mesh, optimizer, state (restored, or created on its shards), teacher, step."""
    cfg, o = self.cfg, self.options
    mc, tc, dc = cfg.model, cfg.train, cfg.data
    if mc.weight_quant != "none":
      raise ConfigError(
        f"model.weight_quant: {mc.weight_quant} weights are for a frozen teacher (distill.teacher_dtype) or "
        "generation; the trained model keeps model.param_dtype"
      )
    if o.coordinator:
      self.peers = join(o.coordinator, o.num_processes, o.process_id, o.peer_timeout)
    self.lead = jax.process_index() == 0
    self.tokenizer = load_tokenizer(dc.tokenizer)
    if self.tokenizer.vocab_size > mc.vocab_size:
      raise ConfigError(
        f"model.vocab_size: {mc.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size}"
      )
    nproc = jax.process_count()
    if tc.batch_size % nproc:
      raise ConfigError(f"train.batch_size: {tc.batch_size} not divisible by {nproc} processes")
    self.mesh = make_mesh(cfg.parallel)
    for what, path in (("train.init_from", tc.init_from), ("distill.teacher", cfg.distill.teacher)):
      if path:  # checked before anything is written or compiled
        try:
          params_dir(path, what)
        except FileNotFoundError as e:
          raise ConfigError(str(e)) from None
    self.data_args = dict(
      seq_len=tc.seq_len,
      batch_size=tc.batch_size // nproc,
      seed=dc.shuffle_seed,
      process_index=jax.process_index(),
      process_count=nproc,
    )
    self.train_iter = data_iterator(cfg, self.tokenizer, "train", self.data_args)  # bad data fails here
    self._closers.append(self.train_iter.close)
    tx, schedule = make_optimizer(tc), make_schedule(tc)
    self.graphdef, abstract = abstract_train_state(cfg, self.mesh, tx)
    self.ckpt = Checkpointer(
      self.out / "checkpoints", every=tc.checkpoint_every, keep=tc.keep_checkpoints, use_async=tc.async_checkpoints
    )
    self._closers.append(self.ckpt.close)
    self.writer = MetricsWriter(self.out, enabled=self.lead)
    self._closers.append(self.writer.close)
    check_optimizer_layout(self.out, tc)
    self.stop_signal = None
    if self.peers is None:  # many processes: jax's preemption sync manager handles SIGTERM (loop)
      signal.signal(signal.SIGTERM, lambda signum, _: setattr(self, "stop_signal", signum))
    with use_mesh(self.mesh):
      self.state = self._initial_state(abstract, tx)
      distill, self.teacher_params = load_teacher(cfg, self.mesh, self.lead)
    # The run's config, for generation and export (behemoth-convert to-hf) of its checkpoints; written
    # after the restore, so that a refused resume leaves the one its checkpoints were written with.
    if self.lead:
      self.out.mkdir(parents=True, exist_ok=True)
      (self.out / CONFIG_NAME).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
      if tc.init_from:  # the HF configs of a converted checkpoint travel with the run, for its export
        carry_source_configs(tc.init_from, self.out)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    self.step_fn = jax.jit(
      make_train_step(self.graphdef, tx, tc, schedule, distill), donate_argnums=0, out_shardings=(shardings, None)
    )
    self.tokens_per_step = tc.batch_size * tc.seq_len
    self.flops_per_step = analytic_train_flops(mc, tc.batch_size, tc.seq_len)
    peak = peak_flops_per_device()
    self.peak = peak * jax.device_count() if peak else measure_cpu_peak_flops()
    self.skipped = int(self.state["skipped"])
    self.first_loss = None
    if self.lead:
      n = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract["params"]))
      print(
        f"training {o.config_path}: {n:,} parameters on mesh {dict(self.mesh.shape)}, "
        f"{tc.steps} steps of {self.tokens_per_step:,} tokens; run directory {self.out.absolute()}"
      )

  def _initial_state(self, abstract, tx):
    cfg, tc = self.cfg, self.cfg.train
    warn = lambda m: self.lead and print(m, file=sys.stderr)  # noqa: E731
    state, latest = self.ckpt.restore_latest(abstract, self.train_iter, warn=warn)
    if latest is not None:
      if self.lead:
        print(f"resumed from {self.ckpt.directory / str(latest)} (step {latest}) on mesh {dict(self.mesh.shape)}")
      return state
    state = make_init(cfg, tx, jax.tree.map(lambda a: a.sharding, abstract["params"]), self.mesh)()
    if tc.init_from:
      try:
        state["params"] = restore_params(tc.init_from, abstract["params"])
      except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
      if self.lead:
        print(f"initial parameters from {tc.init_from}")
    return state

  # --- the loop ------------------------------------------------------------------------------------
  def loop(self) -> bool:
    """Steps until the schedule ends (or --stop-after); False when a signal stopped the run (its
    checkpoint saved). Metrics of step t-1 are fetched while step t runs."""
    tc, profile = self.cfg.train, self.options.profile
    first = int(self.state["step"])
    last = min(tc.steps, self.options.stop_after or tc.steps)
    bar = tqdm(
      range(first, last), initial=first, total=tc.steps, unit="step", disable=not self.lead, dynamic_ncols=True
    )
    self._pending, self._t_last = None, time.perf_counter()
    with use_mesh(self.mesh):
      for step in bar:
        if profile and step == profile[0]:
          jax.profiler.start_trace(str(self.out / "profile"))
        batch = to_global(next(self.train_iter), self.mesh)
        self.state, metrics = self.step_fn(self.state, batch, self.teacher_params)
        if self._pending is not None:
          record = self._log_pending()
          bar.set_postfix(
            loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", mfu=f"{record['mfu']:.1%}"
          )
        self._pending = (step + 1, metrics)
        if profile and step + 1 == profile[1]:
          jax.profiler.stop_trace()
        self.ckpt.save(step + 1, self.state, self.train_iter)
        if self._preempted(step + 1):
          self._log_pending()  # the saved step's metrics (they were left out before)
          self.ckpt.save(step + 1, self.state, self.train_iter, force=True)
          self.ckpt.close()
          if self.lead:
            print(f"received {self.stop_signal}: saved step {step + 1} to {self.ckpt.directory}; exiting")
          return False
      if self._pending is not None:
        self._log_pending()
        self.ckpt.save(int(self.state["step"]), self.state, self.train_iter, force=True)
    self.ckpt.close()
    self.train_iter.close()  # stop its prefetch threads before evaluation starts its own
    return True

  def _preempted(self, step: int) -> bool:
    """SIGTERM received: by this process, or (many processes) by any, all agreeing on `step`."""
    if self.peers is not None and multihost_utils.reached_preemption_sync_point(step):
      self.stop_signal = "a preemption notice (SIGTERM) in one of the processes"
    elif self.stop_signal is not None and not isinstance(self.stop_signal, str):
      self.stop_signal = f"signal {self.stop_signal}"
    return self.stop_signal is not None

  def _log_pending(self) -> dict:
    now = time.perf_counter()
    record = self.writer.log(
      self._pending[0],
      self._pending[1],
      seconds=now - self._t_last,
      tokens=self.tokens_per_step,
      flops=self.flops_per_step,
      peak=self.peak,
    )
    self._t_last = now
    self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
    self._check_finite(record)
    return record

  def _check_finite(self, record: dict) -> None:
    """Reports a skipped (non-finite) update; halts by train.on_nonfinite."""
    if record["skipped"] <= self.skipped:
      return
    self.skipped = int(record["skipped"])
    what = (
      f"step {record['step']}: non-finite loss or gradients (loss {record['loss']}, "
      f"grad_norm {record['grad_norm']}); the update was skipped ({self.skipped} so far)"
    )
    hint = "lower train.learning_rate, raise train.warmup_steps, or check the data of this step"
    if self.cfg.train.on_nonfinite == "halt":
      self.ckpt.close()
      raise NonFinite(
        f"{what}; halting (train.on_nonfinite=halt): {hint}; latest checkpoint: step {self.ckpt.latest_step()}"
      )
    if self.lead:
      tqdm.write(f"warning: {what}. Hint: {hint}", file=sys.stderr)

  # --- the finish ----------------------------------------------------------------------------------
  def finish(self) -> dict:
    """Held-out loss (and caption accuracy for the built-in multimodal data); summary.json."""
    cfg = self.cfg
    accuracy = None
    with use_mesh(self.mesh):
      held = evaluate(cfg, self.graphdef, self.state["params"], self.tokenizer, self.mesh, self.data_args)
      self.writer.log_eval(int(self.state["step"]), held)
      if cfg.model.vision is not None and cfg.data.source == "builtin_shapes":
        source = MMSource(cfg.data, cfg.model.vision, self.tokenizer)
        accuracy = caption_accuracy(self.graphdef, self.state["params"], source, cfg.data.heldout_fraction)
    self.writer.close()
    last = self.writer.last.get("loss")
    summary = {
      "first_loss": self.first_loss,
      "final_loss": last,
      "heldout_loss": held,
      "skipped_updates": self.skipped,
      "checkpoints": str(self.ckpt.directory),
    }
    if accuracy is not None:
      summary["caption_accuracy"] = accuracy
    if self.lead:
      (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
      if self.first_loss is not None and last is not None:
        print(f"loss {self.first_loss:.3f} → {last:.3f} ({last / self.first_loss:.0%} of the first step); ", end="")
      print(f"held-out loss {held:.3f}; checkpoints in {self.ckpt.directory}")
      if accuracy is not None:
        words = ", ".join(f"{k} {accuracy[k]:.0%}" for k in ("colour", "shape", "direction") if k in accuracy)
        print(
          f"held-out caption accuracy ({accuracy['examples']} images and clips, {accuracy['clips']} clips): "
          f"{words} (chance: colour 17%, shape 25%, direction 25%)"
        )
    return summary

  def close(self) -> None:
    for close in reversed(self._closers):
      try:
        close()
      except Exception:  # already failing: the first error is the one reported
        pass
    self._closers = []


def load_teacher(cfg: Config, mesh, lead: bool):
  """(distill spec, teacher parameters placed by their own sharding rules) or (None, None)."""
  dc = cfg.distill
  if dc.topk:
    if lead:
      print(
        f"distilling from offline top-{dc.topk} targets in {cfg.data.source}: weight {dc.weight}, "
        f"alpha {dc.alpha}, temperature {dc.temperature}"
      )
    return (dc, None), None
  if not dc.teacher:
    if dc.teacher_config or dc.teacher_dtype != "auto":
      what = "distill.teacher_config" if dc.teacher_config else "distill.teacher_dtype"
      raise ConfigError(
        f"{what}: set without distill.teacher (the teacher's checkpoint); only --compile-topology "
        "compiles a distillation step from the teacher's config alone"
      )
    return None, None
  tcfg = teacher_model_config(cfg)
  try:
    graphdef, params = restore_model_params(dc.teacher, tcfg, mesh, what="distill.teacher")
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  if lead:
    held = tcfg.weight_quant if tcfg.weight_quant != "none" else tcfg.param_dtype
    # The model's parameters: every leaf but the per-channel scales of quantized weights.
    n = sum(v.get_value().size for k, v in nnx.to_flat_state(params) if k[-1] != "scale")
    print(
      f"distilling from {dc.teacher} ({n:,} parameters, frozen, held as {held}: "
      f"{per_device_bytes(params) / 2**30:.2f} GiB per device): "
      f"weight {dc.weight}, alpha {dc.alpha}, temperature {dc.temperature}"
    )
  return (dc, graphdef), params


def data_iterator(cfg: Config, tokenizer, split: str, data_args: dict):
  """The text pipeline, or the multimodal one when the model has a vision encoder."""
  if cfg.model.vision is not None:
    return make_mm_iterator(
      cfg.data, cfg.model.vision, tokenizer, split=split, vocab_size=cfg.model.vocab_size, **data_args
    )
  return make_iterator(cfg.data, tokenizer, split=split, teacher_topk=cfg.distill.topk, **data_args)


def evaluate(cfg: Config, graphdef, params, tokenizer, mesh, data_args: dict) -> float:
  """Mean token loss over `train.eval_batches` held-out batches."""
  it = data_iterator(cfg, tokenizer, "heldout", data_args)
  eval_step = jax.jit(make_eval_step(graphdef, cfg.train))
  nll = tokens = 0.0
  try:
    for _ in range(cfg.train.eval_batches):
      a, b = eval_step(params, to_global(next(it), mesh))
      nll, tokens = nll + float(a), tokens + float(b)
  finally:
    it.close()
  return nll / max(tokens, 1.0)


# Settings that change the optimizer state's layout: a run resumes only with the values it was saved with.
OPTIMIZER_LAYOUT = ("adam_moments", "layerwise_update")


def check_optimizer_layout(out: Path, tc) -> None:
  """One-line ConfigError when `out` holds checkpoints written with another optimizer-state layout
  (orbax would only say that the tree structures differ), from the run's saved config.yaml."""
  saved = out / CONFIG_NAME
  if not saved.is_file() or not any((out / "checkpoints").glob("[0-9]*")):
    return
  was = (yaml.safe_load(saved.read_text()) or {}).get("train", {})
  defaults = type(tc)()
  for name in OPTIMIZER_LAYOUT:
    old, new = (str(v).lower() for v in (was.get(name, getattr(defaults, name)), getattr(tc, name)))
    if old != new:
      raise ConfigError(
        f"train.{name}: {new}, but the checkpoints in {out / 'checkpoints'} were written with {old} (another "
        f"optimizer state layout): resume with {old} or use another train.out_dir"
      )
