import os
from pathlib import Path

# Every sharding path runs on 8 fake CPU devices; must happen before jax is imported.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run, its xdist workers and the train.py processes
# the tests start: the suite compiles many programs more than once (the same tiny train step in a
# dozen runs and restarts). Kept in the checkout (ignored by git), so reruns start warm; a clean clone
# (CI) starts cold. Programs that compile in under a second are not worth a disk entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).parent.parent / ".cache" / "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop jit caches after each test module. One pytest process compiles hundreds of programs; with the
  whole suite in one process, XLA's CPU compiler segfaulted in the last module (test_training) twice,
  while that module alone passes."""
  yield
  jax.clear_caches()
  gc.collect()
