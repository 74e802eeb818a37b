"""The learning-rate schedule itself: linear warmup from 0 to ``lr`` over ``warmup_steps``
updates, then cosine decay to ``lr * min_lr_ratio`` at ``steps``; and the optimizer applies
the value of update k at update k (checked through AdamW's first steps)."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcm import config as config_lib
from lcm import train

LR, WARMUP, STEPS, MIN_RATIO = 0.01, 10, 110, 0.1


def train_cfg(**kw):
  c = config_lib.base_config().train
  c.lr, c.warmup_steps, c.steps, c.min_lr_ratio = LR, WARMUP, STEPS, MIN_RATIO
  for k, v in kw.items():
    c[k] = v
  return c


def test_schedule_values_at_warmup_start_end_and_decay_end():
  s = train.lr_schedule(train_cfg())
  assert float(s(0)) == 0.0  # optax counts updates from 0: the first update uses lr 0
  np.testing.assert_allclose(float(s(1)), LR / WARMUP, rtol=1e-6)
  np.testing.assert_allclose(float(s(2)), 2 * LR / WARMUP, rtol=1e-6)
  np.testing.assert_allclose(float(s(WARMUP - 1)), LR * (WARMUP - 1) / WARMUP, rtol=1e-6)
  np.testing.assert_allclose(float(s(WARMUP)), LR, rtol=1e-6)  # the peak, exactly at warmup
  end = LR * MIN_RATIO
  mid = WARMUP + (STEPS - WARMUP) // 2
  np.testing.assert_allclose(float(s(mid)), end + 0.5 * (LR - end), rtol=1e-5)
  quarter = WARMUP + (STEPS - WARMUP) // 4
  want = end + 0.5 * (LR - end) * (1 + math.cos(math.pi * 0.25))
  np.testing.assert_allclose(float(s(quarter)), want, rtol=1e-5)
  np.testing.assert_allclose(float(s(STEPS)), end, rtol=1e-6)  # decay ends at `steps`
  np.testing.assert_allclose(float(s(STEPS + 50)), end, rtol=1e-6)  # and stays there
  assert all(float(s(i)) < float(s(i + 1)) for i in range(WARMUP))  # rising during warmup
  assert all(float(s(i)) > float(s(i + 1)) for i in range(WARMUP, STEPS))  # then falling


def test_no_warmup_starts_at_the_peak():
  s = train.lr_schedule(train_cfg(warmup_steps=0))
  np.testing.assert_allclose(float(s(0)), LR, rtol=1e-6)
  np.testing.assert_allclose(float(s(STEPS)), LR * MIN_RATIO, rtol=1e-6)


@pytest.mark.parametrize("warmup", [0, 3])
def test_optimizer_applies_the_schedule_update_by_update(warmup):
  """AdamW on a constant gradient moves a parameter by lr(k) (|m_hat / sqrt(v_hat)| = 1) at
  update k: an off-by-one between the optimizer's count and the schedule shows here."""
  cfg = train_cfg(warmup_steps=warmup, weight_decay=0.0, grad_clip=0.0, eps=1e-12)
  s = train.lr_schedule(cfg)
  params = {"w": jnp.zeros(())}
  tx = train.build_optimizer(cfg, {"w": train.DEFAULT_LABEL})
  opt = tx.init(params)
  grads = {"w": jnp.ones(())}
  for k in range(warmup + 3):
    updates, opt = tx.update(grads, opt, params)
    np.testing.assert_allclose(float(updates["w"]), -float(s(k)), rtol=1e-5, atol=1e-12)
    params = optax.apply_updates(params, updates)
