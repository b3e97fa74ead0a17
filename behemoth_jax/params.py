"""`python -m behemoth_jax.params`: the command line of behemoth_jax.scale.params (kept at its first address)."""

import sys

from behemoth_jax.scale.params import main

if __name__ == "__main__":
  sys.exit(main())
