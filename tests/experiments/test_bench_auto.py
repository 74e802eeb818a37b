"""experiments.bench.auto: the candidates, the class winners and the report at toy sizes (no
timing claims)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments.bench import auto
from kernels import common as kernel_common

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_candidates_per_backend():
  assert auto.candidates("cpu") == ("reference", "xla")  # interpret-mode Pallas is not one
  assert auto.candidates("tpu") == ("reference", "xla", "pallas_tpu")
  assert auto.candidates("gpu") == ("reference", "xla", "pallas_gpu")


def test_cases_cover_both_classes_of_every_kernel():
  for kernel in auto.KERNELS:
    classes = {kernel_common.shape_class(t) for _, t, _ in auto.cases(kernel, 1024, 16384)}
    assert classes == {"short", "long"}, kernel
  with pytest.raises(ValueError, match="unknown kernel"):
    auto.cases("nope", 1024, 16384)


def test_class_winner_is_the_geomean_among_candidates_timed_everywhere():
  row = lambda cls, ms, winner: {"class": cls, "winner": winner,
                                 "impls": {i: ({"ms": m} if m else {"skipped": "x"})
                                           for i, m in ms.items()}}
  rows = [row("short", {"reference": 1.0, "xla": 4.0}, "reference"),
          row("short", {"reference": 9.0, "xla": 4.0}, "xla"),  # geomeans 3 vs 4
          row("long", {"reference": 1.0, "xla": 8.0}, "reference"),
          row("long", {"reference": None, "xla": 8.0}, "xla")]  # reference skipped once
  c = auto.class_winners(rows, ("reference", "xla"))
  assert c["short"]["winner"] == "reference" and not c["short"]["unanimous"]
  assert c["short"]["geomean_ms"] == pytest.approx({"reference": 3.0, "xla": 4.0})
  assert c["short"]["geomean_ratio_vs_winner"]["xla"] == pytest.approx(4 / 3)
  assert c["long"]["winner"] == "xla" and c["long"]["eligible"] == ["xla"]


def test_command_writes_winners_with_provenance(tmp_path):
  out = tmp_path / "bench_auto"
  argv = [sys.executable, "-m", "experiments.bench", "auto", "--auto_ops=diag_scan",
          "--auto_short_len=16", "--auto_long_len=32", "--repeats=1", "--nohuge_pages",
          f"--out={out}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
  with open(f"{out}.json", encoding="utf-8") as f:
    report = json.load(f)
  assert list(report)[0] == "provenance"
  prov = report["provenance"]
  assert set(prov) == {"command", "commit", "dirty", "date", "code", "outputs"}
  assert prov["command"].startswith("python -m experiments.bench auto")
  assert prov["code"] == ["experiments/bench", "kernels"] and prov["outputs"] == []
  assert report["repeats"] == 1 and len(report["load_average"]["end"]) == 3
  r = report["result"]
  assert set(r["winners"]) == {"diag_scan"}
  assert r["winners"]["diag_scan"]["cpu"]["short"] in ("reference", "xla")  # T=16, 32
  cases = r["kernels"]["diag_scan"]["cases"]
  assert {c["T"] for c in cases} == {16, 32} and all(c["class"] == "short" for c in cases)
  for c in cases:
    assert set(c["impls"]) == {"reference", "xla"}
    assert all(p["ms"] > 0 and p["runs"] == 1 for p in c["impls"].values())
    assert c["ms_ratio_vs_winner"][c["winner"]] == 1.0
