"""One process of a multi-process run: `python multiprocess_worker.py PROC NPROC PORT OUT`.

Joins the others through jax.distributed (coordinator on 127.0.0.1, gloo collectives), builds a
two-slice mesh (DCN over fsdp, one process per slice), and writes loss and gradient norm as JSON.
"""

import json
import os
import sys

proc, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=proc, initialization_timeout=120)

sys.path.insert(0, os.path.dirname(__file__))
from multiprocess_common import PARALLEL_2X4, loss_and_grad_norm  # noqa: E402

loss, gnorm = loss_and_grad_norm(PARALLEL_2X4)
if proc == 0:
  with open(out, "w") as f:
    json.dump({"loss": loss, "grad_norm": gnorm, "devices": jax.device_count(), "processes": jax.process_count()}, f)
jax.distributed.shutdown()
