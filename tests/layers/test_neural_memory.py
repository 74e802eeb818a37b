"""layers.neural_memory (Titans) against naive per-token implementations.

The naive memory below is written from the paper's equations: a python loop over tokens with
explicit per-token memory weights, the gradient of ``||M(W, k_t) - v_t||^2 / Dh`` by ``jax.grad``
at the chunk-start weights, ``S_t = eta_t S_{t-1} - theta_t grad``,
``M_t = (1 - alpha_t) M_{t-1} + S_t``, ``o_t = M(M_t, q_t)``; the chunk grid restarts at every
document start. The chunked implementation never materialises per-token weights, so the two
share nothing but the definition. The mixer contract (parallel == step, packing, state size)
for titans_lmm / mac / mag / mal is in test_mixer_contract.py.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import neural_memory as nm
from layers.attention import apply_rope
from layers.common import ConfigError, segment_positions
from lcm import registry
from tests.kernels.helpers import jit_fast

B, H, DH = 2, 2, 4
D = 16
TOL = 1e-5


# ----------------------------------------------------------------------------------
# naive memory (per-token weights, autodiff gradients)
# ----------------------------------------------------------------------------------


def _mlp_forward(ws, x, activation, residual):
  act = (lambda z: jax.nn.gelu(z, approximate=False)) if activation == "gelu" else jax.nn.silu
  a = x
  for l, w in enumerate(ws):
    a = a @ w if l == 0 else act(a) @ w
  return a + x if residual else a


def _naive_grad(ws, k, v, activation, residual, max_grad_norm):
  """The token's gradient by autodiff, clipped to global norm <= max_grad_norm (if given)."""
  loss = lambda ws: jnp.mean((_mlp_forward(ws, k, activation, residual) - v) ** 2)
  g = jax.grad(loss)(ws)
  if max_grad_norm is not None:
    norm = jnp.sqrt(sum(jnp.sum(gi ** 2) for gi in g))
    g = tuple(gi * jnp.minimum(1.0, max_grad_norm / norm) for gi in g)
  return g


def _naive_token_fn(activation, residual, max_grad_norm=None):
  """One token for every (batch, head): (w0, m, s, q, k, v, log_keep, log_eta, theta) ->
  (o, m, s); weights [B, H, i, o], vectors [B, H, Dh], gates [B, H]."""

  def one(w0, m, s, q, k, v, lk, le, th):
    g = _naive_grad(w0, k, v, activation, residual, max_grad_norm)
    s = tuple(jnp.exp(le) * si - th * gi for si, gi in zip(s, g))
    m = tuple(jnp.exp(lk) * mi + si for mi, si in zip(m, s))
    return _mlp_forward(m, q, activation, residual), m, s

  return jax.jit(jax.vmap(jax.vmap(one)))


def naive_memory(fn, init, inputs, chunk, doc_pos):
  """Per-token loop. init: tuple [H, i, o]; inputs: q, k, v [B,T,H,Dh], gates [B,T,H];
  doc_pos [B, T] (0 = document start: memory := init, momentum := 0)."""
  q, k, v, lk, le, th = inputs
  b, t = q.shape[:2]
  init_b = tuple(jnp.broadcast_to(w, (b,) + w.shape) for w in init)
  w0 = m = init_b
  s = tuple(jnp.zeros_like(w) for w in init_b)
  outs = []
  for i in range(t):
    start = jnp.asarray(doc_pos[:, i] == 0)
    grid = jnp.asarray(doc_pos[:, i] % chunk == 0)
    sel = lambda mask, a, c: tuple(jnp.where(mask[:, None, None, None], x, y)
                                   for x, y in zip(a, c))
    m = sel(start, init_b, m)
    s = sel(start, tuple(jnp.zeros_like(w) for w in s), s)
    w0 = sel(grid, m, w0)  # a chunk starts: the gradient point is the memory before it
    o, m, s = fn(w0, m, s, q[:, i], k[:, i], v[:, i], lk[:, i], le[:, i], th[:, i])
    outs.append(o)
  return np.stack(outs, 1), (w0, m, s)


