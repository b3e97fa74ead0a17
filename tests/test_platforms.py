"""No libtpu noise on a machine without a TPU; machines with an accelerator keep jax's own choice."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from behemoth_jax import platforms

ROOT = Path(__file__).parent.parent


def test_a_command_on_this_cpu_machine_prints_nothing_from_libtpu():
  """The package imported first, then a backend started: stderr stays empty (with the `tpu` extra
  installed, jax's own default prints libtpu's warnings and an E0000 INVALID_ARGUMENT line here)."""
  if platforms.accelerator_attached():
    pytest.skip("this machine has an accelerator")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  code = "import behemoth_jax, jax; print(jax.devices()[0].platform)"
  r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "cpu" and r.stderr == "", r.stderr


def test_accelerators_and_user_choices_are_left_alone(monkeypatch):
  import jax

  calls = []
  monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append((name, value)))
  monkeypatch.setattr(platforms, "user_platforms", lambda: None)
  monkeypatch.setattr(platforms, "accelerator_attached", lambda: True)
  platforms.cpu_only_without_accelerator()
  assert calls == []
  monkeypatch.setattr(platforms, "accelerator_attached", lambda: False)
  monkeypatch.setattr(platforms, "user_platforms", lambda: "tpu")
  platforms.cpu_only_without_accelerator()
  assert calls == []
  monkeypatch.setattr(platforms, "user_platforms", lambda: None)
  platforms.cpu_only_without_accelerator()
  assert calls == [("jax_platforms", "cpu")]


def test_a_tpu_on_the_pci_bus_counts_as_an_accelerator(tmp_path, monkeypatch):
  dev = tmp_path / "0000:00:04.0"
  dev.mkdir()
  (dev / "vendor").write_text("0x1ae0\n")
  monkeypatch.setattr(platforms.glob, "glob", lambda pattern: [str(dev / "vendor")])
  assert platforms.accelerator_attached()
  (dev / "vendor").write_text("0x8086\n")
  monkeypatch.setattr(platforms.os.path, "exists", lambda p: False)
  assert not platforms.accelerator_attached()
