"""kernels.dplr: the chunked ``xla`` form against the per-token reference, the delta-rule
special case, numerics at the decay extremes, continuation, resets and errors (the Pallas
kernels: test_dplr_pallas.py).

Inputs are RWKV-7-like: ``b`` an L2-normalised removal key, ``a = -(iclr * b)`` with an
in-context learning rate in (0, 1), per-channel log decays ``-exp(s_d + N(0, 1/4))`` with
speeds ``s_d`` from -6 to 0 (slow channels carry the state across chunks), one head with a
stretch of -60 per step. One jitted ``value_and_grad`` per
(impl, chunk) returns outputs, final state and the gradients w.r.t. every input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.delta_rule import delta_rule
from kernels.dplr import dplr_recurrence
from tests.kernels.helpers import jit_fast as _jit
from tests.kernels.helpers import per_head_rel_err, rel_rms

B, T, H, DK, DV = 2, 50, 2, 8, 6  # T is not a multiple of any chunk size used
ARGS = ("q", "k", "v", "a", "b", "log_decay", "initial_state")


def _l2norm(x):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def _inputs(seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  shape = (B, T, H, DK)
  kappa = _l2norm(jax.random.normal(ks[0], shape))
  iclr = jax.nn.sigmoid(jax.random.normal(ks[1], shape))
  # per-channel speeds from e^-6 (the state crosses many chunks) to e^0 per step
  speed = jnp.linspace(-6.0, 0.0, DK)
  g = -jnp.exp(speed + 0.5 * jax.random.normal(ks[2], shape))
  g = g.at[:, 10:14, 1].set(-60.0)  # head 1: a stretch of the strongest decays
  reset = (jax.random.uniform(ks[3], (B, T)) < 0.06).at[0, 0].set(True).at[1, 33].set(True)
  cast = lambda x: x.astype(dtype)
  return dict(q=cast(jax.random.normal(ks[4], shape) / np.sqrt(DK)),
              k=cast(0.5 * jax.random.normal(ks[5], shape)),
              v=cast(jax.random.normal(ks[6], (B, T, H, DV))),
              a=cast(-iclr * kappa), b=cast(kappa), log_decay=g,
              initial_state=jax.random.normal(ks[7], (B, H, DK, DV)), reset=reset)


@functools.lru_cache(maxsize=None)
def _value_and_grad(impl, chunk_size=32):
  def loss(*xs):
    *args, s0, reset = xs
    o, s = dplr_recurrence(*args, initial_state=s0, reset=reset, chunk_size=chunk_size,
                           impl=impl)
    return jnp.sum(o.astype(jnp.float32) * jnp.cos(o.astype(jnp.float32))) + jnp.sum(s * s), (o, s)

  run = _jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))

  def call(**x):
    (_, (o, s)), grads = run(*(x[n] for n in ARGS), x["reset"])
    return o, s, grads
  return call


@functools.lru_cache(maxsize=None)
def _reference():
  return _value_and_grad("reference")(**_inputs())


def _check(got, ref, fwd_tol, grad_tol):
  bth = (B, T, H)
  assert per_head_rel_err(ref[0], got[0], bth) < fwd_tol
  assert per_head_rel_err(ref[1], got[1], bth) < fwd_tol
  for name, gr, gg in zip(ARGS, ref[2], got[2]):
    err = per_head_rel_err(gr, gg, bth)
    assert err < grad_tol, (name, err)


@pytest.mark.parametrize("chunk_size", (16, 32, 64))
def test_xla_matches_reference(chunk_size):
  """Outputs, final state and the gradients w.r.t. q, k, v, a, b, the per-channel decays
  and the initial state, with resets and T = 50 not a multiple of the chunk."""
  _check(_value_and_grad("xla", chunk_size)(**_inputs()), _reference(), 1e-5, 1e-4)


def test_reference_is_the_recurrence():
  """The reference against the equation written out with numpy, token by token."""
  x = jax.tree.map(np.asarray, _inputs(seed=1))
  o, s = dplr_recurrence(*(x[n] for n in ARGS[:6]), initial_state=x["initial_state"],
                         reset=x["reset"], impl="reference")
  S = x["initial_state"].astype(np.float64).copy()
  for t in range(T):
    S[x["reset"][:, t]] = 0.0
    for bi in range(B):
      for h in range(H):
        trans = np.diag(np.exp(x["log_decay"][bi, t, h])) + np.outer(x["a"][bi, t, h],
                                                                      x["b"][bi, t, h])
        S[bi, h] = trans @ S[bi, h] + np.outer(x["k"][bi, t, h], x["v"][bi, t, h])
        np.testing.assert_allclose(o[bi, t, h], S[bi, h].T @ x["q"][bi, t, h], rtol=1e-5,
                                   atol=1e-5)
  np.testing.assert_allclose(s, S, rtol=1e-5, atol=1e-5)


def test_gated_delta_rule_is_a_special_case():
  """``a = -beta e^g k``, ``b = k``, written key ``beta k``, ``log_decay = g`` broadcast:
  equal to kernels.delta_rule (outputs and final state to 1e-5)."""
  x = _inputs(seed=2)
  k = _l2norm(x["k"])
  beta = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(9), (B, T, H)))
  g = -jax.nn.softplus(jax.random.normal(jax.random.PRNGKey(10), (B, T, H)))
  o_d, s_d = delta_rule(x["q"], k, x["v"], beta, g, initial_state=x["initial_state"],
                        reset=x["reset"], impl="reference")
  gk = jnp.broadcast_to(g[..., None], k.shape)
  for impl in ("reference", "xla"):
    o, s = dplr_recurrence(x["q"], beta[..., None] * k, x["v"],
                           -beta[..., None] * jnp.exp(gk) * k, k, gk,
                           initial_state=x["initial_state"], reset=x["reset"], impl=impl,
                           chunk_size=16)
    np.testing.assert_allclose(o, o_d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s_d, rtol=1e-5, atol=1e-5)


def test_decay_extremes_finite_and_exact():
  """Per-channel decays at both extremes in one chunk: channels at exactly 0 (no decay)
  and near 0 (-1e-6) next to channels at -60 per step, plus a saturated -1e4 every 7
  tokens (exp underflows to exactly 0). Finite, and the reference's values and gradients
  (pair decays are segment sums of the log decays, masked before exp)."""
  x = _inputs(seed=3)
  tok = jnp.arange(T)[None, :, None, None]
  chan = jnp.arange(DK)[None, None, None, :]
  g = jnp.where(chan % 4 == 0, 0.0, jnp.where(chan % 4 == 1, -1e-6, -60.0))
  g = jnp.where((tok % 7 == 3) & (chan % 4 == 2), -1e4, g) * jnp.ones((B, T, H, DK))
  x = {**x, "log_decay": g, "a": 0.5 * x["a"]}  # keep |I + a b^T| <= 1 on undecayed channels
  ref = _value_and_grad("reference")(**x)
  got = _value_and_grad("xla", 32)(**x)
  for arr in (got[0], got[1]) + tuple(got[2]):
    assert np.all(np.isfinite(np.asarray(arr)))
  _check(got, ref, 1e-5, 1e-4)


def test_two_calls_continue_exactly():
  """Chunked prefill: the sequence in two calls (the state handed over) equals one call;
  the short second call (< 16 tokens) takes the one-unpadded-chunk path."""
  x = _inputs(seed=4)
  args = [x[n] for n in ARGS[:6]]
  o, s = dplr_recurrence(*args, initial_state=x["initial_state"], reset=x["reset"],
                         impl="xla", chunk_size=16)
  cut = T - 7
  o1, s1 = dplr_recurrence(*(y[:, :cut] for y in args), initial_state=x["initial_state"],
                           reset=x["reset"][:, :cut], impl="xla", chunk_size=16)
  o2, s2 = dplr_recurrence(*(y[:, cut:] for y in args), initial_state=s1,
                           reset=x["reset"][:, cut:], impl="xla", chunk_size=16)
  np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), o, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s2, s, rtol=1e-5, atol=1e-5)


def test_reset_blocks_information():
  """Changing every input before a document start changes nothing from that start on."""
  x = _inputs(seed=5)
  reset = jnp.zeros((B, T), bool).at[:, 20].set(True)
  o, _ = dplr_recurrence(*(x[n] for n in ARGS[:6]), initial_state=x["initial_state"],
                         reset=reset, impl="xla", chunk_size=16)
  y = {n: x[n].at[:, :20].multiply(2.0 if n == "log_decay" else -3.0) for n in ARGS[:6]}
  o2, _ = dplr_recurrence(*(y[n] for n in ARGS[:6]), initial_state=2 * x["initial_state"],
                          reset=reset, impl="xla", chunk_size=16)
  np.testing.assert_allclose(o2[:, 20:], o[:, 20:], rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(o2[:, :20] - o[:, :20]))) > 1e-2


def test_bf16_relative_rms():
  """bf16 inputs (fp32 state and accumulation): relative RMS error <= 1e-2 against the fp32
  reference, outputs and final state."""
  ref = _reference()
  x = _inputs(dtype=jnp.bfloat16)
  o, s = dplr_recurrence(*(x[n] for n in ARGS[:6]), initial_state=x["initial_state"],
                         reset=x["reset"], impl="xla", chunk_size=32)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert rel_rms(ref[0], o.astype(jnp.float32)) < 1e-2
  assert rel_rms(ref[1], s) < 1e-2


def test_bad_inputs_raise_clear_errors():
  x = _inputs()
  args = [x[n] for n in ARGS[:6]]
  with pytest.raises(ValueError, match="log_decay"):
    dplr_recurrence(*args[:5], args[5][..., :1])
  with pytest.raises(ValueError, match="initial_state"):
    dplr_recurrence(*args, initial_state=x["initial_state"][:, :1])
  with pytest.raises(ValueError, match="impl"):
    dplr_recurrence(*args, impl="cuda")
  with pytest.raises(ValueError, match="multiple of 16"):
    dplr_recurrence(*args, impl="pallas_tpu", chunk_size=24, interpret=True)
  with pytest.raises(ValueError, match="reset"):
    dplr_recurrence(*args, reset=x["reset"][:, :3])
