"""The layout a newcomer relies on: small modules, no private names crossing modules, every
reference inside the repository, and docs/design.md naming every module."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("lcm", "layers", "kernels", "configs", "experiments", "tests")
MAX_LINES = 600


def _py_files():
  return sorted(p for d in PACKAGES for p in (ROOT / d).rglob("*.py"))


def _rel(p: pathlib.Path) -> str:
  return p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else p.as_posix()


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _first_party(module: str) -> bool:
  return module.split(".")[0] in PACKAGES


def private_uses(path: pathlib.Path) -> list[str]:
  """``from m import _x``, ``import m._x`` and ``m._x`` (m an imported first-party module)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  found, modules = [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if _first_party(a.name) and any(_private(x) for x in a.name.split(".")):
          found.append(f"{_rel(path)}:{node.lineno}: import {a.name}")
        if _first_party(a.name):
          modules[a.asname or a.name.split(".")[0]] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if not _first_party(node.module):
        continue
      for a in node.names:
        if _private(a.name) or any(_private(x) for x in node.module.split(".")):
          found.append(f"{_rel(path)}:{node.lineno}: from {node.module} import {a.name}")
        modules[a.asname or a.name] = f"{node.module}.{a.name}"
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in modules and _private(node.attr)):
      found.append(f"{_rel(path)}:{node.lineno}: {node.value.id}.{node.attr}")
  return found


def test_no_source_file_over_600_lines():
  long = {_rel(p): n for p in _py_files()
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_no_module_uses_a_private_name_of_another_module():
  found = [f for p in _py_files() for f in private_uses(p)]
  assert not found, "\n".join(found)


def test_the_private_name_check_can_fail(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from layers.common import _x\nimport kernels.common as kc\nkc._y\n"
                 "from lcm import registry\nregistry._TABLE\nimport jax._src\n")
  assert [f.split(": ", 1)[1] for f in private_uses(bad)] == [
      "from layers.common import _x", "kc._y", "registry._TABLE"]


def _text_files():
  for p in sorted(ROOT.rglob("*")):
    parts = set(p.relative_to(ROOT).parts)
    if parts & {".git", ".venv", "runs", "results", "lcm.egg-info", "__pycache__",
                ".pytest_cache"} or not p.is_file():
      continue
    if p.suffix in {".py", ".md", ".ipynb", ".cfg", ".toml", ".txt"} or p.name == "Makefile":
      yield p


def test_no_reference_points_outside_the_repository():
  """The design page and the session notes moved into docs/ (design.md, CHANGELOG.md); the
  team folder beside the repository is not part of a clone."""
  pattern = re.compile(r"\.\./shared|(?<![\w/])DESIGN\.md|(?<![\w/])NOTES\.md")
  found = [f"{_rel(p)}:{i}: {line.strip()[:100]}"
           for p in _text_files() if p != pathlib.Path(__file__).resolve()
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if pattern.search(line)]
  assert not found, "\n".join(found)


@pytest.mark.parametrize("doc", ["design.md", "numerics.md", "performance.md",
                                 "known-issues.md"])
def test_docs_exist(doc):
  assert len((ROOT / "docs" / doc).read_text().splitlines()) > 20


def test_design_names_every_module_and_both_contracts():
  design = (ROOT / "docs" / "design.md").read_text()
  assert "## The mixer contract" in design and "## The kernel contract" in design
  missing = []
  for d in ("lcm", "layers", "kernels", "configs", "experiments"):
    for p in sorted((ROOT / d).rglob("*.py")):
      rel = p.relative_to(ROOT)
      # the full path, or the path inside its top-level package (a tree under "lcm/")
      inner = rel.relative_to(rel.parts[0])
      if p.name == "__init__.py":
        names = [rel.parent.as_posix() + "/", inner.parent.as_posix() + "/"]
      else:
        names = [rel.as_posix(), inner.as_posix()]
      if not any(n in design for n in names):
        missing.append(rel.as_posix())
  assert not missing, f"docs/design.md does not name: {missing}"
