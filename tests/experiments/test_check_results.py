"""experiments.check_results on a throw-away git repository: current, stale (code changed
after the recorded commit, or made from uncommitted code), unknown commit, no provenance,
unaccounted files, missing outputs."""

import json
import pathlib
import subprocess

from experiments import check_results


def _git(root, *args):
  return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True,
                        text=True).stdout.strip()


def _commit(root, message):
  _git(root, "add", "-A")
  _git(root, "commit", "-qm", message)
  return _git(root, "rev-parse", "HEAD")


def _write(path: pathlib.Path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _prov(commit, code, outputs=(), dirty=False):
  return {"provenance": {"command": "python -m experiments.x", "commit": commit,
                         "dirty": dirty, "code": list(code), "outputs": list(outputs)}}


def test_check_results_classifies_every_file(tmp_path):
  root = tmp_path
  _git(root, "init", "-q")
  _git(root, "config", "user.email", "t@t")
  _git(root, "config", "user.name", "t")
  _write(root / "kernels" / "op.py", "x = 1\n")
  _write(root / "layers" / "mix.py", "y = 1\n")
  old = _commit(root, "code")
  _write(root / "kernels" / "op.py", "x = 2\n")  # kernels change after `old`
  new = _commit(root, "kernels change")
  res = root / "results"
  _write(res / "fresh.json", _prov(new, ["kernels"], ["results/fresh.png"]))
  _write(res / "fresh.png", "png")
  _write(res / "layers_only.json", _prov(old, ["layers"]))  # layers unchanged since `old`
  _write(res / "old.json", _prov(old, ["kernels"], ["results/old.md", "results/gone.png"]))
  _write(res / "old.md", "table")
  _write(res / "dirty.json", _prov(new, ["kernels"], dirty=True))
  _write(res / "alien.json", _prov("0" * 40, ["kernels"]))
  _write(res / "bare.json", [{"accuracy": 1.0}])
  _write(res / "sub" / "orphan.png", "png")
  got = {f.path: f.status for f in check_results.check(root, "results")}
  assert got == {
      "results/fresh.json": "current", "results/fresh.png": "current",
      "results/layers_only.json": "current",
      "results/old.json": "stale", "results/old.md": "stale", "results/gone.png": "stale",
      "results/dirty.json": "stale", "results/alien.json": "stale",
      "results/bare.json": "no provenance", "results/sub/orphan.png": "unaccounted",
  }
  details = {f.path: f.detail for f in check_results.check(root, "results")}
  assert "missing" in details["results/gone.png"]
  assert "kernels changed since" in details["results/old.json"]
