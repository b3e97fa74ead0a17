"""A generation job's output directory: numbered JSONL shards, each committed atomically, so that a job
killed at any moment (SIGKILL, power loss) resumes where it stopped with the same records.

    OUT_DIR/job.json         what the job is: a fingerprint of the model, the prompt file and every
                             setting that changes a completion, the record count and shard size
    OUT_DIR/part-00000.jsonl records [0, n) of the prompt file, in order; part-k holds [k·n, (k+1)·n)
    OUT_DIR/part-00001.jsonl ...

A shard is written whole at its commit: to `part-k.jsonl.PID.tmp`, flushed and fsynced, renamed
(atomic on POSIX), and the directory fsynced, so a shard is either complete or absent; a leftover
`.tmp` is the trace of a commit cut short and is removed when the shard's owner resumes. Several
processes may share a job (each its own shards, `generate --num-processes`). Which input records a
shard holds is its number (times job.json's `shard_records`). A directory written by another job
(another model, prompt file or sampling setting) is refused with one line naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from behemoth_jax.data.errors import DataError

JOB = "job.json"


def file_sha256(path: str | Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


class ShardedOutput:
  """`pending()` lists the shards still to write; `commit(k, lines)` writes shard k atomically."""

  def __init__(self, directory: str | Path, job: dict, num_records: int, shard_records: int):
    if shard_records < 1:
      raise DataError(f"--shard-records: must be >= 1, got {shard_records}")
    self.dir = Path(directory)
    self.num_records, self.shard_records = num_records, shard_records
    self.job = {**job, "num_records": num_records, "shard_records": shard_records}
    path = self.dir / JOB
    if path.is_file():
      saved = json.loads(path.read_text())
      for key in sorted(set(saved) | set(self.job)):
        if saved.get(key) != self.job.get(key):
          raise DataError(
            f"{self.dir}: written by another job ({key}: {saved.get(key)!r} there, {self.job.get(key)!r} now); "
            "choose another --out"
          )
    elif self.dir.exists() and any(not p.name.endswith(".tmp") for p in self.dir.iterdir()):
      raise DataError(f"{self.dir}: exists and is not a generation job's directory (no {JOB}); choose another --out")
    else:  # several processes may start the job at once: each writes the same job.json, atomically
      self.dir.mkdir(parents=True, exist_ok=True)
      _atomic_write(path, json.dumps(self.job, indent=1) + "\n")

  @property
  def num_shards(self) -> int:
    return -(-self.num_records // self.shard_records)

  def shard_path(self, k: int) -> Path:
    return self.dir / f"part-{k:05d}.jsonl"

  def records(self, k: int) -> range:
    return range(k * self.shard_records, min((k + 1) * self.shard_records, self.num_records))

  def pending(self) -> list[int]:
    return [k for k in range(self.num_shards) if not self.shard_path(k).is_file()]

  def clean(self, k: int) -> None:
    """Removes what a commit of shard k cut short left behind (its temporary files)."""
    for tmp in self.dir.glob(f"{self.shard_path(k).name}.*.tmp"):
      tmp.unlink(missing_ok=True)

  def commit(self, k: int, lines: list[str]) -> None:
    if len(lines) != len(self.records(k)):
      raise ValueError(f"shard {k}: {len(lines)} records, expected {len(self.records(k))}")
    _atomic_write(self.shard_path(k), "".join(line + "\n" for line in lines))


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per writer: processes may share the directory
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  fd = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(fd)  # the rename itself survives a power loss
  finally:
    os.close(fd)


def read_shards(directory: str | Path) -> list[dict]:
  """Every record of a complete job directory, in prompt-file order."""
  d = Path(directory)
  return [json.loads(line) for p in sorted(d.glob("part-*.jsonl")) for line in p.read_text().splitlines()]