def _inputs(key, t):
  ks = jax.random.split(key, 6)
  l2 = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  q = l2(jax.random.normal(ks[0], (B, t, H, DH)))
  k = l2(jax.random.normal(ks[1], (B, t, H, DH)))
  v = jax.random.normal(ks[2], (B, t, H, DH))
  lk = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, t, H)) + 1.0)   # 1 - alpha
  le = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, t, H)) + 1.0)   # eta
  th = 0.5 * jax.nn.sigmoid(jax.random.normal(ks[5], (B, t, H)))
  return q, k, v, lk, le, th


def _assert_close(got, ref, tol=TOL):
  got, ref = np.asarray(got), np.asarray(ref)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, ref, atol=tol * max(1.0, np.max(np.abs(ref))), rtol=0)


@functools.lru_cache(maxsize=None)
def _recurrence(mlp, chunk, aligned):
  """The chunked recurrence, jitted once per (memory, chunk, path) and shared by the tests."""
  def run(init, inputs, state, doc_pos):
    return nm.memory_recurrence(mlp, init, *inputs, chunk_size=chunk, state=state,
                                doc_pos=None if aligned else doc_pos)
  return jit_fast(run)


# Spec A: the default memory (depth 2, GELU, residual, per-token gradient clipping at a norm
# that clips about half of the test tokens); spec B: depth 3, SiLU, no residual, no clipping.
TAU_A = 1.0
SPEC_A = nm.MemoryMLP(dim=DH, hidden=6, depth=2, activation="gelu", residual=True,
                      max_grad_norm=TAU_A)
SPEC_B = nm.MemoryMLP(dim=DH, hidden=5, depth=3, activation="silu", residual=False)


@pytest.fixture(scope="module")
def naive_a():
  return _naive_token_fn("gelu", True, TAU_A)


@pytest.fixture(scope="module")
def naive_b():
  return _naive_token_fn("silu", False)


def test_grad_terms_are_the_autodiff_gradient():
  w = SPEC_B.init(jax.random.key(3), (H,))
  _, k, v, *_ = _inputs(jax.random.key(4), 3)
  kh, vh = k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2)  # [H, N, Dh]

  def both(w, kh, vh):
    inputs, deltas = SPEC_B.grad_terms(w, kh, vh)
    outer = tuple(jnp.einsum("hni,hno->nhio", a, d) for a, d in zip(inputs, deltas))
    per_token = jax.vmap(lambda kk, vv: jax.grad(
        lambda ws: jnp.sum(SPEC_B.loss(ws, kk, vv)))(w), in_axes=1)(kh[:, :, None], vh[:, :, None])
    return outer, per_token

  outer, ref = jit_fast(both)(w, kh, vh)
  for a, r in zip(outer, ref):
    _assert_close(a, r)


def test_gradient_clipping_is_the_clipped_autodiff_gradient():
  """SPEC_A's factors give the autodiff gradient scaled to norm <= TAU_A, and the test
  inputs have tokens on both sides of the threshold (so the chunked tests exercise it)."""
  w = SPEC_A.init(jax.random.key(0), (H,))
  _, k, v, *_ = _inputs(jax.random.key(2), 11)
  kh, vh = k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2)  # [H, N, Dh]

  def both(w, kh, vh):
    inputs, deltas = SPEC_A.grad_terms(w, kh, vh)
    outer = tuple(jnp.einsum("hni,hno->nhio", a, d) for a, d in zip(inputs, deltas))
    one = lambda kk, vv, clip: jax.vmap(lambda wh, kt, vt: _naive_grad(
        wh, kt, vt, "gelu", True, clip))(w, kk, vv)
    clipped = jax.vmap(lambda kk, vv: one(kk, vv, TAU_A), in_axes=1)(kh, vh)
    raw = jax.vmap(lambda kk, vv: one(kk, vv, None), in_axes=1)(kh, vh)
    return outer, clipped, raw

  outer, clipped, raw = jit_fast(both)(w, kh, vh)
  for a, r in zip(outer, clipped):
    _assert_close(a, r)
  norms = np.sqrt(sum(np.sum(np.asarray(g) ** 2, axis=(-2, -1)) for g in raw))  # [N, H]
  clipped_norms = np.sqrt(sum(np.sum(np.asarray(g) ** 2, axis=(-2, -1)) for g in outer))
  np.testing.assert_allclose(clipped_norms, np.minimum(norms, TAU_A), rtol=1e-5)
  assert 0.2 < np.mean(norms > TAU_A) < 0.8, norms


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "doc_pos"])
def test_chunk_size_one_is_the_sequential_rule(naive_a, aligned):
  t = 7
  init = SPEC_A.init(jax.random.key(0), (H,))
  inputs = _inputs(jax.random.key(1), t)
  doc_pos = np.broadcast_to(np.arange(t), (B, t))
  ref, (_, m_ref, s_ref) = naive_memory(naive_a, init, inputs, 1, doc_pos)
  o, (w0, m, s) = _recurrence(SPEC_A, 1, aligned)(init, inputs, None, jnp.asarray(doc_pos))
  _assert_close(o, ref)
  for a, r in zip(m + s, m_ref + s_ref):
    _assert_close(a, r)


