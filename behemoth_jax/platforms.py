"""Which jax platforms to start: no TPU runtime on a machine without a TPU.

With the `tpu` extra installed (libtpu: the TPU compiler the ahead-of-time paths use), jax starts the
TPU runtime whenever it initialises its backends, and on a machine with no TPU that prints libtpu's
warnings and an `E0000 ... INVALID_ARGUMENT` line before falling back to the CPU. Compiling for a TPU
slice does not need that runtime (`jax.experimental.topologies` loads libtpu by itself), so when no
accelerator is attached and the user has chosen no platforms, only the CPU is started. A machine with
a TPU (or a GPU) is left to jax's own choice.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import jax

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips appear as PCI devices of Google's vendor id (as jax itself checks)
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def accelerator_attached() -> bool:
  """A TPU chip on the PCI bus, or a GPU device file (NVIDIA, WSL, AMD)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return any(os.path.exists(f) for f in _GPU_DEVICE_FILES)


def cpu_only_without_accelerator() -> None:
  """Sets jax's platforms to "cpu" unless the user chose them (JAX_PLATFORMS / jax_platforms) or an
  accelerator is attached. Must run before jax initialises its backends; later it changes nothing."""

  if user_platforms() or accelerator_attached():
    return
  jax.config.update("jax_platforms", "cpu")


def user_platforms() -> str | None:

  return os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
