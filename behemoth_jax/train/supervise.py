"""One process of many runs under a small supervisor, so that losing the coordination service is one line.

Process 0 hosts jax's coordination service. When it dies, every other process loses the service at
once and XLA aborts them from a C++ thread (LOG(FATAL): SIGABRT, a multi-line message and a stack
trace), before any Python code of ours can run. So with `--coordinator`, train.py starts itself again
as a child and forwards the child's stdout and stderr as they come, until XLA's fatal message appears:
that and its stack trace are held back and, once the child has exited, replaced by one line naming
the lost process (exit status 4, as for a peer lost while the service lives: peers.py). Signals
(SIGTERM: a preemption notice) are passed on to the child, and the child dies with the supervisor
(PR_SET_PDEATHSIG), so killing the process a user started kills the run.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys

from behemoth_jax.train.peers import LOST_PEER_STATUS

CHILD = "BEHEMOTH_SUPERVISED"  # set in the child's environment
# absl's fatal-log prefix at the start of a line: "F1203 19:05:08.146049    5158 client.h:80] "
FATAL = re.compile(rb"(?:^|\n)F\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w.\-]+:\d+\] ")
HOLD = 64  # bytes kept back from forwarding: a fatal prefix split across two reads is still seen


def supervised() -> bool:
  return os.environ.get(CHILD) == "1"


def _die_with_parent() -> None:  # in the child, before exec
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:  # not Linux: the child outlives a killed supervisor
    pass


def supervise(argv: list[str], process_id: int, num_processes: int) -> int:
  """Runs `python argv` as the child; its exit status (4 with one line when XLA aborted it because the
  coordination service or a peer was lost; 128 + N for a child killed by signal N)."""
  child = subprocess.Popen(
    [sys.executable, *argv],
    env={**os.environ, CHILD: "1"},
    stderr=subprocess.PIPE,
    preexec_fn=_die_with_parent,  # noqa: PLW1509 (the supervisor has no threads yet)
  )
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, _: child.send_signal(signum))
  fatal, pending, out = None, b"", sys.stderr.buffer
  while chunk := os.read(child.stderr.fileno(), 1 << 16):
    if fatal is not None:
      fatal += chunk[: max(0, (1 << 16) - len(fatal))]
      continue
    pending += chunk
    m = FATAL.search(pending)
    if m:
      fatal, pending = pending[m.start() :].lstrip(b"\n"), pending[: m.start()]
    cut = len(pending) if fatal is not None else max(0, len(pending) - HOLD)
    out.write(pending[:cut])
    out.flush()
    pending = pending[cut:]
  out.write(pending)
  out.flush()
  status = child.wait()
  if fatal is not None:
    sys.stderr.write(
      f"\nerror: {lost(fatal.decode(errors='replace'), num_processes)}; process {process_id} exits. "
      "Start all processes again with the same command: the run resumes from its last checkpoint\n"
    )
    return LOST_PEER_STATUS
  return status if status >= 0 else 128 - status


def lost(message: str, num_processes: int) -> str:
  """What XLA's fatal message says was lost, in a few words."""
  if "coordination service" in message and ("leader" in message or "Socket closed" in message):
    return f"lost the coordination service: process 0 of {num_processes} stopped"
  m = re.search(r"unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+)", message)
  if m:
    ids = ", ".join(m.group(1).split())
    return f"process {ids} of {num_processes} stopped sending heartbeats (the coordination service's timeout)"
  first = message.splitlines()[0] if message else "unknown"
  return f"XLA aborted the process: {first.split('] ', 1)[-1][:200]}"
