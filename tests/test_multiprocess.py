"""Two OS processes × 4 CPU devices (jax.distributed, gloo) == one process × 8 devices."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from multiprocess_common import loss_and_grad_norm, single_process_parallel

WORKER = Path(__file__).parent / "multiprocess_worker.py"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  out = tmp_path / "result.json"
  port = str(_free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, str(WORKER), str(i), "2", port, str(out)],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    logs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  got = json.loads(out.read_text())
  assert got["processes"] == 2 and got["devices"] == 8
  loss, gnorm = loss_and_grad_norm(single_process_parallel())
  assert got["loss"] == pytest.approx(loss, rel=1e-5)
  assert got["grad_norm"] == pytest.approx(gnorm, rel=1e-5)
