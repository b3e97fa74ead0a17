"""Compiling for NVIDIA GPUs on this CPU machine (deviceless AOT with the CUDA PJRT plugin): the fp8
train step's projection and expert matmuls become GEMMs that read f8 operands, and a GPU cluster is
named, laid out and sized like a TPU slice (the checks: tests/gpu_compile_checks.py).

Each check runs in a child process that has the plugin on its path: the `gpu-compile` extra installed,
or CI's copy in .cache/gpu-compile (`pip install --target`), kept out of the test environment because
with the plugin importable `import jax` logs "Could not find cuda drivers" three times on a machine
without a GPU, which would break every one-line-error test of the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PLUGIN_DIR = ROOT / ".cache" / "gpu-compile"
CHECKS = Path(__file__).parent / "gpu_compile_checks.py"


def _env() -> dict[str, str]:
  env = dict(os.environ)
  if PLUGIN_DIR.is_dir():
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIR), env.get("PYTHONPATH", "")) if p)
  return env


def _have_plugin(env: dict[str, str]) -> bool:
  probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('jax_plugins.xla_cuda12') is None)"
  return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


@pytest.mark.parametrize("check", ["fp8_gemms", "cluster_layout_and_fit"])
def test_gpu_compile(check):
  env = _env()
  if not _have_plugin(env):
    pytest.skip("needs the CUDA compiler plugin: pip install -e '.[gpu-compile]' (CI: .cache/gpu-compile, see .ci/run)")
  r = subprocess.run(
    [sys.executable, str(CHECKS), check], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
  )
  assert r.returncode == 0 and f"{check}: ok" in r.stdout, (r.stdout + r.stderr)[-5000:]
