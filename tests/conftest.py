import os

# Every sharding path runs on 8 fake CPU devices; must happen before jax is imported.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
