"""layers.memory_mixtures Mixture-of-Memories against a naive per-token loop.

The naive form is written from the paper's equations in numpy float64: a python loop over
tokens with explicit state matrices and the router's top-k per token. It reads only the
layer's parameters. The mixer runs jitted in float32 with chunk size 4. The mixer contract
(parallel == step, packing, state_size, gradients) runs for ``mom`` in
test_mixer_contract.py; here step is also checked against the naive loop (final state
included, and with a memory that is never routed to). The load-balance loss is checked on
its own, against the layer's routing and in the trainer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import memory_mixtures as mm
from layers.common import ConfigError
from lcm import registry
from tests.layers.memory_helpers import (B, D, SEG, T, TOL, Jitted, P, l2n, lin, naive_conv,
                                         rms, sigmoid, silu, softmax, softplus,
                                         starts_and_positions)


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(3), (B, T, D), jnp.float32)


# ----------------------------------------------------------------------------------
# Mixture-of-Memories
# ----------------------------------------------------------------------------------


MOM = dict(num_memories=3, top_k=2, expand_v=1.0)


@pytest.fixture(scope="module")
def mom():
  return Jitted("mom", **MOM)


def naive_mom(layer, x, seg, s0=None):
  """MoM, one token at a time: router top-k, only selected memories (and the shared one)
  take the gated delta-rule update, output mixed by the renormalised router weights.
  Returns (y [B, T, D], final states [B, M, H, Dk, Dv])."""
  x = np.asarray(x, np.float64)
  e, k_top, h, dk, dv = (layer.num_memories, layer.cfg.top_k, layer.num_heads,
                         layer.head_dim, layer.value_dim)
  m = layer.num_slots
  a_log, dt_bias = P(layer.A_log), P(layer.dt_bias)
  ys, finals = [], []
  for r in range(x.shape[0]):
    starts, _ = starts_and_positions(seg[r])
    xr = x[r]
    q = naive_conv(lin(xr, layer.q).reshape(T, -1), P(layer.conv_q.kernel), seg[r])
    q = l2n(silu(q).reshape(T, h, dk)) * dk ** -0.5
    kk = naive_conv(lin(xr, layer.k).reshape(T, -1), P(layer.conv_k.kernel), seg[r])
    kk = l2n(silu(kk).reshape(T, m, h, dk))
    vv = naive_conv(lin(xr, layer.v).reshape(T, -1), P(layer.conv_v.kernel), seg[r])
    vv = silu(vv).reshape(T, m, h, dv)
    beta = sigmoid(lin(xr, layer.b))  # [T, M, H]
    decay = np.exp(-np.exp(a_log) * softplus(lin(xr, layer.a) + dt_bias))
    S = np.zeros((m, h, dk, dv)) if s0 is None else np.array(s0[r], np.float64)
    o_row = np.zeros((T, h, dv))
    for t in range(T):
      if starts[t] and (t > 0 or s0 is None):
        S = np.zeros((m, h, dk, dv))
      p = softmax(lin(xr[t], layer.router))
      top = list(np.argsort(-p, kind="stable")[:k_top])
      w = {j: p[j] / sum(p[i] for i in top) for j in top}
      if layer.cfg.shared_memory:
        w[e] = 1.0
      for j in w:  # routed memories and the shared one; the others keep their state
        for i in range(h):
          a = decay[t, j, i]
          err = vv[t, j, i] - a * S[j, i].T @ kk[t, j, i]
          S[j, i] = a * S[j, i] + beta[t, j, i] * np.outer(kk[t, j, i], err)
          o_row[t, i] += w[j] * (S[j, i].T @ q[t, i])
    o_row = rms(o_row, P(layer.norm.scale), layer.cfg.norm_eps) * silu(lin(xr, layer.g))
    ys.append(np.einsum("thd,hde->te", o_row, P(layer.out)))
    finals.append(S)
  return np.stack(ys), np.stack(finals)


def test_mom_matches_naive_loop(mom, x):
  y = mom.fwd(mom.params, x, jnp.asarray(SEG))
  ref, _ = naive_mom(mom.mixer, x, SEG)
  assert float(np.std(ref)) > 1e-2
  np.testing.assert_allclose(np.asarray(y), ref, atol=TOL, rtol=0)
  # step over the whole row (one document), final state included
  y_step, state = mom.run_steps(x, T)
  ref0, s_ref = naive_mom(mom.mixer, x, np.zeros_like(SEG))
  np.testing.assert_allclose(np.asarray(y_step), ref0, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(state["S"]), s_ref, atol=TOL, rtol=0)


def test_mom_memory_never_routed_keeps_its_state(mom):
  """Router logits of memory 2 are always below the others' (x > 0): no token selects it,
  so its state passes through every token unchanged, and its projections do not matter."""
  layer = mom.mixer
  xp = jnp.abs(jax.random.normal(jax.random.key(4), (B, T, D), jnp.float32)) + 0.1
  params = jax.tree.map(lambda a: a, mom.params)  # a copy
  router = np.ones((D, layer.num_memories), np.float32)
  router[:, 2] = -1.0
  params["router"]["kernel"] = jnp.asarray(router)
  _, selected, _ = layer_with(mom, params).route(xp)
  assert not bool(jnp.any(selected[..., 2])) and bool(jnp.all(selected[..., :2]))
  s0 = jax.random.normal(jax.random.key(5), layer.init_state(B)["S"].shape, jnp.float32)
  state = dict(layer.init_state(B), S=s0)
  y, new = mom.step(params, xp, state)
  np.testing.assert_array_equal(np.asarray(new["S"][:, 2]), np.asarray(s0[:, 2]))
  for j in (0, 1, 3):  # the routed memories and the shared one moved
    assert float(jnp.max(jnp.abs(new["S"][:, j] - s0[:, j]))) > 1e-3
  ref, s_ref = naive_mom(layer_with(mom, params), xp, np.zeros_like(SEG), s0=np.asarray(s0))
  np.testing.assert_allclose(np.asarray(y), ref, atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(new["S"]), s_ref, atol=TOL, rtol=0)
  # Memory 2's key / value projections do not reach the output.
  params2 = jax.tree.map(lambda a: a, params)
  for name in ("k", "v"):
    w = np.asarray(params[name]["kernel"]).copy()
    w[:, 2] = 7.0 * np.random.default_rng(0).standard_normal(w[:, 2].shape)
    params2[name]["kernel"] = jnp.asarray(w)
  y2, _ = mom.step(params2, xp, state)
  np.testing.assert_allclose(np.asarray(y2), np.asarray(y), atol=1e-6, rtol=0)


def layer_with(jitted, params):
  return nnx.merge(jitted.graphdef, params)


def test_load_balance_loss_values():
  e = 4
  # perfectly balanced: every memory gets the same share and the same mean probability
  probs = jnp.full((8, e), 1.0 / e)
  sel = jnp.array([[1, 1, 0, 0], [0, 0, 1, 1]] * 4, bool)
  np.testing.assert_allclose(float(mm.load_balance_loss(probs, sel)), 1.0, rtol=1e-6)
  # collapsed: one memory takes everything with probability 1 -> E
  probs = jnp.zeros((8, e)).at[:, 0].set(1.0)
  sel = jnp.zeros((8, e), bool).at[:, 0].set(True)
  np.testing.assert_allclose(float(mm.load_balance_loss(probs, sel)), float(e), rtol=1e-6)


def test_mom_aux_loss_is_the_routers_load_balance(mom, x):
  """call_with_aux returns E * sum_e f_e P_e of this layer's routing, differentiable in the
  router (computed here from the layer's own ``route``)."""
  _, aux = mom.fwd_aux(mom.params, x, jnp.asarray(SEG))
  probs, selected, weights = mom.mixer.route(x)
  assert bool(jnp.all(jnp.sum(selected, -1) == mom.mixer.cfg.top_k))
  np.testing.assert_allclose(np.asarray(jnp.sum(weights, -1)), 1.0, rtol=1e-6)
  f = np.asarray(selected, np.float64).reshape(-1, 3).mean(0) / mom.mixer.cfg.top_k
  p = np.asarray(probs, np.float64).reshape(-1, 3).mean(0)
  np.testing.assert_allclose(float(aux), 3 * np.sum(f * p), rtol=1e-5)

  def from_router(p):
    pr, sel, _ = nnx.merge(mom.graphdef, p).route(x)
    return mm.load_balance_loss(pr, sel)

  grad = jax.grad(from_router)(mom.params)
  assert float(jnp.max(jnp.abs(grad["router"]["kernel"]))) > 0


@pytest.mark.parametrize("overrides,field", [
    ({"num_memories": 0}, "num_memories"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 5}, "top_k"),
    ({"shared_memory": "yes"}, "shared_memory"),
    ({"num_heads": 3}, "num_heads"),
    ({"head_dim": 0}, "head_dim"),
    ({"expand_v": 0.3}, "expand_v"),
    ({"use_gate": 1}, "use_gate"),
    ({"use_short_conv": None}, "use_short_conv"),
    ({"conv_size": 0}, "conv_size"),
    ({"conv_bias": "no"}, "conv_bias"),
    ({"norm_eps": 0.0}, "norm_eps"),
    ({"A_init_max": -1.0}, "A_init_max"),
    ({"dt_min": 0.0}, "dt_min"),
    ({"dt_max": 1e-4}, "dt_max"),
    ({"dt_init_floor": -1.0}, "dt_init_floor"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"impl": "cuda"}, "impl"),
])
def test_mom_config_errors_name_the_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    registry.validate("mom", 16, overrides, prefix="model.mixers.mom.")
  assert e.value.field == f"model.mixers.mom.{field}", str(e.value)


