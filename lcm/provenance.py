"""Provenance of a results file: the command and the git commit that produced it.

Every JSON under ``results/`` carries a ``provenance`` object made by :func:`record`::

    {"command": "python -m experiments.bench kernels --repeats=5 --out=results/bench_kernels",
     "commit": "<40 hex>", "dirty": false, "date": "2026-12-07T14:02:11Z",
     "code": ["kernels/chunked_scan", ...], "outputs": ["results/bench_kernels.png"]}

``code`` names the paths whose changes make the figures stale and ``outputs`` the other files
(plots, tables) the same command wrote; ``python -m experiments.check_results`` (``make
check-results``) compares ``commit`` with the last commit that touched ``code`` and lists every
results file that is stale or that no JSON accounts for.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import shlex
import subprocess
import sys
from typing import Any, Iterable, Mapping

ROOT = pathlib.Path(__file__).resolve().parent.parent

# What most results measure: the model code. Experiments add their own entry point.
DEFAULT_CODE = ("kernels", "layers", "lcm")


def git(*args: str, cwd: pathlib.Path = ROOT) -> str | None:
  """Output of ``git args`` in the repository (stripped), or None when git cannot answer."""
  try:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                         timeout=60)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def commit() -> str | None:
  """HEAD's commit hash, or None outside a git checkout."""
  return git("rev-parse", "HEAD")


def dirty(paths: Iterable[str] = DEFAULT_CODE) -> bool | None:
  """Whether ``paths`` have uncommitted changes (None when git cannot tell)."""
  out = git("status", "--porcelain", "--", *paths)
  return None if out is None else bool(out)


def command_line(argv: list[str] | None = None) -> str:
  """The command as a user would type it: ``python -m pkg.module args`` for a module run
  from this repository, else the interpreter's argv as given."""
  argv = list(sys.argv if argv is None else argv)
  if not argv:
    return "python"
  head = pathlib.Path(argv[0])
  try:
    rel = head.resolve().relative_to(ROOT)
  except (ValueError, OSError):
    rel = None
  if rel is not None and rel.suffix == ".py":
    parts = list(rel.with_suffix("").parts)
    if parts[-1] in ("__main__", "__init__"):
      parts = parts[:-1]
    return shlex.join(["python", "-m", ".".join(parts), *argv[1:]])
  return shlex.join(["python", *argv])


def record(code: Iterable[str] = DEFAULT_CODE, outputs: Iterable[str | os.PathLike] = (),
           command: str | None = None, **extra: Any) -> dict[str, Any]:
  """The ``provenance`` object of a results file written now, from this checkout."""
  code = sorted(set(code))
  out = [_repo_path(p) for p in outputs]
  rec = {
      "command": command or command_line(),
      "commit": commit(),
      "dirty": dirty(code),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
      "code": code,
      "outputs": sorted(out),
  }
  rec.update(extra)
  return rec


def attach(report: Mapping[str, Any] | list, **kwargs: Any) -> dict[str, Any]:
  """``report`` with a ``provenance`` entry first (a list becomes ``{"rows": list}``)."""
  body = {"rows": list(report)} if isinstance(report, list) else dict(report)
  body.pop("provenance", None)
  return {"provenance": record(**kwargs), **body}


def rows(report: Mapping[str, Any] | list) -> list:
  """The rows of a results file written by :func:`attach` from a list (or an old bare list)."""
  return list(report) if isinstance(report, list) else list(report["rows"])


def _repo_path(p: str | os.PathLike) -> str:
  path = pathlib.Path(p)
  try:
    return path.resolve().relative_to(ROOT).as_posix()
  except ValueError:
    return path.as_posix()