def test_chunked_equals_naive_with_chunk_start_gradients(naive_a):
  t, chunk = 11, 4  # three chunks, the last one partial
  init = SPEC_A.init(jax.random.key(0), (H,))
  inputs = _inputs(jax.random.key(2), t)
  doc_pos = np.broadcast_to(np.arange(t), (B, t))
  ref, (w0_ref, m_ref, s_ref) = naive_memory(naive_a, init, inputs, chunk, doc_pos)
  o, (w0, m, s) = _recurrence(SPEC_A, chunk, True)(init, inputs, None, None)
  _assert_close(o, ref)
  for a, r in zip(w0 + m + s, w0_ref + m_ref + s_ref):
    _assert_close(a, r)
  # The chunk-start gradient matters: the sequential rule (chunk 1) gives other outputs.
  ref1, _ = naive_memory(naive_a, init, inputs, 1, doc_pos)
  assert np.max(np.abs(ref1 - ref)) > 1e-3


def test_saturated_gates_are_exact_and_have_finite_gradients(naive_a):
  """alpha -> 1 or 0, eta -> 0 or 1 (log gates down to -40) next to mild ones."""
  t, chunk = 11, 4
  init = SPEC_A.init(jax.random.key(0), (H,))
  q, k, v, lk, le, th = _inputs(jax.random.key(7), t)
  extreme = jax.random.choice(jax.random.key(8), jnp.array([-40.0, -1e-9, 0.0]), (2, B, t, H))
  lk = jnp.where(extreme[0] != 0, extreme[0], lk)  # log(1 - alpha): forget all / nothing
  le = jnp.where(extreme[1] != 0, extreme[1], le)  # log eta: no momentum / full momentum
  inputs = (q, k, v, lk, le, th)
  doc_pos = np.broadcast_to(np.arange(t), (B, t))
  ref, _ = naive_memory(naive_a, init, inputs, chunk, doc_pos)
  o, _ = _recurrence(SPEC_A, chunk, True)(init, inputs, None, None)
  _assert_close(o, ref)
  grads = jit_fast(jax.grad(lambda g: jnp.sum(nm.memory_recurrence(
      SPEC_A, init, q, k, v, *g, chunk_size=chunk)[0])))((lk, le, th))
  assert all(bool(jnp.all(jnp.isfinite(g_))) for g_ in grads)


def test_documents_restart_memory_and_chunk_grid_and_splits_continue(naive_b):
  t, chunk = 12, 3
  # Row 0: documents of 5 and 7 tokens; row 1: 1, 2 and 9 tokens (starts inside chunks).
  seg = jnp.array([[0] * 5 + [1] * 7, [0] + [1] * 2 + [2] * 9], jnp.int32)
  doc_pos = np.asarray(segment_positions(seg, B, t))
  init = SPEC_B.init(jax.random.key(5), (H,))
  inputs = _inputs(jax.random.key(6), t)
  ref, _ = naive_memory(naive_b, init, inputs, chunk, doc_pos)
  run = _recurrence(SPEC_B, chunk, False)
  o, _ = run(init, inputs, None, jnp.asarray(doc_pos))
  _assert_close(o, ref)
  # One document, continued over calls of 4 tokens (chunk grid at 0, 3, 6, 9; each call
  # starts inside a chunk) from the carried (w0, m, s): equals one call.
  init_b = tuple(jnp.broadcast_to(w, (B,) + w.shape) for w in init)
  full, final = run(init, inputs, None, jnp.broadcast_to(jnp.arange(t), (B, t)))
  state, outs, start = (init_b, init_b, tuple(jnp.zeros_like(w) for w in init_b)), [], 0
  for n in (4, 4, 4):
    part = tuple(a[:, start:start + n] for a in inputs)
    pos = jnp.broadcast_to(jnp.arange(start, start + n), (B, n))
    y, state = run(init, part, state, pos)
    outs.append(y)
    start += n
  _assert_close(jnp.concatenate(outs, 1), full)
  for a, r in zip(jax.tree.leaves(state), jax.tree.leaves(final)):
    _assert_close(a, r)


