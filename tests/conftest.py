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


# The fast subset for iterating (`pytest -n 2 -m "not slow"`, ~3 minutes on 2 cores) leaves out these:
# each took over ~8 s in the two-worker suite (measured 2026-12-03). Whole files: training runs,
# fault injection and multi-process runs start train.py (processes) and compile full train steps.
SLOW_FILES = ("test_training.py", "test_faults.py", "test_hosts.py", "test_generate_job.py")
SLOW_TESTS = (
  "test_aot.py::test_calculator_against_compiled_memory",
  "test_aot.py::test_scout_train_step_compiles_for_a_v5p_slice",
  "test_aot.py::test_a_step_that_does_not_fit_exits_1_with_the_reason",
  "test_bad_input.py::test_bad_input[checkpoint_wrong_shapes]",
  "test_convert_export.py::test_cli_trained_checkpoint_to_hf_and_back",
  "test_generate.py::test_cli_generate_and_score",
  "test_generate.py::test_generation_on_a_mesh_equals_one_device",
  "test_hf_parity.py::test_blocked_attention_path_matches_hf_and_the_dense_path",
  "test_losses.py::test_distillation_step_from_itself_has_zero_soft_loss_and_gradient",
  "test_losses.py::test_gradient_accumulation_equals_one_batch",
  "test_losses.py::test_offline_topk_targets_equal_the_online_teacher",
  "test_model.py::test_remat_policies_do_not_change_gradients",
  "test_model.py::test_scan_equals_loop_values_and_gradients",
  "test_model.py::test_unstack_layers_is_the_same_model",
  "test_multimodal.py::test_multimodal_logits_on_mesh_equal_one_device",
  "test_sharding.py::test_context_shards_not_aligned_with_chunks",
  "test_sharding.py::test_scanned_layers_on_expert_mesh",
  "test_sharding.py::test_mesh_matches_one_device[data2_expert2_tensor2]",
  "test_sharding.py::test_mesh_matches_one_device[expert8]",
  "test_sharding.py::test_mesh_matches_one_device[data2_fsdp4]",
  "test_sharding.py::test_mesh_matches_one_device[fsdp2_context4]",
)


def pytest_collection_modifyitems(items):
  for item in items:
    name = item.nodeid.split("/")[-1]
    if name.split("::")[0] in SLOW_FILES or any(name == s or name.startswith(s + "[") for s in SLOW_TESTS):
      item.add_marker(pytest.mark.slow)
