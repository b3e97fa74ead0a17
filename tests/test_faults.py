"""Faults in train.py: SIGKILL anywhere, corrupted and truncated checkpoints, write errors, NaN/Inf.

Every case runs the real train.py in a subprocess (a fault must not depend on the test's process) on
one device with a small model, against one uninterrupted reference run of 16 steps.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from behemoth_jax.config import load_config
from behemoth_jax.train.checkpoint import MANIFEST, CheckpointError, verify_manifest
from behemoth_jax.train.state import abstract_train_state, make_init
from behemoth_jax.train.step import make_optimizer, make_schedule, make_train_step
from sharding.mesh import make_mesh

ROOT = Path(__file__).parent.parent
STEPS = 16
RUN = [
  "train.seq_len=64",
  "train.batch_size=4",
  "train.eval_batches=1",
  "train.warmup_steps=2",
  f"train.steps={STEPS}",
  "train.checkpoint_every=2",
  "train.keep_checkpoints=3",
  "parallel.fsdp=1",
  "parallel.expert=1",
  "model.num_layers=2",
  "model.hidden_size=64",
  "model.head_dim=16",
  "model.nope_layer_interval=2",
]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _cmd(out: Path, *extra: str) -> list[str]:
  return [sys.executable, str(ROOT / "train.py"), *RUN, f"train.out_dir={out}", *extra]


def _run(out: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(_cmd(out, *extra), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def _metrics(out: Path) -> dict[int, dict]:
  """step → metrics; a step logged twice (before a kill and after the restart) keeps its last record."""
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return {r["step"]: r for r in rows if "loss" in r}


def _state(out: Path, step: int):
  path = out / "checkpoints" / str(step) / "state"
  return jax.tree.leaves(ocp.StandardCheckpointer().restore(path))


def _assert_same_run(got: Path, want: Path) -> None:
  """Bitwise: every step's loss and the final state (parameters, optimizer moments, counters)."""
  g, w = _metrics(got), _metrics(want)
  assert sorted(g) == sorted(w) == list(range(1, STEPS + 1))
  for step in w:
    assert g[step]["loss"] == w[step]["loss"], step
  for a, b in zip(_state(got, STEPS), _state(want, STEPS), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("reference")
  r = _run(out)
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [12, 14, 16]
  return out


def _copy_run(reference: Path, dst: Path, keep_steps: tuple[int, ...]) -> Path:
  shutil.copytree(reference, dst)
  for p in (dst / "checkpoints").iterdir():
    if int(p.name) not in keep_steps:
      shutil.rmtree(p)
  return dst


def _largest_file(step_dir: Path) -> Path:
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _tmp_checkpoint_dirs(out: Path) -> list[Path]:
  d = out / "checkpoints"
  return [p for p in d.iterdir() if "tmp" in p.name] if d.is_dir() else []


def _wait_for(predicate, proc, what: str, timeout: float = 300.0) -> None:
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f"train.py ended before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.005)


def test_sigkill_at_five_points_resumes_bitwise(reference, tmp_path):
  """Five SIGKILLs in one run: three at random moments inside steps, two while an async checkpoint is
  being written (orbax's temporary directory exists). Each restart resumes from the last complete
  checkpoint; the finished run equals the uninterrupted one bit for bit."""
  out, rng = tmp_path / "killed", random.Random(1234)
  kills = []
  for how in ("step", "write", "step", "write", "step"):
    done = max(_metrics(out), default=0) if (out / "metrics.jsonl").exists() else 0
    proc = subprocess.Popen(_cmd(out), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if how == "write":
      _wait_for(lambda: _tmp_checkpoint_dirs(out), proc, "an async checkpoint write")
    else:  # a random moment once training has moved 1–3 steps past where this launch resumed
      target = min(done + rng.randint(1, 3), STEPS - 1)
      _wait_for(
        lambda: (out / "metrics.jsonl").exists() and max(_metrics(out), default=0) >= target, proc, f"step {target}"
      )
      time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it was killed"
    kills.append((how, max(_metrics(out), default=0) if (out / "metrics.jsonl").exists() else 0))
  assert len(kills) == 5 and max(s for _, s in kills) < STEPS, kills
  r = _run(out)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout
  assert not _tmp_checkpoint_dirs(out)  # half-written saves were cleaned up
  _assert_same_run(out, reference)


def test_corrupted_and_truncated_checkpoints_fall_back_to_the_previous(reference, tmp_path):
  out = _copy_run(reference, tmp_path / "run", (12, 14, 16))
  flipped = _largest_file(out / "checkpoints" / "16")  # one flipped byte: orbax alone restores it silently
  data = bytearray(flipped.read_bytes())
  data[len(data) // 3] ^= 0x5A
  flipped.write_bytes(bytes(data))
  truncated = _largest_file(out / "checkpoints" / "14")
  truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
  r = _run(out)
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: checkpoint step")]
  assert len(warnings) == 2 and "step 16" in warnings[0] and "corrupted" in warnings[0], warnings
  assert "step 14" in warnings[1] and "truncated" in warnings[1], warnings
  assert "resumed from" in r.stdout and "(step 12)" in r.stdout
  assert sorted(p.name.split("-")[1] for p in (out / "checkpoints").glob("corrupt-*")) == ["14", "16"]
  _assert_same_run(out, reference)  # steps 13–16 retrained from 12: the same bits


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(reference, tmp_path):
  out = _copy_run(reference, tmp_path / "run", (14, 16))
  for step in (14, 16):
    f = _largest_file(out / "checkpoints" / str(step))
    f.write_bytes(f.read_bytes()[:100])
  r = _run(out)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith("error: no readable checkpoint in"), r.stderr[-2000:]
  assert len(r.stderr.strip().splitlines()) == 1
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["14", "16"]


def test_write_error_during_save_is_reported_and_earlier_checkpoints_stay_intact(reference, tmp_path):
  """A file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so writes fail with EFBIG) stands in for
  a full disk: the resumed run trains, its first save fails, and the step-12 checkpoint still verifies
  and restores."""
  import resource

  out = _copy_run(reference, tmp_path / "run", (12,))
  limit = 1 << 20
  r = _run(out, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
  assert r.returncode == 1, r.stderr[-3000:]
  # Our one line; orbax's writer threads may also log tracebacks of the failed write, before, after, or
  # (measured once in ~10 runs) interleaved with ours, so the line is searched for, not split out.
  errors = re.findall(r"error: [^\n]*", r.stderr)
  assert len(errors) == 1, r.stderr[-3000:]
  err = errors[0]
  assert err.startswith("error: writing checkpoint step 14 to") and "intact checkpoints: steps [12]" in err, err
  assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["12"]
  verify_manifest(out / "checkpoints" / "12")
  for a, b in zip(_state(out, 12), _state(reference, 12), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_zero(tmp_path):
  proc = subprocess.Popen(
    _cmd(tmp_path, "train.steps=1000"), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and max(_metrics(tmp_path), default=0) >= 3, proc, "step 3")
  proc.send_signal(signal.SIGTERM)
  log = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, log[-2000:]
  saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert saved >= 3 and f"saved step {saved}" in log
  verify_manifest(tmp_path / "checkpoints" / str(saved))
  assert (tmp_path / "checkpoints" / str(saved) / MANIFEST).is_file()


def test_manifest_detects_a_flipped_byte(tmp_path):
  from behemoth_jax.train.checkpoint import write_manifest

  step = tmp_path / "7"
  (step / "state" / "d").mkdir(parents=True)
  (step / "state" / "d" / "chunk").write_bytes(bytes(range(256)) * 4)
  write_manifest(step)
  verify_manifest(step)
  data = bytearray((step / "state" / "d" / "chunk").read_bytes())
  data[500] ^= 1
  (step / "state" / "d" / "chunk").write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="chunk: checksum differs"):
    verify_manifest(step)


# --- NaN / Inf ---------------------------------------------------------------------------------------


def _tiny_step():
  cfg = load_config(
    "configs/tiny.yaml",
    ["train.seq_len=16", "train.batch_size=2", "train.steps=4", "parallel.fsdp=1", "parallel.expert=1"],
  )
  mesh = make_mesh(cfg.parallel, devices=jax.devices()[:1])
  tx = make_optimizer(cfg.train)
  graphdef, abstract = abstract_train_state(cfg, mesh, tx)
  state = make_init(cfg, tx, jax.tree.map(lambda a: a.sharding, abstract["params"]), mesh)()
  step = jax.jit(make_train_step(graphdef, tx, cfg.train, make_schedule(cfg.train)))
  return state, step


def _batch(tokens: np.ndarray) -> dict:
  b, t = tokens.shape
  return {
    "inputs": tokens,
    "targets": np.roll(tokens, -1, axis=1),
    "segment_ids": np.ones((b, t), np.int32),
    "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
    "loss_mask": np.ones((b, t), np.float32),
  }


def test_a_nonfinite_update_is_skipped_bitwise_and_counted():
  """An Inf in one embedding row poisons exactly the batches that use that token: their update is
  skipped (parameters and optimizer state bit for bit unchanged, `skipped` + 1); other batches train."""
  state, step = _tiny_step()
  flat = dict(nnx.to_flat_state(state["params"]))
  key = next(k for k in flat if "embed" in "/".join(map(str, k)))
  table = flat[key].get_value()
  flat[key] = flat[key].replace(table.at[7].set(jnp.inf))
  state["params"] = nnx.from_flat_state(flat)
  clean = _batch(np.full((2, 16), 3, np.int32) + np.arange(16, dtype=np.int32) % 2)  # tokens 3, 4
  poisoned = _batch(np.full((2, 16), 7, np.int32))
  before = jax.tree.map(np.asarray, (state["params"], state["opt_state"]))
  state, m = step(state, poisoned)
  assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state["params"], state["opt_state"])), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert int(state["step"]) == 1
  state, m = step(state, clean)
  assert int(m["skipped"]) == 1 and np.isfinite(float(m["loss"]))
  changed = [
    not np.array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(state["params"]), strict=True)
  ]
  assert any(changed)


@pytest.mark.parametrize("mode", ["halt", "skip"])
def test_nonfinite_loss_halts_or_is_counted_by_config(tmp_path, mode):
  """Initial parameters with a NaN final norm make every loss NaN: `halt` exits 3 at step 1 with one
  line and a hint; `skip` finishes, counting every step as skipped."""
  from behemoth_jax.model.transformer import create_model
  from behemoth_jax.train.checkpoint import save_params

  cfg = load_config("configs/tiny.yaml", [x for x in RUN if x.startswith("model.")])
  flat = dict(nnx.to_flat_state(nnx.state(create_model(cfg.model, 0), nnx.Param)))
  key = next(k for k in flat if k[0] == "final_norm")
  flat[key] = flat[key].replace(jnp.full_like(flat[key].get_value(), jnp.nan))
  save_params(tmp_path / "nan", nnx.from_flat_state(flat))
  out = tmp_path / mode
  r = _run(out, "train.steps=3", f"train.on_nonfinite={mode}", f"train.init_from={tmp_path / 'nan'}")
  if mode == "halt":
    assert r.returncode == 3, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "step 1: non-finite loss" in lines[0] and "halting" in lines[0], r.stderr[-2000:]
    assert "train.learning_rate" in lines[0]  # the hint
  else:
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["skipped_updates"] == 3
    assert sum("the update was skipped" in x for x in r.stderr.splitlines()) == 3


def test_resuming_with_another_models_config_is_one_line_and_moves_nothing(reference, tmp_path):
  out = _copy_run(reference, tmp_path / "run", (14, 16))
  r = _run(out, "model.hidden_size=32")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
  assert "has shape" in lines[0] and "the config needs" in lines[0] and "another train.out_dir" in lines[0]
  assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["14", "16"]
