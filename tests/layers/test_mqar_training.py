"""Every registered mixer trains: 200 MQAR steps at tiny size at least halve the loss.

The loss is the cross-entropy at the query positions only (lcm.train.loss_and_metrics), so
it starts near ln(vocab) = ln 16 = 2.77. Halving it needs the context: a model that only
learns which tokens are values sits at ln 8 = 2.08; a "copy one of the two context
values" guess reaches ln 2 = 0.69, and exact recall 0. The run goes through the real
trainer (lcm.train.Trainer: the LM, the optimizer with its parameter groups, the data
iterator), on one device. A new layer family is covered by registering it.

Measured when written (2 layers, d_model 32, vocab 16, seq 16, 2 pairs, batch 32, lr 1e-2;
loss of the last 10 steps / loss of the first 5): attention 0.006, swa 0.05, s4d 0.39,
mamba 0.23, mamba2 0.09, linear_attention 0.26, retnet 0.14, gla 0.28, deltanet 0.04,
gated_deltanet 0.10, based 0.002, jrt 0.26.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import mqar
from lcm import registry, train

STEPS = 200
SETTINGS = {
    "data.vocab_size": 16, "data.seq_len": 16, "data.num_kv_pairs": 2, "data.batch_size": 32,
    "model.d_model": 32, "model.num_layers": 2, "model.mlp_ratio": 2.0,
    "train.steps": STEPS, "train.warmup_steps": 10, "train.lr": 1e-2,
    "train.log_every": 1000, "train.eval_every": 1000, "train.checkpoint_every": 1000,
    "eval.num_examples": 16, "eval.batch_size": 8, "train.progress": False,
}
FAST_COMPILE = {"xla_backend_optimization_level": 1}
# Mixer fields that the tiny width or length needs (the rest are registry defaults).
MIXER_OVERRIDES: dict[str, dict] = {
    "memory_caching": {"segment_len": 4},  # the default 64 would never cache at seq 16
}


def _config(name: str):
  c = mqar.get_config(name)
  for key, value in SETTINGS.items():
    section, field = key.split(".")
    c[section][field] = value
  if name in MIXER_OVERRIDES:
    c.model.mixers[name] = MIXER_OVERRIDES[name]
  return c


@pytest.mark.parametrize("name", registry.names())
def test_200_mqar_steps_halve_the_loss(name):
  trainer = train.Trainer(_config(name), devices=jax.devices()[:1])
  params, opt_state = trainer.init_state()
  batches = trainer.train_iterator()
  batch = trainer.global_batch(next(batches))
  # The trainer's own jitted step, compiled at XLA backend level 1: at these sizes that
  # halves the compile (which dominates) and the steps run no slower.
  train_step = trainer.train_step.lower(params, opt_state, batch).compile(FAST_COMPILE)
  losses = []
  for _ in range(STEPS):
    params, opt_state, m = train_step(params, opt_state, batch)
    losses.append(float(m["loss"]))
    batch = trainer.global_batch(next(batches))
  assert np.all(np.isfinite(losses)), f"{name}: non-finite loss"
  first, last = float(np.mean(losses[:5])), float(np.mean(losses[-10:]))
  assert 2.5 < first < 3.5, f"{name}: initial loss {first:.3f} is not ~ln(16); wrong setup"
  assert last <= 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f} (ratio {last / first:.3f})"
