"""`python -m behemoth_jax.plan`: the command line of behemoth_jax.scale.plan (the mesh planner)."""

import sys

from behemoth_jax.scale.plan import main

if __name__ == "__main__":
  sys.exit(main())
