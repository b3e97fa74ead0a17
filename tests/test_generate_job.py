"""The resumable generation job (`generate --out DIR`): killed at random moments (one of them inside a
shard commit) and rerun, it writes every record exactly once, with the completion of an uninterrupted
run, greedy and sampled; a directory of another job is refused with one line."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from behemoth_jax.infer.shards import read_shards

ROOT = Path(__file__).parent.parent
SMALL = ["train.seq_len=64", "train.batch_size=8", "train.eval_batches=1", "train.steps=1", "model.num_layers=2"]
ENV = {**os.environ, "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """A tiny trained checkpoint and 64 prompts of 4 to 300 tokens (bytes), shuffled lengths."""
  d = tmp_path_factory.mktemp("job")
  assert train.main(["--config", "configs/tiny.yaml", *SMALL, f"train.out_dir={d / 'run'}"]) == 0
  rng = random.Random(3)
  lengths = [4, 300] + [rng.randint(4, 300) for _ in range(62)]
  rng.shuffle(lengths)
  words = "expert router chunk norm rope scale teacher student".split()
  lines = []
  for i, n in enumerate(lengths):
    text = ""
    while len(text) < n:
      text += rng.choice(words) + " "
    lines.append(json.dumps({"id": i, "prompt": text[:n]}))
  (d / "prompts.jsonl").write_text("\n".join(lines) + "\n")
  return d


def _cmd(job: Path, out: Path, *extra: str) -> list[str]:
  return [
    sys.executable, "-m", "behemoth_jax.generate", "--ckpt", str(job / "run"), "--prompts", str(job / "prompts.jsonl"),
    "--out", str(out), "--max-new-tokens", "12", "--batch-size", "4", "--shard-records", "8", *extra,
  ]  # fmt: skip


def _run(job: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
  r = subprocess.run(_cmd(job, out, *extra), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _shards(out: Path) -> int:
  return len(list(out.glob("part-*.jsonl"))) if out.is_dir() else 0


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
  deadline = time.time() + 300
  while not ready():
    assert proc.poll() is None, f"the job ended before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()


_REFERENCES: dict[tuple[str, ...], list[dict]] = {}


def _reference(job: Path, sampling: list[str]) -> list[dict]:
  """The records of an uninterrupted run (one per sampling setting, made once per module)."""
  key = tuple(sampling)
  if key not in _REFERENCES:
    want = job / f"uninterrupted-{len(_REFERENCES)}"
    _run(job, want, *sampling)
    _REFERENCES[key] = read_shards(want)
  reference = _REFERENCES[key]
  assert [r["id"] for r in reference] == list(range(64)) and all(r["completion_ids"] for r in reference)
  return reference


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.8", "--seed", "11"]], ids=["greedy", "sampled"])
def test_killed_three_times_the_job_resumes_to_the_uninterrupted_records(job, tmp_path, sampling):
  reference = _reference(job, sampling)
  out, rng = tmp_path / "killed", random.Random(5)
  for how in ("moment", "commit", "moment"):
    before = _shards(out)
    proc = subprocess.Popen(
      _cmd(job, out, *sampling), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if how == "commit":  # inside a commit: the shard's temporary file exists (written, fsynced, not yet renamed)
      _kill_when(proc, lambda: any(e.name.endswith(".tmp") for e in os.scandir(out)), "a shard commit")
    else:  # at a random moment once this launch has committed a shard
      _kill_when(proc, lambda b=before: _shards(out) > b, "a committed shard")
      time.sleep(rng.uniform(0.0, 0.3))
      proc.kill()
    assert _shards(out) < 8, "the job finished before it was killed"
  r = _run(job, out, *sampling)
  assert "resuming" in r.stdout
  assert not list(out.glob("*.tmp"))
  assert read_shards(out) == reference  # every record once, in order, each with the same completion
  if not sampling:  # the same directory with another sampling setting is another job: refused, one line
    r = subprocess.run(_cmd(job, out, "--temperature", "0.5"), env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {out}: written by another job")
    assert "sampling" in r.stderr and read_shards(out) == reference


def test_two_processes_share_a_job_and_each_resumes_its_own_shards(job, tmp_path):
  """--num-processes 2: process I takes the shards k with k mod 2 = I, both in one directory at once;
  process 1 is killed after its first shard and rerun alone: the records are the uninterrupted run's."""
  reference, out = _reference(job, []), tmp_path / "shared"

  def launch(i: int) -> subprocess.Popen:
    cmd = _cmd(job, out, "--num-processes", "2", "--process-id", str(i))
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  first, second = launch(0), launch(1)
  _kill_when(second, lambda: out.is_dir() and any(out.glob("part-0000[1357].jsonl")), "process 1's first shard")
  assert first.wait(timeout=600) == 0
  log = first.stdout.read()
  assert "wrote 32 records" in log and "shards left to the other processes" in log, log[-2000:]
  assert sorted(int(p.name[5:10]) % 2 for p in out.glob("part-*.jsonl")).count(0) == 4
  r = subprocess.run(
    _cmd(job, out, "--num-processes", "2", "--process-id", "1"), env=ENV, cwd=ROOT, capture_output=True, text=True
  )
  assert r.returncode == 0 and "resuming" in r.stdout and "the job is complete: 8 shards" in r.stdout, (
    r.stdout + r.stderr[-2000:]
  )
  assert read_shards(out) == reference


def test_one_job_over_two_processes_on_one_mesh(job, tmp_path):
  """--coordinator: 2 processes x 4 CPU devices join one mesh (the checkpoint config's fsdp 4 x expert 2,
  as the reference run's one process of 8 devices); process 0 commits the shards: the same records."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  reference, out = _reference(job, []), tmp_path / "global"
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  multi = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--peer-timeout", "30"]
  procs = [
    subprocess.Popen(
      _cmd(job, out, *multi, "--process-id", str(i)),
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  assert "the job is complete: 8 shards" in logs[0]
  assert read_shards(out) == reference
