"""`python -m behemoth_jax.memory`: the command line of behemoth_jax.scale.memory (kept at its first address)."""

import sys

from behemoth_jax.scale.memory import main

if __name__ == "__main__":
  sys.exit(main())
