"""Host memory: keep freed memory in the process instead of handing it back to the kernel (glibc).

XLA:CPU allocates each step's temporaries afresh, and glibc returns large freed blocks to the kernel
(`munmap`, or trimming an arena), so every step faulted its memory back in page by page. Measured on
bench-moe's train step (2 cores): 629k minor page faults and ~1.5 s of system time per ~5 s step;
with the settings below, 0 faults, and steps 0.1-0.7 s faster in paired runs. Settings (mallopt): one
arena (per-thread arenas trim their heaps), no mmap for large blocks, never trim.

Called by train.py and the benchmarks before JAX starts its backend (threads that already own an
arena keep it). Not done on import: it is process-wide and a library should not change its host's
allocator behind its back. The cost: the process's resident memory never shrinks back after a peak.
`BEHEMOTH_KEEP_FREED_MEMORY=0` turns it off; it does nothing outside Linux/glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module doc); True if it was applied."""
  if sys.platform != "linux" or os.environ.get("BEHEMOTH_KEEP_FREED_MEMORY", "1") == "0":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc
    return False
  # -1 as M_TRIM_THRESHOLD is SIZE_MAX (glibc takes the int as size_t): never trim; the largest
  # positive int (2 GiB) is smaller than one bench-moe step's temporaries.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(mallopt(option, value) == 1 for option, value in settings)
