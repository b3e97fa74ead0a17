"""The GPU compile checks of tests/test_gpu_compile.py, run as `python gpu_compile_checks.py CHECK` in a
process that has the CUDA PJRT plugin on its path (the gpu-compile extra, or CI's .cache/gpu-compile):
deviceless AOT compilation for H100 / H200 on this CPU machine. A failed check is an AssertionError."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys

import jax

from behemoth_jax import chips
from behemoth_jax.config import ConfigError, load_config
from behemoth_jax.scale import aot
from behemoth_jax.scale.flops import matmuls
from behemoth_jax.train.batch import batch_specs
from behemoth_jax.train.state import abstract_train_state
from behemoth_jax.train.step import make_optimizer, make_schedule, make_train_step
from sharding.api import use_mesh
from sharding.mesh import make_mesh

TINY_FP8 = ["model.fp8=true", "model.dtype=bfloat16", "train.batch_size=2", "train.seq_len=128"]


def _role(op_name: str) -> str:
  """What a matmul is, from jax's name stack: our einsums carry their subscripts ("BTD,DNH->BTNH")."""
  if "ragged_dot" in op_name:
    return "expert"
  # "jvp(BTD,DNH->BTNH)", or under remat "…/BTD,DNH->BTNH/dot_general"
  spec = re.search(r"\b([A-Za-z]+),([A-Za-z]+)->([A-Za-z]+)\b", op_name)
  if spec is None:
    return "loss"  # the chunked cross-entropy's own dots (float32 by the dtype policy)
  # Attention (q, s: query and key positions; n: key blocks), RoPE tables (J), the router (E) and the LM
  # head (V) stay wide.
  return "wide" if set("nqsJEV") & set(spec.group(0)) else "projection"


def fp8_gemms() -> None:
  # Experts exchanged over the expert axis (shard_map), layers rematerialized (remat's name stack).
  _fp8_gemms(["parallel.fsdp=1", "parallel.expert=2", "model.remat_policy=full"])


def _fp8_gemms(mesh: list[str]) -> None:
  """fwd + bwd of the tiny model's fp8 step for 2 H100s: every attention / dense / shared-expert
  projection and every expert grouped matmul reads f8 operands (e4m3 forward, e5m2 gradients);
  attention scores, router, LM head and loss stay bf16/f32 by design; experts exchanged by
  ragged all-to-all."""
  cfg = aot.for_tpu(load_config("configs/tiny.yaml", TINY_FP8 + mesh))
  gpus = make_mesh(cfg.parallel, aot.parse_topology("h100-1x2").devices)
  tx = make_optimizer(cfg.train)
  graphdef, abstract = abstract_train_state(cfg, gpus, tx)
  step = jax.jit(make_train_step(graphdef, tx, cfg.train, make_schedule(cfg.train), None), donate_argnums=0)
  with use_mesh(gpus), jax.default_matmul_precision("default"):
    hlo = step.lower(abstract, batch_specs(cfg, gpus)).compile().as_text()
  by_role = {}
  for m in matmuls(hlo):
    by_role.setdefault(_role(m.op_name), []).append(m)
  # 4 layers of q/k/v/o + a shared SwiGLU (7 projections) and routed experts (gate, up, down): forward,
  # dx and dw of each, less what XLA's dot merger joins (gate and up share x: one wider GEMM).
  assert len(by_role["projection"]) >= 4 * 4 * 3 and len(by_role["expert"]) >= 4 * 2 * 3, {
    k: len(v) for k, v in by_role.items()
  }
  for role in ("projection", "expert"):
    wide = [(m.op_name, m.dtypes) for m in by_role[role] if not all(t.startswith("f8") for t in m.dtypes)]
    assert not wide, (role, wide[:5])
  types = {t for role in ("projection", "expert") for m in by_role[role] for t in m.dtypes}
  assert types == {"f8e4m3fn", "f8e5m2"}
  assert any(all(t.startswith("f8") for t in m.dtypes) for m in by_role["expert"])
  assert all(not t.startswith("f8") for m in by_role["wide"] for t in m.dtypes)  # the classification can fail
  # And the report's share line says the same.
  share = aot.matmul_shares(hlo)
  assert share.startswith("f8 "), share
  # The expert exchange off CPU is the ragged one (sharding/expert.py): XLA:GPU implements the collective.
  assert "ragged-all-to-all-start(" in hlo


def cluster_layout_and_fit() -> None:
  topo = aot.parse_topology("h200-4x8")
  assert (topo.chips, topo.shape, topo.unit) == (32, (4, 8), "GPU")
  devices = topo.devices
  assert [d.process_index for d in devices] == [i // 8 for i in range(32)]  # numbered node by node
  cfg = load_config("configs/tiny.yaml", ["parallel.fsdp=4", "parallel.expert=8"])
  mesh = make_mesh(cfg.parallel, devices)
  # The trailing axis (expert 8) is one node; fsdp runs across the 4 nodes.
  assert all(len({d.process_index for d in row}) == 1 for row in mesh.devices.reshape(4, 8))
  for bad, args in (("h200-4x9", {}), ("h200-0x8", {}), ("h300-1x8", {}), ("h100-2x8", {"num_slices": 2})):
    try:
      aot.parse_topology(bad, **args)
    except ConfigError as e:
      assert "--compile-topology" in str(e) or "--num-slices" in str(e), e
    else:
      raise AssertionError(f"{bad} {args} accepted")
  # The fit is decided against the GPU's memory (XLA:GPU compiles a program of any size).
  small = load_config("configs/tiny.yaml", ["parallel.fsdp=2", "parallel.expert=1", "train.seq_len=64"])
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert aot.compile_train_step(small, "h100-1x2") == 0
  assert "fits" in out.getvalue(), out.getvalue()
  aot.CHIPS["h100"] = dataclasses.replace(chips.CHIPS["h100"], hbm_bytes=2**20)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert aot.compile_train_step(small, "h100-1x2") == 1
  out = out.getvalue()
  assert "DOES NOT FIT on NVIDIA H100: needs" in out and "the GPU has 0.00 GiB usable" in out


if __name__ == "__main__":
  jax.config.update("jax_default_matmul_precision", "highest")
  {"fp8_gemms": fp8_gemms, "cluster_layout_and_fit": cluster_layout_and_fit}[sys.argv[1]]()
  print(f"{sys.argv[1]}: ok")
