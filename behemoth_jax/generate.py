"""`python -m behemoth_jax.generate`: the command line of behemoth_jax.infer.generate (kept at its first address)."""

import sys

from behemoth_jax.infer.generate import main

if __name__ == "__main__":
  sys.exit(main())
