"""Mixers train: MQAR steps through the real trainer at tiny size at least halve the loss.

The loss is the cross-entropy at the query positions only (lcm.train.loss_and_metrics), so
it starts near ln(vocab) = ln 16 = 2.77. Halving it needs the context: a model that only
learns which tokens are values sits at ln 8 = 2.08; a "copy one of the two context
values" guess reaches ln 2 = 0.69, and exact recall 0. The run goes through the real
trainer (lcm.train.Trainer: the LM, the optimizer with its parameter groups, the data
iterator), on one device.

Two tests:

- In the suite (`make test`): one mixer per kernel family (IN_SUITE: softmax attention,
  the diagonal scan (mamba, with the `ssm` parameter group), the chunked linear recurrence
  with per-channel decays (gla), the delta rule (gated_deltanet), the neural-memory kernel
  (titans_mal)), a 1-layer model, 120 steps. Every registered mixer's gradient is checked
  against finite differences, and its parallel / step / packed forms against each other,
  in test_mixer_contract.py; MoM's auxiliary loss through the trainer in test_mom.py.
- `experiment` (deselected by `make test`; run it with
  `pytest -m experiment tests/layers/test_mqar_training.py`, ~7 minutes on one core): every
  registered mixer, 2 layers, 200 steps (a new layer family is covered by registering it).

Measured when written (d_model 32, vocab 16, seq 16, 2 pairs, batch 32, lr 1e-2; loss of
the last 10 steps / loss of the first 5). 2 layers, 200 steps: attention 0.006, swa 0.05,
s4d 0.39, mamba 0.23, mamba2 0.09, linear_attention 0.26, retnet 0.14, gla 0.28, deltanet
0.04, gated_deltanet 0.10, based 0.002, jrt 0.26. 1 layer, 120 steps: attention 0.35,
mamba 0.35, gla 0.44, gated_deltanet 0.22, titans_mal 0.17 (mom 0.17).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import mqar
from lcm import registry, train

SETTINGS = {
    "data.vocab_size": 16, "data.seq_len": 16, "data.num_kv_pairs": 2, "data.batch_size": 32,
    "model.d_model": 32, "model.mlp_ratio": 2.0,
    "train.warmup_steps": 10, "train.lr": 1e-2,
    "train.log_every": 1000, "train.eval_every": 1000, "train.checkpoint_every": 1000,
    "eval.num_examples": 16, "eval.batch_size": 8, "train.progress": False,
}
FAST_COMPILE = {"xla_backend_optimization_level": 1}
# Mixer fields that the tiny width or length needs (the rest are registry defaults).
MIXER_OVERRIDES: dict[str, dict] = {
    "memory_caching": {"segment_len": 4},  # the default 64 would never cache at seq 16
}
IN_SUITE = ("attention", "mamba", "gla", "gated_deltanet", "titans_mal")


def _config(name: str, num_layers: int, steps: int):
  c = mqar.get_config(name)
  for key, value in {**SETTINGS, "model.num_layers": num_layers, "train.steps": steps}.items():
    section, field = key.split(".")
    c[section][field] = value
  if name in MIXER_OVERRIDES:
    c.model.mixers[name] = MIXER_OVERRIDES[name]
  return c


def _check_mqar_training_halves_the_loss(name: str, num_layers: int, steps: int):
  trainer = train.Trainer(_config(name, num_layers, steps), devices=jax.devices()[:1])
  params, opt_state = trainer.init_state()
  batches = trainer.train_iterator()
  batch = trainer.global_batch(next(batches))
  # The trainer's own jitted step, compiled at XLA backend level 1: at these sizes that
  # halves the compile (which dominates) and the steps run no slower.
  train_step = trainer.train_step.lower(params, opt_state, batch).compile(FAST_COMPILE)
  losses = []
  for _ in range(steps):
    params, opt_state, m = train_step(params, opt_state, batch)
    losses.append(float(m["loss"]))
    batch = trainer.global_batch(next(batches))
  assert np.all(np.isfinite(losses)), f"{name}: non-finite loss"
  first, last = float(np.mean(losses[:5])), float(np.mean(losses[-10:]))
  assert 2.5 < first < 3.5, f"{name}: initial loss {first:.3f} is not ~ln(16); wrong setup"
  assert last <= 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f} (ratio {last / first:.3f})"


@pytest.mark.parametrize("name", IN_SUITE)
def test_120_mqar_steps_of_one_layer_halve_the_loss(name):
  _check_mqar_training_halves_the_loss(name, num_layers=1, steps=120)


@pytest.mark.experiment
@pytest.mark.parametrize("name", registry.names())
def test_200_mqar_steps_halve_the_loss(name):
  _check_mqar_training_halves_the_loss(name, num_layers=2, steps=200)