def test_chunk_states_are_the_states_at_chunk_ends(naive_a):
  t, chunk = 8, 4
  init = SPEC_A.init(jax.random.key(0), (H,))
  inputs = _inputs(jax.random.key(2), t)
  run = jit_fast(lambda init, inputs: nm.memory_recurrence(
      SPEC_A, init, *inputs, chunk_size=chunk, return_chunk_states=True))
  _, final, per_chunk = run(init, inputs)
  _, (_, m4, s4) = naive_memory(naive_a, init, tuple(a[:, :4] for a in inputs), chunk,
                                np.broadcast_to(np.arange(4), (B, 4)))
  for a, r in zip(per_chunk[1] + per_chunk[2], m4 + s4):
    _assert_close(a[0], r)
  for a, r in zip(jax.tree.leaves(final), jax.tree.leaves(per_chunk)):
    _assert_close(a, r[-1])


# ----------------------------------------------------------------------------------
# The layers
# ----------------------------------------------------------------------------------

SMALL = {"num_heads": 2, "chunk_size": 4}
ATTN = {"num_persistent": 2, "attn_heads": 2}
CONFIGS = {
    "titans_lmm": SMALL,
    "titans_mac": {**SMALL, "segment_len": 4, **ATTN},
    "titans_mag": {**SMALL, "window": 4, **ATTN},
    "titans_mal": {**SMALL, "window": 4, **ATTN},
}


class Compiled:
  """A mixer with its forward and step compiled once per input signature."""

  def __init__(self, name, dtype=jnp.float32):
    self.mixer = registry.create(name, d_model=D, rngs=nnx.Rngs(0), dtype=dtype,
                                 **CONFIGS[name])
    self.graphdef, self.params = nnx.split(self.mixer)
    self._fwd = jit_fast(lambda p, x: nnx.merge(self.graphdef, p)(x))
    self._step = jit_fast(lambda p, x, st: nnx.merge(self.graphdef, p).step(x, st))

  def fwd(self, x, params=None):
    return self._fwd(self.params if params is None else params, x)

  def step(self, x, state):
    return self._step(self.params, x, state)


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(1), (B, 8, D), jnp.float32)


@pytest.fixture(scope="module")
def mixers():
  return {name: Compiled(name) for name in CONFIGS}


def test_gates_follow_the_definitions(mixers, x):
  lmm = mixers["titans_lmm"].mixer
  log_keep, log_eta, theta = jax.jit(lmm.gates)(x)
  w = np.asarray(lmm.gate_w[...], np.float64)
  b = np.asarray(lmm.gate_b[...], np.float64)
  logits = np.einsum("btd,dgh->btgh", np.asarray(x, np.float64), w) + b
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  _assert_close(theta, lmm.cfg.max_lr * sig(logits[:, :, 0]))
  _assert_close(jnp.exp(log_eta), sig(logits[:, :, 1]))
  _assert_close(jnp.exp(log_keep), 1.0 - sig(logits[:, :, 2]))
  # Bias inits: theta = max_lr / 2, eta = 1/2, alpha = sigmoid(-6) when the input is zero.
  np.testing.assert_allclose(b, [[0.0] * 2, [0.0] * 2, [-6.0] * 2])


def test_init_state_carries_memory_weights_and_momentum(mixers, x):
  c = mixers["titans_lmm"]
  lmm = c.mixer
  state = lmm.init_state(B, jnp.float32)
  init = lmm.initial_weights()
  assert len(init) == 2 and init[0].shape == (2, 8, 16) and init[1].shape == (2, 16, 8)
  for part in ("w0", "m"):
    for a, w in zip(state[part], init):
      np.testing.assert_array_equal(a, jnp.broadcast_to(w, (B,) + w.shape))
  for a in state["s"]:
    np.testing.assert_array_equal(a, 0.0)
  np.testing.assert_array_equal(state["pos"], [0, 0])
  # After 5 tokens (chunk 4) the gradient point w0 is the memory after the first chunk.
  _, s4 = c.step(x[:, :4], state)
  _, s5 = c.step(x[:, 4:8], s4)  # tokens 4..7; w0 is M_3 from token 4 on
  for a, r in zip(s5["w0"], s4["m"]):
    _assert_close(a, r)
  np.testing.assert_array_equal(s5["pos"], [8, 8])
  assert float(jnp.max(jnp.abs(s5["s"][0]))) > 0
  mac = mixers["titans_mac"].mixer
  ms = mac.init_state(B, jnp.float32)
  for a, w in zip(ms["mseg"], mac.lmm.initial_weights()):
    np.testing.assert_array_equal(a, jnp.broadcast_to(w, (B,) + w.shape))


