"""Every measured figure in the README's Results table is in the results files that row names.

A figure is a number with a decimal point, or a number with a unit (``ms``, ``s``, ``x``,
``%``, ``MB``, ``kB``, ``GFLOP/s``) in the row's *result* column. It passes when some number
in the row's files (JSON leaves, or numbers in the text of md / csv / json files) rounds to
it at the precision printed (a percentage may also be a fraction, a ratio may also be the
quotient of two numbers of the file). Figures that are derived in words (a difference of
two table entries, say) are listed in ``DERIVED`` with how they are derived. A figure that
drifts from its results file fails here.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (row key, figure) -> how it is derived from the row's files
DERIVED = {
    ("Set disjointness", "8.4"): "jrt short-first 0.835 minus long-first 0.751, in points",
}

FIGURE = re.compile(r"(?<![\w.\-^])(\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?)"
                    r"(?:\s?(ms|s|x|%|MB|kB|GFLOP/s)\b|(?=\s?%))?")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def _cells(line: str) -> list[str]:
  return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def results_rows():
  text = (ROOT / "README.md").read_text()
  table = text[text.index("\n## Results"):]
  table = table[:table.index("\n## ", 5)]
  rows = [_cells(l) for l in table.splitlines() if l.startswith("| ") and "---" not in l]
  return rows[1:]  # the header


def _files(cell: str) -> list[pathlib.Path]:
  out = []
  for token in re.findall(r"`([^`]+)`", cell):
    token = token.rstrip("/")
    if token.startswith("results/"):
      out.extend(sorted(ROOT.glob(token.replace("*", "*"))) or [ROOT / token])
    elif token.startswith(".") and out:  # `.png` after a results file: the same stem
      out.append(out[-1].with_suffix(token))
  files = []
  for p in out:
    if p.is_dir():
      files.extend(sorted(q for q in p.rglob("*") if q.suffix in {".json", ".md", ".csv"}))
    elif p.exists():
      files.append(p)
  return files


def _numbers(path: pathlib.Path) -> set[float]:
  text = path.read_text(errors="replace")
  nums = {float(m.replace(",", "")) for m in re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?",
                                                          text)}
  if path.suffix == ".json":
    def walk(x):
      if isinstance(x, bool):
        return
      if isinstance(x, (int, float)):
        nums.add(float(x))
      elif isinstance(x, dict):
        for v in x.values():
          walk(v)
      elif isinstance(x, list):
        for v in x:
          walk(v)
    walk(json.loads(text))
  return nums


def _tolerance(figure: str) -> float:
  """Half a unit of the last printed digit (``4.8e-3`` -> 0.05e-3)."""
  mantissa, _, exp = figure.replace(",", "").partition("e")
  d = len(mantissa.split(".")[1]) if "." in mantissa else 0
  return 0.5 * 10 ** (-d + (int(exp) if exp else 0)) * (1 + 1e-9)


def _matches(figure: str, unit: str | None, values: set[float]) -> bool:
  x = float(figure.replace(",", ""))
  tol = _tolerance(figure)
  candidates = set(values)
  if unit == "%":
    candidates |= {100 * v for v in values}
  if unit in {"ms", "s"}:
    candidates |= {1000 * v for v in values} | {v / 1000 for v in values}
  if unit == "MB":
    candidates |= {v / 1e6 for v in values} | {v / 2 ** 20 for v in values}
  if unit == "kB":
    candidates |= {v / 1e3 for v in values} | {v / 2 ** 10 for v in values}
  if any(abs(v - x) <= tol for v in candidates):
    return True
  if unit == "x":  # a ratio of two figures of the file
    small = [v for v in values if v > 0]
    return any(abs(a / b - x) <= tol for a, b in itertools.permutations(small[:400], 2))
  return False


def _rows_with_files():
  return [r for r in results_rows() if _files(r[3])]


def test_rows_without_a_results_file_cite_a_test_and_quote_only_its_threshold():
  """A row may cite a test instead of a results file (S4D digits); its command must then be
  that pytest file, which exists, and its result cell must quote that test's assertion."""
  rows = [r for r in results_rows() if not _files(r[3])]
  assert [r[0][:20] for r in rows] == ["S4D on sequential 8x"]
  for row in rows:
    path = re.search(r"pytest (tests/\S+\.py)", row[1]).group(1)
    source = (ROOT / path).read_text()
    assert "the test's assertion" in row[2] and "accuracy > 0.90" in source


@pytest.mark.parametrize("row", _rows_with_files(), ids=lambda r: r[0][:40])
def test_every_figure_in_the_results_table_is_in_its_results_files(row):
  experiment, _, result, files_cell = row[0], row[1], row[2], row[3]
  files = _files(files_cell)
  values = set().union(*(_numbers(f) for f in files))
  missing = []
  for m in FIGURE.finditer(result):
    figure, unit = m.group(1), m.group(2)
    if unit is None and m.group(0).rstrip().endswith("%"):
      unit = "%"
    if "." not in figure and "e" not in figure and unit is None:
      continue  # an integer without a unit: a count or a setting, not a measurement
    if any(experiment.startswith(k) and figure == f for k, f in DERIVED):
      continue
    if not _matches(figure, unit, values):
      missing.append(f"{figure}{unit or ''}")
  assert not missing, (f"{experiment[:60]}: figures not found in "
                       f"{[f.relative_to(ROOT).as_posix() for f in files]}: {missing}")


# Thresholds the README states (not measurements): allowed anywhere.
STATED = {"2e-6", "5e-6"}


def test_every_figure_anywhere_in_the_readme_is_in_some_results_file():
  """A weaker check over the whole README (prose, other tables; code blocks excluded): each
  measured figure must be in some results file."""
  files = [p for p in (ROOT / "results").rglob("*") if p.suffix in {".json", ".md", ".csv"}]
  values = set().union(*(_numbers(f) for f in files))
  text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.S)
  missing = []
  for i, line in enumerate(text.splitlines(), 1):
    for m in FIGURE.finditer(line):
      figure, unit = m.group(1), m.group(2)
      if unit is None and m.group(0).rstrip().endswith("%"):
        unit = "%"
      if ("." not in figure and "e" not in figure and unit is None) or figure in STATED:
        continue
      if not _matches(figure, unit, values):
        missing.append(f"line {i}: {figure}{unit or ''}")
  assert not missing, missing
