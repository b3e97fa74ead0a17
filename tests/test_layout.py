"""The package's shape: imports point one way (docs/ARCHITECTURE.md §8), with no cycle between modules
or between packages, and no library module imports the train.py script."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("behemoth_jax", "sharding")


def _modules() -> dict[str, Path]:
  out = {"train": ROOT / "train.py"}
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _is_type_checking(node: ast.If) -> bool:
  test = node.test
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
  )


def _imports(path: Path, name: str, modules: dict) -> set[str]:
  """Project modules `path` imports at run time (anywhere in the file, functions included; not under
  `if TYPE_CHECKING:`). `from pkg import x` counts x when x is a module, else pkg."""
  found = set()
  is_package = path.name == "__init__.py"

  def visit(node):
    if isinstance(node, ast.If) and _is_type_checking(node):
      for child in node.orelse:
        visit(child)
      return
    if isinstance(node, ast.Import):
      for a in node.names:
        found.add(a.name)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        pkg = name.split(".") if is_package else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join(pkg + ([base] if base else []))
      for a in node.names:
        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(ast.parse(path.read_text()))
  out = set()
  for imp in found:  # the longest project module that the import names
    parts = imp.split(".")
    for i in range(len(parts), 0, -1):
      if ".".join(parts[:i]) in modules:
        out.add(".".join(parts[:i]))
        break
  out.discard(name)
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      strong(v)
  return out


def _package(module: str, graph: dict) -> str:
  """The package a module belongs to for the package graph: its subpackage (behemoth_jax.model, …,
  sharding); a module directly in behemoth_jax is a node of its own (the base: config, cli, …; and
  the thin entry-point aliases)."""
  parts = module.split(".")
  if parts[0] == "sharding":
    return "sharding"
  if (
    parts[0] == "behemoth_jax"
    and len(parts) >= 2
    and f"behemoth_jax.{parts[1]}" in graph
    and (ROOT / "behemoth_jax" / parts[1]).is_dir()
  ):
    return f"behemoth_jax.{parts[1]}"
  return module


def test_the_cycle_finder_finds_cycles():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules():
  assert _cycles(_graph()) == []


def test_no_import_cycle_between_packages():
  graph = _graph()
  packages = defaultdict(set)
  for mod, deps in graph.items():
    for dep in deps:
      a, b = _package(mod, graph), _package(dep, graph)
      if a != b:
        packages[a].add(b)
  assert _cycles(packages) == [], dict(packages)


def test_imports_point_one_way():
  graph = _graph()
  offenders = [
    f"{m} imports {d}"
    for m, deps in graph.items()
    for d in deps
    if (d == "train" and m != "train")  # a library never imports the script
    or (m.startswith("sharding") and d.startswith("behemoth_jax"))  # sharding knows no model
    or (m.startswith("behemoth_jax.model") and d.startswith("sharding") and d != "sharding.axes")
  ]
  assert offenders == []
  assert len(graph) > 40 and graph["train"]  # the walk saw the project