def test_bf16_compute_is_finite_and_close(mixers, x):
  y32 = mixers["titans_lmm"].fwd(x)
  y16 = Compiled("titans_lmm", jnp.bfloat16).fwd(x.astype(jnp.bfloat16))
  y16 = np.asarray(y16.astype(jnp.float32))
  assert np.all(np.isfinite(y16))
  rel = np.sqrt(np.mean((y16 - np.asarray(y32)) ** 2) / np.mean(np.asarray(y32) ** 2))
  assert rel < 3e-2, rel


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_slow_parameters_are_parameters(mixers, name):
  """The memory's initial weights, its gates, projections, convolution and the persistent
  tokens are trained parameters. That each gets a finite, nonzero gradient is checked for
  every registered mixer by tests/layers/test_mixer_contract.py
  (test_every_parameter_gets_a_finite_nonzero_gradient; its OVERRIDES are these
  configurations, with chunk size 2 for titans_mac)."""
  params = nnx.to_pure_dict(mixers[name].params)
  names = {"/".join(str(getattr(p, "key", p)) for p in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  expect = ["memory_0", "memory_1", "gate_w", "gate_b", "q/kernel", "conv/k/kernel", "out"]
  if name != "titans_lmm":
    expect.append("attn/persistent")
  for e in expect:
    assert any(e in n for n in names), (e, sorted(names))


@pytest.mark.parametrize("name", ["titans_mac", "titans_mag", "titans_mal"])
def test_persistent_tokens_change_the_output(mixers, x, name):
  c = mixers[name]
  y = c.fwd(x)
  other = nnx.merge(c.graphdef, c.params)
  other.attn.persistent[...] = jax.random.normal(jax.random.key(11),
                                                 other.attn.persistent[...].shape)
  assert float(jnp.max(jnp.abs(c.fwd(x, nnx.split(other)[1]) - y))) > 1e-3


def _naive_prefix_attention(attn, q_in, kv_in, pos_q, pos_kv, visible):
  """numpy: queries from q_in [T, D], keys/values from kv_in [S, D] (RoPE at pos_*), plus the
  persistent tokens (un-rotated keys, scored with un-rotated queries); visible [T, S]."""
  p64 = lambda a: np.asarray(a, np.float64)
  lin = lambda z, layer: np.tensordot(p64(z), p64(layer.kernel[...]), axes=(-1, 0))
  theta = attn.rope_theta
  rope = lambda a, pos: p64(apply_rope(jnp.asarray(a, jnp.float32)[None], jnp.asarray(pos),
                                       theta)[0])
  q_raw = lin(q_in, attn.q)
  q = rope(q_raw, pos_q)
  k = rope(lin(kv_in, attn.k), pos_kv)
  v = lin(kv_in, attn.v)
  pers = p64(attn.persistent[...])
  pk, pv = lin(pers, attn.k), lin(pers, attn.v)
  dh = q.shape[-1]
  out = np.zeros((q.shape[0], attn.out[...].shape[-1]))
  for i in range(q.shape[0]):
    for h in range(q.shape[1]):
      s = [q_raw[i, h] @ pk[j, h] for j in range(len(pers))]
      vals = [pv[j, h] for j in range(len(pers))]
      for j in np.nonzero(visible[i])[0]:
        s.append(q[i, h] @ k[j, h])
        vals.append(v[j, h])
      w = np.exp(np.array(s) / math.sqrt(dh) - np.max(np.array(s) / math.sqrt(dh)))
      w = w / w.sum()
      out[i] += (w @ np.array(vals)) @ p64(attn.out[...])[h]
  return out


def test_mac_single_segment_is_attention_over_persistent_memory_and_segment(mixers, x):
  c = mixers["titans_mac"]
  mac = c.mixer
  t = mac.cfg.segment_len  # one segment: the memory read h uses the initial weights
  xs = x[:, :t]
  h = jax.jit(mac.memory_tokens)(mac.lmm.initial_weights(), xs)
  tri = np.tril(np.ones((t, t), bool))
  visible = np.concatenate([tri, tri], 1)  # token i sees h_{<=i} and x_{<=i}
  pos = np.arange(t)
  y = np.stack([_naive_prefix_attention(
      mac.attn, xs[b], np.concatenate([np.asarray(h[b]), np.asarray(xs[b])], 0), pos,
      np.concatenate([pos, pos]), visible) for b in range(B)])
  y = mac.norm_y(jnp.asarray(y, jnp.float32))
  r = mixers["titans_lmm"]._fwd(nnx.split(mac.lmm)[1], y)  # mac.lmm has titans_lmm's config
  _assert_close(c.fwd(xs), y * jax.nn.sigmoid(mac.norm_r(r)))


def test_sliding_window_attention_with_persistent_tokens(mixers, x):
  attn = mixers["titans_mag"].mixer.attn
  seg = jnp.array([[0] * 3 + [1] * 5, [0] * 8], jnp.int32)
  y = jax.jit(attn.window_call, static_argnums=2)(x, seg, 4)
  pos = np.asarray(segment_positions(seg, B, 8))
  for b in range(B):
    i = np.arange(8)
    same = np.asarray(seg[b])[:, None] == np.asarray(seg[b])[None, :]
    visible = same & (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 4)
    ref = _naive_prefix_attention(attn, x[b], x[b], pos[b], pos[b], visible)
    _assert_close(y[b], ref)


# ----------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs,field", [
    ("titans_lmm", {"num_heads": 3}, "num_heads"),
    ("titans_lmm", {"depth": 0}, "depth"),
    ("titans_lmm", {"expansion": 0.3}, "expansion"),
    ("titans_lmm", {"expansion": -1.0}, "expansion"),
    ("titans_lmm", {"activation": "relu"}, "activation"),
    ("titans_lmm", {"residual": 1}, "residual"),
    ("titans_lmm", {"chunk_size": 0}, "chunk_size"),
    ("titans_lmm", {"max_lr": 0.0}, "max_lr"),
    ("titans_lmm", {"alpha_bias_init": float("nan")}, "alpha_bias_init"),
    ("titans_lmm", {"eta_bias_init": "1"}, "eta_bias_init"),
    ("titans_lmm", {"theta_bias_init": float("inf")}, "theta_bias_init"),
    ("titans_lmm", {"use_short_conv": "no"}, "use_short_conv"),
    ("titans_lmm", {"conv_size": 1}, "conv_size"),
    ("titans_lmm", {"output_gate": None}, "output_gate"),
    ("titans_lmm", {"norm_eps": 0.0}, "norm_eps"),
    ("titans_mac", {"segment_len": 6, "chunk_size": 4}, "segment_len"),
    ("titans_mac", {"segment_len": 0}, "segment_len"),
    ("titans_mac", {"num_persistent": -1}, "num_persistent"),
    ("titans_mac", {"attn_heads": 3}, "attn_heads"),
    ("titans_mac", {"attn_heads": 16}, "attn_heads"),  # head dim 1 is odd with RoPE
    ("titans_mag", {"rope_theta": -1.0}, "rope_theta"),
    ("titans_mag", {"window": 0}, "window"),
    ("titans_mal", {"window": 2.5}, "window"),
    ("titans_mal", {"depth": 1.5}, "depth"),
])
def test_invalid_config_names_field(name, kwargs, field):
  with pytest.raises(ConfigError) as e:
    registry.validate(name, D, kwargs)
  assert e.value.field == field


def test_valid_configs_and_linear_memory_build():
  registry.validate("titans_mac", D, {"segment_len": 32, "chunk_size": 8, "num_persistent": 0})
  m = nnx.eval_shape(lambda: registry.create("titans_lmm", d_model=D, rngs=nnx.Rngs(0),
                                             depth=1, num_heads=4))
  assert m.memory_0.shape == (4, 4, 4) and not hasattr(m, "memory_1")
  assert m.state_size(2) == 3 * 2 * 4 * 16 + 3 * 2 * 3 * 16
