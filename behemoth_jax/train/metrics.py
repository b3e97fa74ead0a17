"""Metrics: one JSON line per step (metrics.jsonl) and TensorBoard event files (tensorboardX)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


class MetricsWriter:
  def __init__(self, out_dir: Path, enabled: bool = True):
    self.enabled = enabled
    self.last: dict = {}
    if enabled:
      out_dir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(out_dir / "metrics.jsonl", "a")
      # Imported here, by the writing process only: tensorboardX imports torch when it is installed
      # (1.2 s of every process start, measured), and only the lead process writes events.
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(out_dir / "tensorboard"))

  def log(self, step: int, metrics: dict, *, seconds: float, tokens: int, flops: float, peak: float) -> dict:
    """Converts step metrics to Python numbers (this waits for the step), adds rates, writes them."""
    record = {"step": step}
    for k, v in metrics.items():
      v = np.asarray(jax.device_get(v))
      record[k] = v.tolist() if v.ndim else float(v)
    record["tokens_per_s"] = tokens / max(seconds, 1e-9)
    record["mfu"] = flops / max(seconds, 1e-9) / peak
    self.last = record
    if self.enabled:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
      for k, v in record.items():
        if isinstance(v, list):
          for i, x in enumerate(v):
            self._tb.add_scalar(f"{k}/moe_layer_{i}", x, step)
        elif k != "step":
          self._tb.add_scalar(k, v, step)
    return record

  def log_eval(self, step: int, heldout_loss: float) -> None:
    if self.enabled:
      self._jsonl.write(json.dumps({"step": step, "heldout_loss": heldout_loss}) + "\n")
      self._tb.add_scalar("heldout_loss", heldout_loss, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """This host's float32 matmul FLOP/s (all cores, one device): the MFU denominator on CPU."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best
