import sys

from behemoth_jax.convert.cli import main

sys.exit(main())
