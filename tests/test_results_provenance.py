"""Every results file carries (or is named by) a provenance: the command and the commit that
produced it (lcm.provenance, experiments.check_results). Stale results are allowed: they go
stale whenever the code moves on; what may not happen is a results file whose origin is lost."""

from __future__ import annotations

import json
import re

import pytest

from experiments import check_results
from lcm import provenance

ROOT = provenance.ROOT
RESULTS = ROOT / "results"
JSONS = sorted(RESULTS.rglob("*.json"))
IN_GIT = provenance.commit() is not None

needs_git = pytest.mark.skipif(not IN_GIT, reason="not a git checkout")


def test_there_are_results():
  assert len(JSONS) >= 20


@needs_git
@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.relative_to(RESULTS).as_posix())
def test_results_json_has_provenance(path):
  data = json.loads(path.read_text(encoding="utf-8"))
  assert isinstance(data, dict) and list(data)[0] == "provenance", "provenance comes first"
  prov = data["provenance"]
  assert isinstance(prov["command"], str) and prov["command"].strip()
  assert re.fullmatch(r"[0-9a-f]{40}", prov["commit"]), prov["commit"]
  assert provenance.git("cat-file", "-e", f"{prov['commit']}^{{commit}}") is not None, (
      f"commit {prov['commit']} is not in this repository's history")
  assert isinstance(prov["dirty"], bool)
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", prov["date"]), prov["date"]
  assert prov["code"] and all((ROOT / c).exists() for c in prov["code"]), prov["code"]
  for out in prov["outputs"]:
    assert out.startswith("results/") and (ROOT / out).is_file(), out


@needs_git
def test_check_results_finds_every_file_owned():
  findings = check_results.check()
  bad = [f"{f.status}: {f.path} ({f.detail})" for f in findings
         if f.status in ("no provenance", "unaccounted") or "missing" in f.detail]
  assert not bad, "\n".join(bad)
  every = {p.relative_to(ROOT).as_posix() for p in RESULTS.rglob("*") if p.is_file()}
  assert {f.path for f in findings} == every


def test_sweep_writes_json_with_provenance_and_outputs(tmp_path):
  """A writer (experiments.sweep's table) stamps its JSON with the provenance of this
  checkout, naming the csv / md it wrote beside it, and keeps the rows."""
  from experiments import sweep  # pylint: disable=import-outside-toplevel
  rows = [{"model.d_model": 32, "workdir": "runs/x/d_model=32", "best_accuracy": 0.5,
           "best_step": 30, "bad_checkpoints": []},
          {"model.d_model": 64, "workdir": "runs/x/d_model=64", "best_accuracy": None,
           "best_step": None, "error": "FloatingPointError: nan"}]
  out = str(tmp_path / "tables" / "sweep")
  sweep.write_table(rows, out, ["model.d_model"])
  written = sweep.write_json(rows, out, outputs=[out + ".csv", out + ".md"])
  with open(out + ".json", encoding="utf-8") as f:
    report = json.load(f)
  assert report == written
  assert list(report) == ["provenance", "rows"]
  prov = report["provenance"]
  assert set(prov) == {"command", "commit", "dirty", "date", "code", "outputs"}
  assert prov["command"].startswith("python")
  assert prov["commit"] == provenance.commit()
  assert prov["code"] == sorted(sweep.CODE)
  assert prov["outputs"] == sorted([out + ".csv", out + ".md"])
  assert all((tmp_path / "tables" / name).is_file() for name in ("sweep.csv", "sweep.md"))
  assert provenance.rows(report) == rows


def test_provenance_names_the_commit_the_run_started_from(monkeypatch):
  """Commits that land while a long benchmark runs do not relabel its results: the record
  keeps the start commit (and its uncommitted files) and adds the HEAD at writing."""
  monkeypatch.setattr(provenance, "_START", {"commit": "a" * 40,
                                             "status": " M layers/landmark.py\n?? notes.txt\n"})
  monkeypatch.setattr(provenance, "commit", lambda: "b" * 40)
  monkeypatch.setattr(provenance, "dirty", lambda paths: False)
  rec = provenance.record(code=["layers", "kernels"])
  assert rec["commit"] == "a" * 40 and rec["commit_at_write"] == "b" * 40
  assert rec["dirty"] is True  # layers/ had uncommitted changes when it started
  assert provenance.record(code=["kernels"])["dirty"] is False
