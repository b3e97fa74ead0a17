"""No loader can execute code from a file: checkpoints, configs and data are read with safetensors,
orbax, JSON and yaml.safe_load only (a scan of every call in the package, the CLIs and the benchmarks)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# Calls that can execute code from a file's contents, by fully qualified name.
UNSAFE_LOADERS = {
  "pickle.load",
  "pickle.loads",
  "pickle.Unpickler",
  "torch.load",
  "yaml.load",
  "yaml.unsafe_load",
  "yaml.full_load",
  "yaml.unsafe_load_all",
  "yaml.load_all",
  "marshal.load",
  "marshal.loads",
  "dill.load",
  "dill.loads",
  "joblib.load",
  "cloudpickle.load",
  "cloudpickle.loads",
  "shelve.open",
  "eval",
  "exec",
  "builtins.eval",
  "builtins.exec",
}


def unsafe_calls(source: str) -> list[tuple[int, str]]:
  """(line, qualified name) of every call in `source` that can execute code from data: the names of
  UNSAFE_LOADERS however they are reached (`import m`, `import m as a`, `from m import f [as g]`,
  dotted attributes), and numpy.load with allow_pickle set to anything but False."""
  import ast

  tree = ast.parse(source)
  alias: dict[str, str] = {}  # local name -> qualified name
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.module:
      for a in node.names:
        alias[a.asname or a.name] = f"{node.module}.{a.name}"

  def qualified(f) -> str | None:
    parts = []
    while isinstance(f, ast.Attribute):
      parts.append(f.attr)
      f = f.value
    if not isinstance(f, ast.Name):
      return None
    return ".".join([alias.get(f.id, f.id), *reversed(parts)])

  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call) or (name := qualified(node.func)) is None:
      continue
    pickled_numpy = name == "numpy.load" and any(
      k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
      for k in node.keywords
    )
    if name in UNSAFE_LOADERS or pickled_numpy:
      found.append((node.lineno, name))
  return found


@pytest.mark.parametrize(
  "snippet,name",
  [
    ("import pickle\npickle.load(f)", "pickle.load"),
    ("import pickle as pk\npk.loads(b)", "pickle.loads"),
    ("from pickle import load\nload(f)", "pickle.load"),
    ("from pickle import load as read\nread(f)", "pickle.load"),
    ("from pickle import Unpickler\nUnpickler(f).load()", "pickle.Unpickler"),
    ("import torch\ntorch.load(path)", "torch.load"),
    ("from torch import load as tload\ntload(path)", "torch.load"),
    ("import yaml as y\ny.unsafe_load(text)", "yaml.unsafe_load"),
    ("from yaml import load\nload(text, Loader=L)", "yaml.load"),
    ("import numpy as np\nnp.load(f, allow_pickle=True)", "numpy.load"),
    ("from numpy import load\nload(f, allow_pickle=flag)", "numpy.load"),
    ("import os.path, marshal\nmarshal.loads(b)", "marshal.loads"),
    ("eval(text)", "eval"),
    ("import builtins\nbuiltins.exec(code)", "builtins.exec"),
  ],
)
def test_the_loader_scan_finds_every_import_form(snippet, name):
  assert [n for _, n in unsafe_calls(snippet)] == [name]


def test_the_loader_scan_passes_safe_calls():
  safe = (
    "import yaml, json, numpy as np\nfrom yaml import safe_load\nyaml.safe_load(t); safe_load(t)\n"
    "json.load(f); np.load(f); np.load(f, allow_pickle=False)\nfrom orbax import checkpoint\ncheckpoint.load(x)"
  )
  assert unsafe_calls(safe) == []


def test_no_loader_can_execute_code_from_a_file():
  """Checkpoints, configs and data are read with safetensors, orbax, JSON and yaml.safe_load only:
  no call in the package, the CLIs or the benchmarks can unpickle (or eval) a file's contents."""
  files = [
    ROOT / "train.py",
    *ROOT.glob("behemoth_jax/**/*.py"),
    *ROOT.glob("sharding/**/*.py"),
    *ROOT.glob("benchmarks/**/*.py"),
  ]
  offenders = [
    f"{path.relative_to(ROOT)}:{line}: {name}" for path in files for line, name in unsafe_calls(path.read_text())
  ]
  assert len(files) > 30 and not offenders, offenders
