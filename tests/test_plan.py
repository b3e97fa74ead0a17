"""The mesh planner (`python -m behemoth_jax.plan`): the meshes it enumerates, its table and ranking
against the compiled programs' own numbers, the DCN split, and its exits. Compiles the tiny model for
small TPU slices (libtpu)."""

from __future__ import annotations

import re

import pytest

from behemoth_jax.config import load_config
from behemoth_jax.scale import plan


def test_meshes_divide_the_model_and_batch():
  """tiny: 8 experts, 4 heads / 2 KV heads, seq 256, batch 8. On 16 devices no mesh has tensor 4
  (2 KV heads) or data x fsdp x expert 16 (batch 8); all 5-tuples multiplying to 16 that pass are listed."""
  cfg = load_config("configs/tiny.yaml", [])
  got = plan.meshes(cfg, 16)
  assert all(m["tensor"] <= 2 and m["data"] * m["fsdp"] * m["expert"] <= 8 for m in got)
  assert {"data": 1, "fsdp": 2, "expert": 4, "context": 2, "tensor": 1} in got
  assert {"data": 2, "fsdp": 2, "expert": 2, "context": 1, "tensor": 2} in got
  assert {"data": 1, "fsdp": 1, "expert": 16, "context": 1, "tensor": 1} not in got  # 8 experts
  # Independent count: 5-tuples of powers of two with product 16 (70), minus the ones that do not divide.
  tuples = [
    (d, f, e, c, t)
    for d in (1, 2, 4, 8, 16)
    for f in (1, 2, 4, 8, 16)
    for e in (1, 2, 4, 8)
    for c in (1, 2, 4, 8, 16)
    for t in (1, 2)
    if d * f * e * c * t == 16 and 8 % (d * f * e) == 0
  ]
  assert len(got) == len(tuples)


def _run(capsys, argv):
  code = plan.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def _rows(out: str) -> list[list[str]]:
  return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if re.match(r"\| [a-z]\d", line)]


def test_plan_ranks_compiled_meshes_and_ends_with_the_best_overrides(capsys):
  argv = ["--topology", "v5p-8", "--compile", "1", "--also", "fsdp=4", "train.batch_size=4"]
  code, out, err = _run(capsys, argv)
  assert code == 0, err
  rows = _rows(out)
  assert len(rows) == 2 and all(r[3] == "yes" for r in rows) and "d1 f4 e1 c1 t1" in [r[0] for r in rows]
  estimates = [float(r[-1]) for r in rows]
  assert estimates == sorted(estimates)
  for r in rows:  # the estimate is the largest of compute, ICI and DCN seconds
    assert float(r[-1]) == pytest.approx(max(float(r[-4]), float(r[-3]), float(r[-2])), rel=0.01)
  best = dict(re.findall(r"parallel\.(\w+)=(\d+)", out.splitlines()[-1]))
  assert rows[0][0] == " ".join(f"{a[0]}{best[a]}" for a in ("data", "fsdp", "expert", "context", "tensor"))
  assert "compiling 1/2" in err


def test_also_rejects_a_mesh_of_another_size(capsys):
  code, _, err = _run(capsys, ["--topology", "v5p-8", "--also", "fsdp=8", "train.batch_size=8"])
  assert code == 2 and "--also" in err and len(err.strip().splitlines()) == 1


def test_compiled_row_numbers_are_the_programs(monkeypatch):
  """One mesh compiled through the planner: its FLOPs and collective bytes equal what the compiled
  program's HLO gives through scale.flops / scale.collectives, and its seconds follow the roofline."""
  from behemoth_jax.scale import aot
  from behemoth_jax.scale.collectives import bytes_by_kind
  from behemoth_jax.scale.flops import matmuls

  seen = {}
  report = aot.compile_report

  def keep(lowered, topo):
    out = report(lowered, topo)
    seen["hlo"] = out[2].as_text()
    return out

  monkeypatch.setattr(aot, "compile_report", keep)
  cfg = load_config("configs/tiny.yaml", ["train.batch_size=4"])
  topo = aot.parse_topology("v5p-8")
  cfg, teacher = aot.for_target(cfg, topo)
  row = plan.Row({"data": 1, "fsdp": 2, "expert": 2, "context": 1, "tensor": 1}, 0.0, (0.0, 0.0))
  plan.compile_row(row, cfg, teacher, topo)
  assert row.fits and row.flops == sum(m.flops for m in matmuls(seen["hlo"])) > 0
  by_kind = {k: v for k, v in bytes_by_kind(seen["hlo"]).items() if v}
  assert {k: v for (link, k), v in row.links.items()} == by_kind and {link for link, _ in row.links} == {"ICI"}
  assert by_kind["all-to-all"] > 0 and by_kind["all-gather"] > 0  # expert exchange, fsdp gathers
  assert row.seconds["ICI"] == pytest.approx(sum(by_kind.values()) / (600e9 / 3))
  assert row.seconds["compute"] == pytest.approx(row.flops / 459e12)


def test_data_axis_across_slices_moves_its_bytes_over_dcn():
  """Two v5p-8 slices, data 2 over DCN: the gradient reduction between replicas crosses slices."""
  from behemoth_jax.scale import aot

  cfg = load_config("configs/tiny.yaml", ["train.batch_size=4", "parallel.num_slices=2", "parallel.dcn_axis=data"])
  topo = aot.parse_topology("v5p-8", 2)
  cfg, teacher = aot.for_target(cfg, topo)
  row = plan.Row({"data": 2, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}, 0.0, (0.0, 0.0))
  plan.compile_row(row, cfg, teacher, topo)
  dcn = {k: v for (link, k), v in row.links.items() if link == "DCN"}
  ici = {k: v for (link, k), v in row.links.items() if link == "ICI"}
  assert dcn and ici and row.seconds["DCN"] == pytest.approx(sum(dcn.values()) / 6.25e9)
  assert "all-gather" in ici  # fsdp's gathers stay inside a slice


def test_nothing_fits_exits_1_with_one_line(capsys):
  """Scout (109B parameters) on 4 v5e chips (16 GB each): every mesh pruned by the calculator."""
  code, out, err = _run(capsys, ["--config", "configs/scout.yaml", "--topology", "v5e-4", "train.seq_len=8192"])
  assert code == 1
  assert err.strip().splitlines()[-1].startswith("nothing fits") and len(err.strip().splitlines()) == 1


def test_bad_input_is_one_line(capsys):
  code, _, err = _run(capsys, ["--topology", "v9-8"])
  assert code == 2 and len(err.strip().splitlines()) == 1 and "v9-8" in err
