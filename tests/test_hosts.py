"""Many processes (train.py over jax.distributed, gloo, 127.0.0.1): 2 equal 1, a lost process is
noticed, one preemption notice stops every process at the same step, and a run continues on another
number of processes and another mesh. docs/RELIABILITY.md has the table of these faults.

Runs are small (2 layers, 6 steps of 8 x 64 tokens, a checkpoint every 2 steps) and share one
persistent compilation cache; the two reference runs are made once per session, whichever xdist
worker asks first (a file lock).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from filelock import FileLock

ROOT = Path(__file__).parent.parent
STEPS = 6
RUN = [
  "train.seq_len=64",
  "train.batch_size=8",
  "train.eval_batches=1",
  "train.warmup_steps=2",
  f"train.steps={STEPS}",
  "train.checkpoint_every=2",
  "train.keep_checkpoints=4",
  "model.num_layers=2",
  "model.hidden_size=64",
  "model.head_dim=16",
  "model.nope_layer_interval=2",
]  # the tiny config's mesh: fsdp 4 x expert 2 (8 devices: 1 process x 8 or 2 processes x 4)
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1"}
PEER_TIMEOUT = 6
SLICES = ["parallel.num_slices=2", "parallel.dcn_axis=fsdp"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out: Path, procs: int, *extra: str, devices: int | None = None, only=None) -> list[subprocess.Popen]:
  """train.py as `procs` processes of `devices` (default 8 / procs) CPU devices each; logs beside `out`.
  `only`: {process: [arguments for that process alone]}."""
  devices = devices or 8 // procs
  multi = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", str(procs), "--peer-timeout"]
  launched = []
  for i in range(procs):
    cmd = [sys.executable, str(ROOT / "train.py"), *RUN, f"train.out_dir={out}", "--local-devices", str(devices)]
    # Each process a slice joined over DCN (parallel.dcn_axis=fsdp): the hybrid mesh across processes.
    cmd += [*multi, str(PEER_TIMEOUT), "--process-id", str(i), *SLICES] if procs > 1 else []
    log = open(f"{out}.{len(list(out.parent.glob(out.name + '.*')))}.log", "w")  # noqa: SIM115 (closed by the child's exit)
    launched.append(
      subprocess.Popen(
        [*cmd, *extra, *(only or {}).get(i, [])], env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True
      )
    )
    launched[-1].log_path = log.name
  return launched


def _wait(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
  """Waits for every process; their logs."""
  for p in procs:
    p.wait(timeout=timeout)
  return [Path(p.log_path).read_text() for p in procs]


def _run(out: Path, procs: int, *extra: str, devices: int | None = None) -> list[str]:
  launched = _launch(out, procs, *extra, devices=devices)
  logs = _wait(launched)
  for p, log in zip(launched, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  return logs


def _metrics(out: Path) -> dict[int, float]:
  """step → loss; a step logged twice (before a fault and after the restart) keeps its last record."""
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _state(out: Path, step: int) -> list[np.ndarray]:
  """Every leaf of a saved train state as numpy (whatever processes and devices saved it)."""
  path, ckptr = out / "checkpoints" / str(step) / "state", ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree, is_leaf=lambda x: hasattr(x, "shape"))
  return jax.tree.leaves(ckptr.restore(path, restore_args=args))


def _copy_run(src: Path, dst: Path, upto: int) -> Path:
  """The run directory as it was when step `upto` had been saved (later checkpoints and metrics dropped)."""
  shutil.copytree(src, dst)
  for p in (dst / "checkpoints").iterdir():
    if p.name.isdigit() and int(p.name) > upto:
      shutil.rmtree(p)
  lines = (dst / "metrics.jsonl").read_text().splitlines()
  (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x).get("step", 0) <= upto))
  return dst


def _wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not ((out / "metrics.jsonl").exists() and max(_metrics(out), default=0) >= step):
    assert all(p.poll() is None for p in procs), f"a process ended before step {step}"
    assert time.time() < deadline, f"timed out waiting for step {step}"
    time.sleep(0.01)


def _assert_bitwise(got: Path, want: Path) -> None:
  g, w = _metrics(got), _metrics(want)
  assert sorted(g) == sorted(w) == list(range(1, STEPS + 1))
  assert all(g[s] == w[s] for s in w), (g, w)
  for a, b in zip(_state(got, STEPS), _state(want, STEPS), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
  """Uninterrupted reference runs: 1 process x 8 devices and 2 processes x 4 devices."""
  shared = tmp_path_factory.getbasetemp().parent  # one directory for every xdist worker of the session
  with FileLock(shared / "hosts-runs.lock"):
    out = {"one": shared / "hosts-one", "two": shared / "hosts-two"}
    for name, procs in (("one", 1), ("two", 2)):
      if not (out[name] / "summary.json").exists():
        shutil.rmtree(out[name], ignore_errors=True)
        _run(out[name], procs)
  return out


def test_two_processes_equal_one(runs):
  """Same mesh shape (2 slices of fsdp 2 x expert 2 over DCN, one per process, vs fsdp 4 x expert 2), same global batches (tests/test_data.py assembles them from 1, 2 and 4 processes):
  every step's loss within 1e-6 relative, the final parameters and optimizer state within 1e-6."""
  one, two = _metrics(runs["one"]), _metrics(runs["two"])
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  for s in one:
    assert two[s] == pytest.approx(one[s], rel=1e-6), s
  assert one[STEPS] < one[1]
  for a, b in zip(_state(runs["two"], STEPS), _state(runs["one"], STEPS), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_lost_process_is_noticed_and_the_rerun_resumes_bitwise(runs, tmp_path):
  """SIGKILL process 1 mid-run; rerun; SIGKILL process 0 (it hosts the coordination service); rerun.
  Each time the survivor exits 4 within 60 s with one line naming the lost process, and the last
  rerun resumes from the last checkpoint and ends bit for bit equal to the uninterrupted run."""
  out, rng = tmp_path / "run", random.Random(7)
  for victim, expect in ((1, "process 1 of 2 stopped responding"), (0, "lost the coordination service: process 0")):
    done = max(_metrics(out), default=0) if (out / "metrics.jsonl").exists() else 0
    procs = _launch(out, 2)
    _wait_for_step(out, max(done + 1, 2), procs)
    time.sleep(rng.uniform(0.0, 0.5))
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.time()
    status = procs[1 - victim].wait(timeout=120)
    waited = time.time() - killed_at
    log = _wait(procs)[1 - victim]
    errors = [line for line in log.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert status == 4 and waited < 60, (victim, status, waited, log[-2000:])
    assert len(errors) == 1 and expect in errors[0], log[-2000:]
    assert "Check failure stack trace" not in log  # XLA's abort (process 0's loss) is replaced by the line
    assert max(_metrics(out)) < STEPS  # stopped mid-run
  logs = _run(out, 2)
  assert "resumed from" in logs[0]
  _assert_bitwise(out, runs["two"])


def test_a_process_that_fails_takes_the_others_down_with_one_line(tmp_path):
  procs = _launch(tmp_path / "run", 2, only={1: [f"data.source={tmp_path / 'missing.jsonl'}"]})
  logs = _wait(procs, timeout=120)
  assert [p.returncode for p in procs] == [4, 2], logs
  errors = [[x for x in log.replace("\r", "\n").splitlines() if x.startswith("error:")] for log in logs]
  assert len(errors[1]) == 1 and "missing.jsonl" in errors[1][0]
  assert len(errors[0]) == 1 and "process 1 of 2 failed (DataError: " in errors[0][0], errors


def test_a_preemption_notice_to_one_process_stops_all_at_one_step(runs, tmp_path):
  out = tmp_path / "run"
  procs = _launch(out, 2)
  _wait_for_step(out, 2, procs)
  procs[1].send_signal(signal.SIGTERM)  # the other process gets no signal
  logs = _wait(procs)
  assert [p.returncode for p in procs] == [0, 0], logs[1][-2000:]
  saved = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert saved < STEPS and f"saved step {saved}" in logs[0]
  names = sorted(p.name for p in (out / "checkpoints" / str(saved) / "data").glob("process_*"))
  assert names == ["process_0-of-2.json", "process_1-of-2.json"]  # both processes saved that step
  logs = _run(out, 2)
  assert f"resumed from {out / 'checkpoints' / str(saved)} (step {saved})" in logs[0]
  _assert_bitwise(out, runs["two"])


def test_a_run_continues_on_another_number_of_processes_and_mesh(runs, tmp_path):
  """2 processes x 4 (fsdp 4 x expert 2) → 1 process x 4 (fsdp 4), and 1 process x 8 → 2 processes x 4
  (fsdp 2 x expert 4), each from step 2. The state is restored bitwise onto the new mesh; the data
  stream continues where it stopped (its batches are those of the uninterrupted run: tests/test_data.py),
  so the losses equal those of the same resumption made on one host within 1e-5."""
  from behemoth_jax.config import load_config
  from behemoth_jax.train.checkpoint import Checkpointer
  from behemoth_jax.train.state import abstract_train_state
  from behemoth_jax.train.step import make_optimizer
  from sharding.mesh import make_mesh

  narrow = ["parallel.fsdp=4", "parallel.expert=1"]
  cfg = load_config("configs/tiny.yaml", RUN + narrow)
  mesh = make_mesh(cfg.parallel, devices=jax.devices()[:4])
  _, abstract = abstract_train_state(cfg, mesh, make_optimizer(cfg.train))

  class _NoData:
    def set_state(self, states):
      assert len(states) == 2  # both processes' data states are read

  restored = Checkpointer(runs["two"] / "checkpoints", every=2, keep=4, use_async=False).restore(2, abstract, _NoData())
  for a, b in zip(jax.tree.leaves(restored), _state(runs["two"], 2), strict=True):
    assert a.sharding.mesh.devices.size == 4
    np.testing.assert_array_equal(np.asarray(a), b)

  cases = (("two", 1, narrow, 4), ("one", 2, ["parallel.fsdp=2", "parallel.expert=4"], 8))
  for src, procs, mesh_args, devices in cases:
    got = _copy_run(runs[src], tmp_path / f"{src}-to-{procs}", upto=2)
    logs = _run(got, procs, *mesh_args, devices=devices // procs)
    assert "resumed from" in logs[0] and "step 2)" in logs[0]
    ref = _copy_run(runs["one"], tmp_path / f"{src}-to-{procs}-on-one-host", upto=2)
    _run(ref, 1, *mesh_args, devices=devices)
    g, r = _metrics(got), _metrics(ref)
    assert sorted(g) == sorted(r) == list(range(1, STEPS + 1))
    for s in range(3, STEPS + 1):
      assert g[s] == pytest.approx(r[s], rel=1e-5), (src, procs, s)
