"""What every command line shares: argparse errors as one line."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
  """argparse, but a usage error is one line (`error: ...`, exit status 2) instead of the usage block
  and the message; `--help` shows the usage as usual."""

  def error(self, message: str):
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    sys.exit(2)
