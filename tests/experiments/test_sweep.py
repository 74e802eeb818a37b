"""experiments.sweep: grid parsing, overrides, resumption and the table (a fake trainer)."""

from __future__ import annotations

import csv
import json
import os

import pytest

from configs import mqar
from experiments import sweep
from layers.common import ConfigError


def test_parse_grid_types_values_like_the_config():
  base = mqar.get_config()
  grid = sweep.parse_grid("model.d_model=32, 64;train.lr=1e-3,3e-3;model.pattern=swa,attention"
                          "|mamba2;model.remat=false", base)
  assert grid == {"model.d_model": [32, 64], "train.lr": [1e-3, 3e-3],
                  "model.pattern": ["swa,attention", "mamba2"], "model.remat": [False]}
  with pytest.raises(ConfigError, match="model.nope"):
    sweep.parse_grid("model.nope=1", base)
  with pytest.raises(ConfigError, match="model.d_model"):
    sweep.parse_grid("model.d_model=wide", base)
  with pytest.raises(ConfigError, match="grid"):
    sweep.parse_grid("model.d_model", base)


def test_expand_grid_and_overrides():
  points = sweep.expand_grid({"a.x": [1, 2], "b": ["p", "q", "r"]})
  assert points[0] == {"a.x": 1, "b": "p"} and points[-1] == {"a.x": 2, "b": "r"}
  assert len(points) == 6
  base = mqar.get_config()
  c = sweep.apply_overrides(base, {"model.d_model": 32, "train.lr": 0.01})
  assert (c.model.d_model, c.train.lr) == (32, 0.01)
  assert base.model.d_model == 64  # the base is not modified
  assert sweep.point_name({"model.pattern": "swa,attention", "train.lr": 0.01}) == \
      "pattern=swa_attention+lr=0.01"


def test_run_grid_resumes_and_writes_the_table(tmp_path):
  calls = []

  def fake_train(c, workdir):
    calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    acc = [0.2, 0.9, 0.7] if c.model.d_model == 64 else [0.1, 0.3, 0.5]
    with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
      for i, a in enumerate(acc):
        f.write(json.dumps({"step": 10 * (i + 1), "split": "eval", "accuracy": a}) + "\n")
        f.write(json.dumps({"step": 10 * (i + 1), "split": "train", "accuracy": 1.0}) + "\n")
    s = {"steps": c.train.steps, "eval_accuracy": acc[-1], "eval_loss": 1.0,
         "num_params": 10, "state_size": 5, "tokens_per_second": 1.0, "config": {}}
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(s, f)
    return s

  base = mqar.get_config()
  points = sweep.expand_grid({"model.d_model": [32, 64]})
  rows = sweep.run_grid(base, points, str(tmp_path), train_fn=fake_train, log=lambda s: None)
  assert len(calls) == 2
  assert [r["best_accuracy"] for r in rows] == [0.5, 0.9]
  assert [r["best_step"] for r in rows] == [30, 20]
  # Finished points are not trained again; a changed step count is.
  again = sweep.run_grid(base, points, str(tmp_path), train_fn=fake_train, log=lambda s: None)
  assert len(calls) == 2 and again == rows
  longer = sweep.apply_overrides(base, {"train.steps": base.train.steps + 1})
  sweep.run_grid(longer, points[:1], str(tmp_path), train_fn=fake_train, log=lambda s: None)
  assert len(calls) == 3

  md = sweep.write_table(rows, str(tmp_path / "out" / "t"), ["model.d_model"], title="T")
  assert "| d_model | best_accuracy |" in md and "| 64 | 0.9 | 20 |" in md
  with open(tmp_path / "out" / "t.csv", encoding="utf-8") as f:
    got = list(csv.DictReader(f))
  assert [float(r["best_accuracy"]) for r in got] == [0.5, 0.9]


def test_a_failing_run_is_reported_and_the_sweep_goes_on(tmp_path):
  trained, logs = [], []

  def flaky_train(c, workdir):
    if c.model.d_model == 32:
      raise FloatingPointError("loss is nan at step 1")
    trained.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    s = {"steps": c.train.steps, "eval_accuracy": 0.75, "eval_loss": 1.0, "config": {}}
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(s, f)
    return s

  points = sweep.expand_grid({"model.d_model": [32, 64]})
  rows = sweep.run_grid(mqar.get_config(), points, str(tmp_path), train_fn=flaky_train,
                        log=logs.append)
  assert len(trained) == 1  # the point after the failure still ran
  assert rows[0]["best_accuracy"] is None
  assert rows[0]["error"] == "FloatingPointError: loss is nan at step 1"
  assert rows[1]["best_accuracy"] == 0.75 and "error" not in rows[1]
  assert any("d_model=32: FAILED" in line for line in logs)


def test_a_preempted_run_stops_the_sweep(tmp_path):
  """SIGTERM during a run: the run checkpoints and returns ``preempted``; the sweep exits 0
  instead of starting the next point."""
  trained, logs = [], []

  def preempted_train(c, workdir):
    trained.append(workdir)
    return {"preempted": True, "signal": "SIGTERM", "step": 3, "steps": c.train.steps}

  points = sweep.expand_grid({"model.d_model": [32, 64]})
  with pytest.raises(SystemExit) as e:
    sweep.run_grid(mqar.get_config(), points, str(tmp_path), train_fn=preempted_train,
                   log=logs.append)
  assert e.value.code == 0 and len(trained) == 1
  assert any("stopped by SIGTERM at step 3; the sweep stops" in line for line in logs)
