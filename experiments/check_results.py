"""Lists the results files that are older than the code they measure (``make check-results``).

    python -m experiments.check_results [--results=results]

Every JSON under ``results/`` carries a ``provenance`` object (``lcm/provenance.py``): the
command and the commit that produced it, the code paths its figures depend on (``code``) and
the other files the same command wrote (``outputs``). A file is reported when

* ``stale``: a commit after the recorded one touched one of its ``code`` paths (the recorded
  commit is not a descendant of ``git log -1 -- <code>``), or it was made from uncommitted
  code (``dirty``), or its commit is not in this repository's history;
* ``no provenance``: a JSON without a ``provenance`` object (or without command / commit);
* ``unaccounted``: a file no JSON's ``outputs`` names (a plot or table whose origin is lost).

Prints one line per reported file with the command that regenerates it, and exits 1 when
anything is reported (0 when every file is current). Not part of ``make test``: results go
stale by design whenever the code moves on; this tells you which.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from absl import flags

from experiments import cli
from lcm import provenance



def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The flags, in ``fv`` (a fresh one per :func:`cli_main` call)."""
  global _RESULTS
  _RESULTS = flags.DEFINE_string("results", "results", "Results folder (relative to the "
                                 "repo).", flag_values=fv)


def _check() -> None:
  folder = _RESULTS.value
  if not folder.strip():
    raise cli.CommandLineError("--results is empty; give the results folder, relative to the "
                               "repository (default: results)")
  path = provenance.ROOT / folder
  if not path.exists():
    raise cli.CommandLineError(f"--results={folder}: {path} does not exist; give a folder of "
                               "the repository that holds results (default: results)")
  if not path.is_dir():
    raise cli.CommandLineError(f"--results={folder}: {path} is a file, not a folder")


@dataclasses.dataclass(frozen=True)
class Finding:
  path: str
  status: str  # "stale", "no provenance", "unaccounted", "current"
  detail: str = ""
  command: str = ""


def _load(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    return e


def _is_ancestor(old: str, new: str, root: pathlib.Path) -> bool | None:
  """Whether ``old`` is ``new`` or one of its ancestors (None: unknown commit)."""
  if provenance.git("cat-file", "-e", f"{new}^{{commit}}", cwd=root) is None:
    return None
  return provenance.git("merge-base", "--is-ancestor", old, new, cwd=root) is not None


def check(root: pathlib.Path = provenance.ROOT, results: str = "results") -> list[Finding]:
  """Every file under ``root / results`` with its status (see the module docstring)."""
  folder = root / results
  files = sorted(p for p in folder.rglob("*") if p.is_file())
  rel = lambda p: p.relative_to(root).as_posix()
  owned: set[str] = set()
  findings: list[Finding] = []
  for path in files:
    if path.suffix != ".json":
      continue
    data = _load(path)
    prov = data.get("provenance") if isinstance(data, dict) else None
    if not isinstance(prov, dict) or not prov.get("command") or not prov.get("commit"):
      why = f"unreadable: {data}" if isinstance(data, Exception) else "no provenance object"
      findings.append(Finding(rel(path), "no provenance", why))
      continue
    owned.add(rel(path))
    outputs = [str(o) for o in prov.get("outputs", [])]
    owned.update(outputs)
    code = [str(c) for c in prov.get("code", [])] or list(provenance.DEFAULT_CODE)
    last = provenance.git("log", "-1", "--format=%H", "--", *code, cwd=root)
    recorded = str(prov["commit"])
    status, detail = "current", f"commit {recorded[:10]}"
    ancestor = _is_ancestor(last, recorded, root) if last else True
    if ancestor is None:
      status, detail = "stale", f"commit {recorded[:10]} is not in this repository's history"
    elif not ancestor:
      status, detail = "stale", (f"made at {recorded[:10]}; {', '.join(code)} changed since "
                                 f"(last at {last[:10]})")
    elif prov.get("dirty"):
      status, detail = "stale", f"made from uncommitted changes on top of {recorded[:10]}"
    for p in [rel(path), *outputs]:
      findings.append(Finding(p, status, detail, str(prov["command"])))
      if p != rel(path) and not (root / p).exists():
        findings[-1] = Finding(p, "stale", f"named by {rel(path)} but missing",
                               str(prov["command"]))
  for path in files:
    if path.suffix != ".json" and rel(path) not in owned:
      findings.append(Finding(rel(path), "unaccounted", "no results JSON names it as an output"))
  return findings


def main(argv):
  del argv
  findings = check(provenance.ROOT, _RESULTS.value)
  bad = [f for f in findings if f.status != "current"]
  current = len(findings) - len(bad)
  for f in sorted(bad, key=lambda f: (f.status, f.path)):
    line = f"{f.status:13s} {f.path}: {f.detail}"
    print(line + (f"\n{'':14s}regenerate: {f.command}" if f.command else ""))
  print(f"{current} results files current, {len(bad)} stale / without provenance / "
        f"unaccounted")
  return 1 if bad else 0


def cli_main(argv=None) -> int:
  """``python -m experiments.check_results`` in-process: 0 all current, 1 something reported,
  2 bad input (one line on stderr, experiments/cli.py)."""
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


if __name__ == "__main__":
  sys.exit(cli_main(sys.argv))
