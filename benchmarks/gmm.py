"""The CPU grouped matmul (`moe_impl: blocked`) against one dense matmul of the same rows: forward and backward.

    python benchmarks/gmm.py [--rows 2048 --k 512 --n 1024 --experts 16 --block 0 --repeats 7]

Default shapes are one bench-moe expert projection (2048 tokens top-1 over 16 experts, 512 -> 1024).
The dense rows (`x @ w[0]` and its two backward products) are the ideal: the same FLOPs in three plain
matmuls. What bench-moe's train step loses to the grouped matmul is the gap between the two columns
times 24 (3 projections x 8 layers). Results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repository on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from common import median_seconds

from behemoth_jax.model.gmm import default_block_size, grouped_matmul


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
  )
  p.add_argument("--rows", type=int, default=2048)
  p.add_argument("--k", type=int, default=512)
  p.add_argument("--n", type=int, default=1024)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--block", type=int, default=0, help="rows per block (0: the automatic size)")
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args(argv)
  m, k, n, e = args.rows, args.k, args.n, args.experts
  block = args.block or default_block_size(m, e)
  r = np.random.default_rng(0)
  x = jnp.asarray(r.standard_normal((m, k)), jnp.float32)
  w = jnp.asarray(r.standard_normal((e, k, n)) * 0.05, jnp.float32)
  dy = jnp.asarray(r.standard_normal((m, n)), jnp.float32)
  gs = jnp.asarray(np.bincount(r.integers(0, e, m), minlength=e), jnp.int32)  # uniform routing
  gmm = lambda x, w: grouped_matmul(x, w, gs, impl="blocked", block=block)
  cases = {
    "forward": (jax.jit(gmm), jax.jit(lambda x, w: x @ w[0])),
    "backward (dx, dw)": (
      jax.jit(lambda x, w, dy: jax.vjp(gmm, x, w)[1](dy)),
      jax.jit(lambda x, w, dy: (dy @ w[0].T, x.T @ dy)),
    ),
  }
  print(
    f"grouped matmul [{m}, {k}] x [{e}, {k}, {n}], block {block}, group sizes {np.asarray(gs).tolist()}; "
    f"jax {jax.__version__} on {jax.default_backend()}"
  )
  print("| pass | blocked ms | dense ms (ideal) | blocked / dense | blocked GFLOP/s |\n|---|---|---|---|---|")
  for name, (ours, dense) in cases.items():
    a = (x, w) if name == "forward" else (x, w, dy)
    flops = 2 * m * k * n * (1 if name == "forward" else 2)
    jax.block_until_ready((ours(*a), dense(*a)))
    t_ours, _ = median_seconds(lambda: jax.block_until_ready(ours(*a)), args.repeats)
    t_dense, _ = median_seconds(lambda: jax.block_until_ready(dense(*a)), args.repeats)
    print(
      f"| {name} | {t_ours * 1e3:.1f} | {t_dense * 1e3:.1f} | {t_ours / t_dense:.2f}x | {flops / t_ours / 1e9:.0f} |"
    )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
