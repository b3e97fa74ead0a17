"""Many processes: joining them, noticing a lost one, and agreeing on a preemption step.

`join(coordinator, num_processes, process_id, peer_timeout)` starts jax.distributed (gloo collectives
on CPU) and a `PeerWatch`: a thread that heartbeats through the coordination service's key-value
store every second and watches the others' heartbeats. When a peer's heartbeat stops for
`peer_timeout` seconds (SIGKILL, a dead host) or a peer reports a failure, this process prints one line
naming it and exits with status 4, instead of blocking in the next collective (gloo waits on a dead
peer without end) until the coordination service's own heartbeat timeout aborts it with a stack trace
(measured: SIGABRT after 87 s with the defaults). The service's timeout is kept as a backstop, above
ours. Why our own heartbeats: jax exposes no callback for the service's verdict (jaxlib 0.10.2's
`missed_heartbeat_callback` crashes with std::bad_cast), and `get_live_nodes` only answers once the
service has decided, at the moment it aborts the process.

Preemption: jax's preemption sync manager catches SIGTERM in whichever process receives it, and
`reached_preemption_sync_point(step)` turns true on every process at the same step, so all of them
save that step and exit 0 (Trainer.loop).

Known limit: when process 0, which hosts the coordination service, dies, the others lose the service
at once and XLA aborts them (SIGABRT, exit 134) with its own multi-line message ("the leader task was
preempted/died"): fast, but not our one line.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import jax

PREFIX = "behemoth/heartbeat/"
LOST_PEER_STATUS = 4  # exit status of a process that stopped because another one was lost


def join(coordinator: str, num_processes: int, process_id: int, peer_timeout: float) -> PeerWatch:
  """jax.distributed.initialize, then a started PeerWatch."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator,
    num_processes=num_processes,
    process_id=process_id,
    # The service's own verdict (which aborts) comes well after ours; a clean shutdown waits less.
    heartbeat_timeout_seconds=int(peer_timeout) + 60,
    shutdown_timeout_seconds=int(peer_timeout) + 60,
  )
  watch = PeerWatch(peer_timeout)
  watch.start()
  return watch


class PeerWatch:
  """Heartbeats of every process in the key-value store; `on_lost` (default: one line on stderr,
  os._exit(4)) when a peer's stops advancing for `timeout` seconds or it reports a failure.
  `stop("done")` at a clean end (peers then ignore this process); `stop("failed: …")` tells them why."""

  def __init__(self, timeout: float, interval: float = 1.0, on_lost: Callable[[str], None] | None = None):
    from jax._src import distributed  # the client of jax.distributed.initialize (no public handle)

    self.client = distributed.global_state.client
    self.me, self.count = jax.process_index(), jax.process_count()
    self.timeout, self.interval = timeout, interval
    self.on_lost = on_lost or _exit_lost
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self, status: str = "done") -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    self._thread.join(timeout=5)
    try:
      self.client.key_value_set(f"{PREFIX}{self.me}", status, allow_overwrite=True)
    except Exception:  # the service is gone already: nothing left to tell
      pass

  def failed(self, e: BaseException) -> None:
    """This process is failing with `e`. A failed collective (JaxRuntimeError: gloo reports a peer's
    closed connection at once) most likely means a peer was lost: the watch gets `timeout` seconds to
    name it (and exit). Otherwise, or if it finds none, the peers are told this process failed."""
    if isinstance(e, jax.errors.JaxRuntimeError):
      self._thread.join(self.timeout + 3 * self.interval)
    self.stop(f"failed: {_first_line(e)}")

  def _run(self) -> None:
    beat, start = 0, time.monotonic()
    seen: dict[int, tuple[str, float]] = {p: ("", start) for p in range(self.count) if p != self.me}
    while not self._stop.wait(self.interval if beat else 0):
      beat += 1
      try:
        self.client.key_value_set(f"{PREFIX}{self.me}", str(beat), allow_overwrite=True)
        values = dict(self.client.key_value_dir_get(PREFIX))
      except Exception as e:  # the coordination service (process 0) is unreachable
        if not self._stop.is_set():
          self.on_lost(f"lost the coordination service (process 0 of {self.count}): {_first_line(e)}")
        return
      now = time.monotonic()
      for p, (last, since) in seen.items():
        value = values.get(f"{PREFIX}{p}", "")
        if value == "done":
          continue
        if value.startswith("failed"):
          self.on_lost(f"process {p} of {self.count} failed ({value[len('failed: ') :]})")
          return
        if value != last:
          seen[p] = (value, now)
        elif now - since > self.timeout:
          what = "stopped responding" if value else "never started"
          self.on_lost(f"process {p} of {self.count} {what} (no heartbeat for {now - since:.0f} s)")
          return


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def _exit_lost(what: str) -> None:
  """One line, then exit at once: the main thread may be blocked in a collective that never returns."""
  sys.stderr.write(  # on a line of its own, below a progress bar
    f"\nerror: {what}; process {jax.process_index()} exits. Start all processes again with the same "
    "command: the run resumes from its last checkpoint\n"
  )
  sys.stderr.flush()
  os._exit(LOST_PEER_STATUS)
