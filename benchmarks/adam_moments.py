"""8-bit Adam moments vs today's, side by side: the tiny config's loss curve over 200 steps.

    python benchmarks/adam_moments.py [--steps 200] [--seeds 3] [--out runs/adam_moments] [overrides...]

Trains configs/tiny.yaml on the built-in corpus with `train.adam_moments=auto` (moments in the
parameters' dtype: float32 here) and with `fp8` (e4m3 with a scale per row, train/optim.py), each for
seeds 0..N-1 (same seed, same init and data order for both), plus a control: `auto` with the gradient
clip moved by 0.1% (1.0 → 0.999), which measures how far any small perturbation carries a 200-step
trajectory. Prints the training loss averaged over windows of 20 steps and over seeds, the held-out
loss at the end, each ratio to `auto`, and the optimizer state's bytes per parameter. Also `layerwise`
(`train.layerwise_update`: the optimizer inside the backward scan, its clipping exact) and `lw-previous`
(`train.layerwise_clip=previous`: the previous step's norm where it was below 0.8 × the clip); run with
`model.num_layers=8` so that the tiny model has two scanned cycles. Acceptance (issue 27): fp8
and layerwise each within 1% of auto in every window and in the held-out loss. A finished run directory is
reused (delete it to retrain).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 20


RUNS = {
  "auto": ["train.adam_moments=auto"],
  "fp8": ["train.adam_moments=fp8"],
  "layerwise": ["train.layerwise_update=true"],
  "lw-previous": ["train.layerwise_update=true", "train.layerwise_clip=previous"],
  "control": ["train.grad_clip=0.999"],
}
CHECKED = ("fp8", "layerwise")  # each within 1% of auto


def run(out: Path, steps: int, overrides: list[str]) -> dict:
  """(step → training loss, final held-out loss) of one run, training it unless already finished."""
  metrics = out / "metrics.jsonl"
  if not metrics.exists() or '"heldout_loss"' not in metrics.read_text():
    cmd = [sys.executable, str(ROOT / "train.py"), f"train.out_dir={out}", f"train.steps={steps}"]
    subprocess.run([*cmd, *overrides], check=True, cwd=ROOT)
  rows = [json.loads(line) for line in metrics.read_text().splitlines()]
  evals = [r["heldout_loss"] for r in rows if "heldout_loss" in r]
  return {"loss": {r["step"]: r["loss"] for r in rows if "loss" in r}, "eval": evals[-1] if evals else None}


def state_bytes_per_param(moments: str) -> float:
  """Optimizer state bytes per parameter of the tiny config (abstract: nothing allocated)."""
  from behemoth_jax.config import load_config
  from behemoth_jax.scale.params import count_params
  from behemoth_jax.train.state import abstract_train_state
  from behemoth_jax.train.step import make_optimizer
  from sharding.api import per_device_bytes
  from sharding.mesh import make_mesh

  overrides = ["parallel.fsdp=1", "parallel.expert=1", f"train.adam_moments={moments}"]
  cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
  _, abstract = abstract_train_state(cfg, make_mesh(cfg.parallel), make_optimizer(cfg.train))
  return per_device_bytes(abstract["opt_state"]) / count_params(cfg.model)["total"]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--out", default="runs/adam_moments")
  p.add_argument("overrides", nargs="*", help="section.key=value for every run")
  a = p.parse_args(argv)
  res = {
    name: [
      run(Path(a.out) / f"{name}-{seed}", a.steps, [*extra, f"train.seed={seed}", *a.overrides])
      for seed in range(a.seeds)
    ]
    for name, extra in RUNS.items()
  }

  def mean(name, steps):
    return sum(r["loss"][s] for r in res[name] for s in steps) / (len(steps) * a.seeds)

  others = [name for name in RUNS if name != "auto"]
  worst = dict.fromkeys(others, 0.0)

  def row(label, m):
    for k in worst:
      worst[k] = max(worst[k], abs(m[k] / m["auto"] - 1))
    print(f"{label:>9} {m['auto']:8.4f} " + " ".join(f"{m[k]:8.4f} {m[k] / m['auto']:{len(k) + 6}.4f}" for k in others))

  print(f"{'steps':>9} {'auto':>8} " + " ".join(f"{k:>8} {k + '/auto':>{len(k) + 6}}" for k in others))
  for lo in range(1, a.steps + 1, WINDOW):
    win = range(lo, min(lo + WINDOW, a.steps + 1))
    row(f"{lo:>4}-{win[-1]:<4}", {name: mean(name, win) for name in RUNS})
  row("held-out", {name: sum(r["eval"] for r in res[name]) / a.seeds for name in RUNS})
  for name in RUNS:
    print(f"  held-out by seed, {name}: " + ", ".join(f"{r['eval']:.4f}" for r in res[name]))
  auto, fp8 = state_bytes_per_param("auto"), state_bytes_per_param("fp8")
  print(f"optimizer state bytes per parameter: auto {auto:.3f}, fp8 {fp8:.3f}")
  ok = all(worst[k] <= 0.01 for k in CHECKED)
  verdict = {k: f" ({'within' if worst[k] <= 0.01 else 'OUTSIDE'} 1%)" for k in CHECKED}
  print("largest deviation: " + ", ".join(f"{k} {worst[k]:.2%}{verdict.get(k, '')}" for k in others))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
