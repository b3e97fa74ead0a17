"""keep_freed_memory: re-allocating a large block no longer page-faults it back in (glibc only)."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource, sys
from behemoth_jax.train.hostmem import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 * 2**20
faults = []
for _ in range(4):  # what XLA:CPU does with a step's temporaries: malloc, write, free
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_memory_is_reused_without_page_faults():
  def run(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)

  applied, kept = run("keep")
  _, default = run("default")
  assert applied
  assert default >= 100  # glibc's default: the block is unmapped on free and faulted in again
  assert kept <= default // 20  # kept: later allocations reuse resident pages
