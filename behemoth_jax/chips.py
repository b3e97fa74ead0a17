"""Accelerator facts, one table: what MFU divides by, and what ahead-of-time compilation targets.

Peaks are dense bf16 FLOP/s per chip (vendor figures). TPU HBM is the largest buffer libtpu accepts
per chip (measured with libtpu 0.0.42), which is a little less than the marketed size; GPU memory is
what the CUDA runtime reports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
  name: str  # our spelling, as in slice names (v5p-1024)
  device_kinds: tuple[str, ...]  # jax's `device_kind` for it (a prefix match), first = what libtpu reports
  peak_bf16_flops: float
  hbm_bytes: int | None = None
  tpu_generation: str | None = None  # libtpu's topology prefix (TPUs only)
  cores_per_chip_in_name: int = 1  # v4-N / v5p-N count TensorCores, v5e-N / v6e-N chips
  dims: int = 0  # torus dimensions (TPUs only)
  gpu_target: str | None = None  # XLA target config for deviceless GPU compilation (scale/gpus/*.txtpb)
  peak_fp8_flops: float | None = None
  # Interconnect, bytes/s per chip in one direction (published figures; the mesh planner's roofline):
  # ICI (TPU: all ports together; GPU: NVLink inside a node) and DCN (TPU: the host's NICs shared by its
  # chips; GPU: the node's InfiniBand, one 400 Gb/s NIC per GPU).
  ici_bytes_per_s: float = 0.0
  dcn_bytes_per_s: float = 0.0

  @property
  def device_kind(self) -> str:
    return self.device_kinds[0]


CHIPS = {
  # ICI per chip: 2,400 / 4,800 / 1,600 / 3,584 Gb/s (Cloud TPU docs); DCN: 200 Gb/s per host of 4 chips
  # (v4, v5p), 2 x 100 Gb/s per host of 8 chips (v5e, v6e).
  "v4": Chip("v4", ("TPU v4",), 275e12, 33_013_592_064, "v4", 2, 3, ici_bytes_per_s=300e9, dcn_bytes_per_s=6.25e9),
  "v5p": Chip(
    "v5p", ("TPU v5", "TPU v5p"), 459e12, 102_802_796_544, "v5", 2, 3, ici_bytes_per_s=600e9, dcn_bytes_per_s=6.25e9
  ),
  "v5e": Chip(
    "v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16_908_767_232, "v5e", 1, 2, ici_bytes_per_s=200e9, dcn_bytes_per_s=3.1e9
  ),
  "v6e": Chip(
    "v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 33_549_930_496, "v6e", 1, 2, ici_bytes_per_s=448e9, dcn_bytes_per_s=3.1e9
  ),
  "a100": Chip("a100", ("NVIDIA A100",), 312e12),
  # GPU memory: what cudaMemGetInfo / nvidia-smi report (81,008 and 143,771 MiB), as in the target configs.
  # NVLink 4: 900 GB/s per GPU both directions together.
  "h100": Chip(
    "h100",
    ("NVIDIA H100",),
    989e12,
    84_942_979_072,
    gpu_target="h100_sxm.txtpb",
    peak_fp8_flops=1979e12,
    ici_bytes_per_s=450e9,
    dcn_bytes_per_s=50e9,
  ),
  "h200": Chip(
    "h200",
    ("NVIDIA H200",),
    989e12,
    150_754_820_096,
    gpu_target="h200_sxm.txtpb",
    peak_fp8_flops=1979e12,
    ici_bytes_per_s=450e9,
    dcn_bytes_per_s=50e9,
  ),
}


def chip_of(device_kind: str) -> Chip | None:
  """The chip whose device kind `device_kind` starts with (the longest such kind wins: "TPU v5 lite"
  is a v5e, not a v5p)."""
  matches = [(len(k), c) for c in CHIPS.values() for k in c.device_kinds if device_kind.startswith(k)]
  return max(matches, key=lambda m: m[0])[1] if matches else None
