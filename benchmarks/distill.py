"""Distillation, side by side: soft-weighting rules across teacher/student regimes and seeds.

    python benchmarks/distill.py [--seeds 3] [--regimes strong,weak,large] [--out runs/distill]

Regimes (teachers: configs/tiny.yaml, 3.87M parameters, on the built-in corpus):
  strong  a trained teacher (400 steps) and a 337K-parameter student (width 64, 2 layers), 150 steps
  weak    an undertrained teacher (60 steps) and the same student, 150 steps
  large   the trained teacher and a larger student (width 128, 2 layers, 8 experts: 2.0M), 300 steps
Weightings, per token loss (1 − w)·CE + w·τ²·KL(teacher ‖ student) at τ = 1:
  none (w = 0), fixed 0.5, fixed 1.0, scheduled (w = 1 − step/steps), dynamic
  (w = 1 − (max_v p_T(v) − p_T(label))) and relative (w = p_T(y) / (p_T(y) + p_S(y))).
Each student runs with seeds 0..N-1 (parameter init and data order; the teacher is fixed per regime).
Prints mean ± sd of the held-out cross-entropy (real labels, nats/token) per regime and weighting and
writes OUT/results.json. A finished run directory is reused (delete it to retrain). Runs share a
persistent compilation cache (.cache/jax-compilation-bench), so seeds after the first do not recompile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
  "model.hidden_size=64",
  "model.num_layers=2",
  "model.num_heads=2",
  "model.num_kv_heads=1",
  "model.head_dim=32",
  "model.intermediate_size=128",
  "model.intermediate_size_mlp=256",
  "model.num_experts=4",
]
LARGE = ["model.num_layers=2", "model.num_experts=8"]  # tiny's width (128), half its depth
MESH = ["parallel.fsdp=4", "parallel.expert=2"]
REGIMES = {  # name: (teacher steps, student overrides, student steps, description)
  "strong": (400, SMALL, 150, "trained teacher (400 steps), 337K student, 150 steps"),
  "weak": (60, SMALL, 150, "undertrained teacher (60 steps), 337K student, 150 steps"),
  "large": (400, LARGE, 300, "trained teacher (400 steps), 2.0M student, 300 steps"),
}
WEIGHTINGS = {
  "none": ["distill.weight=none"],
  "fixed 0.5": ["distill.weight=fixed", "distill.alpha=0.5"],
  "fixed 1.0": ["distill.weight=fixed", "distill.alpha=1.0"],
  "scheduled": ["distill.weight=scheduled", "distill.alpha=1.0"],
  "dynamic": ["distill.weight=dynamic", "distill.alpha=1.0"],
  "relative": ["distill.weight=relative", "distill.alpha=1.0"],
}


def train(out: Path, overrides: list[str]) -> dict:
  summary = out / "summary.json"
  if not summary.is_file():
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", f"train.out_dir={out}", *MESH, *overrides]
    print("$", " ".join(cmd), flush=True)
    env = {
      **os.environ,
      "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".cache" / "jax-compilation-bench"),
      "TQDM_DISABLE": "1",  # 45 progress bars would bury the results
    }
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
  return json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated subset of: " + ", ".join(REGIMES))
  p.add_argument("--out", default="runs/distill")
  args = p.parse_args(argv)
  out = Path(args.out).absolute()
  regimes = args.regimes.split(",")
  unknown = [r for r in regimes if r not in REGIMES]
  if unknown:
    p.error(f"--regimes: unknown {unknown} (known: {', '.join(REGIMES)})")
  results: dict = {}
  for regime in regimes:
    t_steps, student, s_steps, _ = REGIMES[regime]
    teacher = out / f"teacher-{t_steps}"
    t_loss = train(teacher, [f"train.steps={t_steps}"])["heldout_loss"]
    results[regime] = {"teacher": t_loss}
    for name, extra in WEIGHTINGS.items():
      losses = []
      for seed in range(args.seeds):
        teacher_args = [f"distill.teacher={teacher}", "distill.teacher_config=configs/tiny.yaml"]
        teacher_args = [] if name == "none" else teacher_args
        run = out / regime / f"{name.replace(' ', '-')}-seed{seed}"
        seeds = [f"train.seed={seed}", f"data.shuffle_seed={seed}"]
        losses.append(train(run, [*student, f"train.steps={s_steps}", *seeds, *teacher_args, *extra])["heldout_loss"])
        print(f"  {regime} / {name} / seed {seed}: {losses[-1]:.4f}", flush=True)
      results[regime][name] = losses
    (out / "results.json").write_text(json.dumps(results, indent=2))
  print(f"\nheld-out cross-entropy, nats/token, mean ± sd over {args.seeds} seeds (best per regime in bold)\n")
  print("| regime | teacher | " + " | ".join(WEIGHTINGS) + " |")
  print("|---|---|" + "---|" * len(WEIGHTINGS))
  for regime in regimes:
    row = results[regime]
    means = {w: statistics.mean(row[w]) for w in WEIGHTINGS}
    best = min(means, key=means.get)
    cells = []
    for w in WEIGHTINGS:
      sd = statistics.stdev(row[w]) if len(row[w]) > 1 else 0.0
      cell = f"{means[w]:.4f} ± {sd:.4f}"
      cells.append(f"**{cell}**" if w == best else cell)
    print(f"| {regime}: {REGIMES[regime][3]} | {row['teacher']:.4f} | " + " | ".join(cells) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
