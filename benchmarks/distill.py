"""Distillation, side by side: a tiny teacher, then one smaller student trained three ways.

    python benchmarks/distill.py [--teacher-steps 400] [--student-steps 200] [--out runs/distill]

1. teacher: configs/tiny.yaml for --teacher-steps steps on the built-in corpus;
2. the same student (2 layers, width 64, 4 experts) for --student-steps steps with
   (a) hard labels only, (b) a fixed soft weight α = 0.5, (c) the dynamic per-token weight
   w = 1 − (max_v p_teacher(v) − p_teacher(label)) (the default), and for reference α = 1 (soft
   targets only), all at τ = 1, same data order and seed;
3. prints the held-out cross-entropy (hard labels) of each, and writes it to OUT/results.json.
A finished run directory is reused (delete it to retrain).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STUDENT = [
  "model.hidden_size=64",
  "model.num_layers=2",
  "model.num_heads=2",
  "model.num_kv_heads=1",
  "model.head_dim=32",
  "model.intermediate_size=128",
  "model.intermediate_size_mlp=256",
  "model.num_experts=4",
  "parallel.fsdp=4",
  "parallel.expert=2",
]
RUNS = {  # run directory: (table row, overrides)
  "none": ("(a) hard labels only", ["distill.weight=none"]),
  "fixed": ("(b) fixed α = 0.5", ["distill.weight=fixed", "distill.alpha=0.5"]),
  "dynamic": (
    "(c) dynamic w = 1 − (max p_teacher − p_teacher(label)) (default)",
    ["distill.weight=dynamic", "distill.alpha=1.0"],
  ),
  "soft_only": ("reference: fixed α = 1 (soft targets only)", ["distill.weight=fixed", "distill.alpha=1.0"]),
}


def train(out: Path, overrides: list[str]) -> dict:
  summary = out / "summary.json"
  if not summary.is_file():
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", f"train.out_dir={out}", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
  return json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--teacher-steps", type=int, default=400)
  p.add_argument("--student-steps", type=int, default=200)
  p.add_argument("--out", default="runs/distill")
  args = p.parse_args(argv)
  out = Path(args.out)
  teacher = train(out / "teacher", [f"train.steps={args.teacher_steps}"])
  results = {f"teacher ({args.teacher_steps} steps)": teacher["heldout_loss"]}
  for slug, (name, extra) in RUNS.items():
    teacher_args = (
      [] if slug == "none" else [f"distill.teacher={out / 'teacher'}", "distill.teacher_config=configs/tiny.yaml"]
    )
    s = train(out / slug, [*STUDENT, f"train.steps={args.student_steps}", *teacher_args, *extra])
    results[name] = s["heldout_loss"]
    if slug != "none":  # the mean soft weight over the run's logged steps
      rows = [json.loads(x) for x in (out / slug / "metrics.jsonl").read_text().splitlines()]
      weights = [r["soft_weight"] for r in rows if "soft_weight" in r]
      results[name + " — mean w"] = sum(weights) / len(weights)
  (out / "results.json").write_text(json.dumps(results, indent=2))
  print("\n| run | held-out loss (nats/token) | mean soft weight |\n|---|---|---|")
  for name, loss in results.items():
    if not name.endswith("mean w"):
      w = results.get(name + " — mean w")
      print(f"| {name} | {loss:.4f} | {'' if w is None else f'{w:.2f}'} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
