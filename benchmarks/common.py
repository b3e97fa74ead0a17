"""What the side-by-side benchmarks share: the bench-moe workload, thread setup, the matmul peak, timing.

Imported by the scripts in this folder (`python benchmarks/<name>.py` puts it on sys.path).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from behemoth_jax.config import ModelConfig  # noqa: E402
from behemoth_jax.train.hostmem import keep_freed_memory  # noqa: E402

# Before any backend starts: each step's temporaries stay resident instead of being page-faulted back
# in (behemoth_jax/train/hostmem.py). Process-wide, so the PyTorch side of a side-by-side gets it too.
keep_freed_memory()

# The fixed workload of issue 9 (docs/PERFORMANCE.md): every layer MoE (16 routed experts top-1 + a
# shared expert, both 1024 wide), chunk 256 with NoPE/global attention every 4th layer, float32.
BENCH_MOE = ModelConfig(
  vocab_size=8192,
  hidden_size=512,
  num_layers=8,
  num_heads=8,
  num_kv_heads=2,
  head_dim=64,
  intermediate_size=1024,
  intermediate_size_mlp=1024,
  num_experts=16,
  num_experts_per_tok=1,
  moe_layer_step=1,
  attention_chunk_size=256,
  use_qk_norm=True,
  rope_theta=500000.0,
  param_dtype="float32",
  dtype="float32",
  bos_token_id=1,
  eos_token_ids=(2,),
  pad_token_id=0,
  max_position_embeddings=65536,
  # Unscanned layers: on CPU a layer scan slices (copies) the stacked weights and saved activations of
  # every layer (measured: 6.2 s/step scanned and unrolled, 7.0 s rolled, 5.3 s unscanned).
  scan_layers=False,
)


def cores() -> int:
  """CPU cores this process may run on (cgroup/affinity aware)."""
  return len(os.sched_getaffinity(0))


def set_torch_threads(n: int) -> None:
  import torch

  torch.set_num_threads(n)


def hf_model(cfg: ModelConfig, state_dict: dict, attn: str = "sdpa"):
  """transformers' Llama4ForCausalLM (float32) of `cfg` holding `state_dict` (ours, exported)."""
  from transformers import Llama4ForCausalLM, Llama4TextConfig

  from behemoth_jax.convert.hf_config import to_hf_config

  hf_cfg = Llama4TextConfig(**to_hf_config(cfg))
  hf_cfg._attn_implementation = attn
  model = Llama4ForCausalLM(hf_cfg).float()
  missing, unexpected = model.load_state_dict(state_dict, strict=False)
  if unexpected or [m for m in missing if not m.endswith("inv_freq")]:
    raise SystemExit(f"HF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
  return model


def median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
  """(median, all) wall seconds of `fn()` over `repeats` calls; fn must block until its work is done."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def matmul_peak(repeats: int = 5) -> dict[str, float]:
  """This machine's float32 matmul FLOP/s, measured now: JAX (XLA:CPU) and PyTorch on square matmuls,
  best of `repeats` each. The benchmarks divide by the best of all (the machine's, not one library's)."""
  import torch

  from behemoth_jax.train.metrics import measure_cpu_peak_flops

  out = {}
  for n in (1024, 2048):
    out[f"jax {n}"] = measure_cpu_peak_flops(n, repeats)
    t = torch.randn(n, n)
    torch.mm(t, t)
    out[f"torch {n}"] = 2 * n**3 / min(median_seconds(lambda: torch.mm(t, t), repeats)[1])
  return out


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  """Unpacked rows of random tokens: positions 0..T-1, no segments (what HF's forward sees)."""
  import numpy as np

  ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  return {
    "inputs": ids[:, :-1],
    "targets": ids[:, 1:],
    "loss_mask": np.ones((batch, seq), np.float32),
    "positions": None,
    "segment_ids": None,
  }


class CompiledTrainStep:
  """`train.step.make_train_step` (what train.py runs: AdamW, clipping, chunked cross-entropy) on a one-device
  mesh, initialised on its device and compiled ahead of time for `batch`; `run()` does one step and waits."""

  def __init__(self, cfg, batch: dict):
    import jax
    import jax.numpy as jnp

    from behemoth_jax.train.state import abstract_train_state, make_init
    from behemoth_jax.train.step import make_optimizer, make_schedule, make_train_step
    from sharding.api import use_mesh
    from sharding.mesh import make_mesh

    self.mesh = make_mesh(cfg.parallel, jax.devices()[:1])
    tc = cfg.train
    tx = make_optimizer(tc)
    self.graphdef, abstract = abstract_train_state(cfg, self.mesh, tx)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    with use_mesh(self.mesh):
      self.state = make_init(cfg, tx, shardings["params"], self.mesh)()
      self.batch = jax.tree.map(jnp.asarray, batch)
      step = jax.jit(
        make_train_step(self.graphdef, tx, tc, make_schedule(tc)), donate_argnums=0, out_shardings=(shardings, None)
      )
      self.compiled = step.lower(self.state, self.batch).compile()
    self._flops, self.flops_counted = None, ""

  @property
  def flops(self) -> float:
    """Matmul FLOPs of one step, counted in the optimised HLO (`flops_counted` = "compiled"); a program
    with data-dependent loops (the CPU grouped matmul) is counted over one more, profiled step instead
    ("executed"). Both are behemoth_jax.scale.flops."""
    from behemoth_jax.scale.flops import compiled_flops, executed_flops

    if self._flops is None:
      try:
        self._flops, self.flops_counted = compiled_flops(self.compiled), "compiled"
      except ValueError:
        self._flops, self.flops_counted = executed_flops(self.run, self.compiled.as_text()), "executed"
    return self._flops

  def run(self) -> dict:
    import jax

    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics["loss"])
    return metrics

  def warm_up(self, steps: int) -> float:
    """Runs `steps` untimed steps; returns the first one's cross-entropy."""
    first = float(self.run()["ce"])
    for _ in range(steps - 1):
      self.run()
    return first


def fmt_rate(x: float) -> str:
  return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def profile_top(trace_dir: str, hlo_text: str, top: int = 15) -> list[tuple[float, int, str, str]]:
  """The jax profiler's trace (written with create_perfetto_trace=True) summed by XLA op: [(share of
  all op time, count, op, source op_name)], largest first. XLA:CPU records one event per thunk
  (fusion, matmul, loop); names map back to the program's source through the HLO metadata."""
  import collections
  import re

  from behemoth_jax.scale.flops import trace_events

  events = trace_events(trace_dir)
  where, containers = {}, set()
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? (while|conditional|call)\(", line)
    if m:
      containers.add(m.group(1))  # their events span their bodies' events: not counted twice
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]+)\"", line)
    if m:
      where.setdefault(m.group(1), m.group(2))
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get("name", "")
    if name in where and name not in containers:
      total[name] += e.get("dur", 0.0)
      count[name] += 1
  all_ops = sum(total.values()) or 1.0
  return [(v / all_ops, count[k], k, where.get(k, "")) for k, v in total.most_common(top)]
