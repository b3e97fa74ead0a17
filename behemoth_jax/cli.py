"""What every command line shares: argparse errors as one line, and `key=value` overrides accepted on
either side of the options."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a usage error is one line (`error: ...`, exit status 2) instead of the usage block
  and the message; `--help` shows the usage as usual."""

  def error(self, message: str):
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    sys.exit(2)

  def parse_args(self, args=None, namespace=None):
    """Positional overrides may come before, between and after the options (`train.py a=1 --config C
    b=2`), which plain argparse refuses for a `nargs="*"` positional. A parser with sub-commands keeps
    argparse's own order rules (parse_intermixed_args does not support them)."""
    if self._subparsers is not None:
      return super().parse_args(args, namespace)
    return self.parse_intermixed_args(args, namespace)
