"""experiments.extrapolation: length parsing, and a tiny trained run evaluated at 2 lengths
(the training length reproduces the run's own final evaluation)."""

from __future__ import annotations

import json
import math
import os

import jax
import pytest

from experiments import extrapolation
from layers.common import ConfigError
from lcm import train
from tests.lcm.test_train import tiny_config


def test_parse_lengths():
  assert extrapolation.parse_lengths("1x,2x,4x", 32) == [32, 64, 128]
  assert extrapolation.parse_lengths("1x, 100,0.5x,32", 32) == [32, 100, 16]
  assert extrapolation.parse_lengths(["48", "2x"], 24) == [48]
  for bad in ("", "abc", "0", "-2x", "0.3x"):
    with pytest.raises(ConfigError, match="lengths"):
      extrapolation.parse_lengths(bad, 32)


def test_extrapolate_matches_the_runs_own_eval(tmp_path):
  workdir = str(tmp_path / "run")
  c = tiny_config(**{"train.steps": 30, "train.lr": 3e-3, "eval.num_examples": 32,
                     "eval.batch_size": 16})
  summary = train.run(c, workdir, devices=jax.devices()[:1])  # not the suite's 8 devices

  result = extrapolation.extrapolate(workdir, "1x,2x")
  assert result["lengths"] == [32, 64] and result["multiples"] == [1.0, 2.0]
  assert result["train_len"] == 32 and result["step"] == 30 and result["task"] == "mqar"
  assert result["examples"] == 32 and result["batch_size"] == 16
  assert all(math.isfinite(x) for x in result["loss"] + result["accuracy"])
  assert all(0.0 <= a <= 1.0 for a in result["accuracy"])
  # MQAR keeps its 4 pairs at any length: 4 queries per example are scored.
  assert result["tokens"] == [32 * 4, 32 * 4]
  # Same held-out examples at the training length: the run's own final evaluation.
  assert result["loss"][0] == pytest.approx(summary["eval_loss"], rel=1e-6, abs=1e-6)
  assert result["accuracy"][0] == pytest.approx(summary["eval_accuracy"], abs=1e-6)
  assert result["run_eval_loss"] == summary["eval_loss"]
  # The longer length is a different input (more filler), so a different loss.
  assert result["loss"][1] != result["loss"][0]

  out = str(tmp_path / "res" / "x")
  extrapolation.plot(result, out + ".png")
  assert os.path.getsize(out + ".png") > 1000
  text = extrapolation.table(result)
  assert "| 64 | 2 |" in text and f"{result['loss'][1]:.4f}" in text
  json.dumps(result)  # serialisable as written by main()