# ----------------------------------------------------------------------------------
# The load-balance loss reaches the trainer
# ----------------------------------------------------------------------------------


def test_trainer_adds_and_logs_the_aux_loss():
  from configs import mqar  # pylint: disable=g-import-not-at-top
  from lcm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lcm import train  # pylint: disable=g-import-not-at-top
  c = mqar.get_config("mom")
  for key, value in {
      "data.vocab_size": 64, "data.seq_len": 16, "data.num_kv_pairs": 2,
      "data.batch_size": 4, "model.d_model": 16, "model.num_layers": 2, "train.steps": 2,
      "train.warmup_steps": 1, "train.progress": False, "eval.num_examples": 4,
      "eval.batch_size": 4, "mesh.data": 1, "train.aux_loss_weight": 1000.0,
      "model.remat": False, "model.mlp_ratio": 0.0}.items():
    sec, name = key.split(".")
    c[sec][name] = value
  c.model.mixers.mom = {"num_heads": 2, "num_memories": 3, "top_k": 2, "expand_v": 1.0,
                        "chunk_size": 16, "use_short_conv": False, "use_gate": False}
  trainer = train.Trainer(c, devices=jax.devices()[:1])
  params, opt = trainer.init_state()
  it = trainer.train_iterator()
  batch = trainer.global_batch(next(it))
  rows = []
  for _ in range(2):
    params, opt, m = trainer.train_step(params, opt, batch)
    rows.append({k: float(v) for k, v in m.items()})
    batch = trainer.global_batch(next(it))
  # the sum over the two MoM layers, each about 1 near balance and at most num_memories
  assert all(1.0 < r["aux_loss"] < 6.0 for r in rows), rows
  assert all(np.isfinite(r["loss"]) and r["finite"] for r in rows), rows
  # The aux term is in the objective: with weight 0 this first step's gradient norm is 4.0
  # (measured), with weight 1000 the load-balance gradient dominates it (48.8); the logged
  # "loss" is the LM loss alone (4.79 at either weight).
  assert rows[0]["grad_norm"] > 20.0, rows
  assert 4.0 < rows[0]["loss"] < 6.0, rows
  # a negative weight is refused, naming the field
  c.train.aux_loss_weight = -1.0
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  assert e.value.field == "train.aux_loss_weight"
