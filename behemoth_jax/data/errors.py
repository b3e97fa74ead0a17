"""The one exception type of the input pipeline.

Every message is one line that starts with the file (or source) it is about, then the line or record
number where one applies, then the problem: `corpus.jsonl:12: invalid JSON (Expecting value)`.
"""

from __future__ import annotations


class DataError(ValueError):
  """Unusable input data or tokenizer; the message names the file and the problem."""

  def __init__(self, message: str):
    # One line, always: messages embed third-party error text that may contain newlines.
    super().__init__(" ".join(str(message).split()))
