"""layers.linear_attention and layers.feature_maps against naive per-token implementations.

Every naive form below is written from the papers' equations in numpy float64: a python loop
over tokens with an explicit state matrix, the state reset at each document start, no
kernels. The mixers run jitted in float32 (chunk size 4, so several chunks and a document
boundary inside a chunk are exercised). The mixer contract (parallel == step, packing,
state_size) is checked for every registered name in test_mixer_contract.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import feature_maps as fm
from layers import linear_attention as la
from layers.common import ConfigError
from tests.kernels.helpers import jit_fast  # XLA level 0: these checks are compile-bound

B, T, D = 2, 11, 16
# Row 0: two documents (boundary inside a chunk of 4); row 1: three documents.
SEG = np.array([[0] * 5 + [1] * 6, [0] * 3 + [1] * 3 + [2] * 5], np.int32)
REL = 1e-5


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)


# ----------------------------------------------------------------------------------
# naive helpers (numpy float64)
# ----------------------------------------------------------------------------------


def P(v) -> np.ndarray:
  return np.asarray(v[...], np.float64)


def lin(x, layer) -> np.ndarray:
  y = np.tensordot(x, P(layer.kernel), axes=(-1, 0))
  return y + P(layer.bias) if layer.bias is not None else y


def silu(v):
  return v / (1.0 + np.exp(-v))


def sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def softplus(v):
  return np.logaddexp(0.0, v)


def rms(v, scale, eps):
  return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + eps) * scale


def l2n(v, eps=1e-6):
  return v / np.sqrt(np.sum(v * v, -1, keepdims=True) + eps)


def starts_and_positions(seg_row):
  t = len(seg_row)
  starts = np.array([i == 0 or seg_row[i] != seg_row[i - 1] for i in range(t)])
  pos = np.zeros(t, int)
  for i in range(1, t):
    pos[i] = 0 if starts[i] else pos[i - 1] + 1
  return starts, pos


def naive_phi(name, v, upper=False):
  """One feature vector, written out term by term."""
  if name == "identity":
    return v
  if name == "elu":
    return np.where(v > 0, v + 1.0, np.exp(v))
  if name == "relu":
    return np.maximum(v, 0.0)
  d = len(v)
  second = []
  for i in range(d):
    for j in range(d):
      if not upper:
        second.append(v[i] * v[j] / (math.sqrt(2) * math.sqrt(d)))
      elif i == j:
        second.append(v[i] * v[i] / (math.sqrt(2) * math.sqrt(d)))
      elif i < j:
        second.append(v[i] * v[j] / math.sqrt(d))
  return np.concatenate([[1.0], v / d ** 0.25, second])


def naive_rope(v, pos, theta):
  """v [Dh] at integer position pos; pair (i, i + Dh/2) rotated as a complex number."""
  if theta == 0:
    return v
  half = len(v) // 2
  freq = theta ** (-2.0 * np.arange(half) / len(v))
  z = (v[:half] + 1j * v[half:]) * np.exp(1j * pos * freq)
  return np.concatenate([z.real, z.imag])


def naive_conv(u, kernel, bias, seg_row):
  """Causal depthwise conv over time of u [T, C] with taps kernel [K, C]; no tap crosses a
  document boundary."""
  k = kernel.shape[0]
  y = np.zeros_like(u)
  for t in range(u.shape[0]):
    for i in range(k):
      j = t - (k - 1 - i)
      if j >= 0 and seg_row[j] == seg_row[t]:
        y[t] += kernel[i] * u[j]
  return y + (bias if bias is not None else 0.0)


def forward(m, x, seg=None):
  graphdef, params = nnx.split(m)
  fn = jit_fast(lambda p, x, s: nnx.merge(graphdef, p)(x, segment_ids=s))
  return np.asarray(fn(params, x, None if seg is None else jnp.asarray(seg)), np.float64)


def assert_close(y, ref, rel=REL):
  assert y.shape == ref.shape
  assert np.std(ref) > 1e-3, "reference output is (nearly) constant; the test would be vacuous"
  scale = max(1.0, float(np.max(np.abs(ref))))
  err = float(np.max(np.abs(y - ref)))
  assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * {scale:.3g}"


# ----------------------------------------------------------------------------------
# feature maps
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("upper", [False, True])
def test_taylor_inner_product_is_second_order_exp(upper):
  d = 6
  q = np.asarray(jax.random.normal(jax.random.key(2), (20, d)), np.float64)
  k = np.asarray(jax.random.normal(jax.random.key(3), (20, d)), np.float64)
  pq = np.asarray(fm.taylor(jnp.asarray(q, jnp.float32), upper=upper), np.float64)
  pk = np.asarray(fm.taylor(jnp.asarray(k, jnp.float32), upper=upper), np.float64)
  assert pq.shape == (20, fm.feature_dim("taylor", d, upper=upper))
  assert pq.shape[-1] == (1 + d + d * (d + 1) // 2 if upper else 1 + d + d * d)
  s = np.sum(q * k, -1)
  expected = 1.0 + s / math.sqrt(d) + s ** 2 / (2 * d)
  np.testing.assert_allclose(np.sum(pq * pk, -1), expected, rtol=1e-5)
  # And the features themselves match the term-by-term definition (up to order).
  np.testing.assert_allclose(np.sort(pq[0]), np.sort(naive_phi("taylor", q[0], upper)),
                             rtol=1e-5, atol=1e-6)


def test_elu_plus_one_is_positive_and_exact():
  v = 10.0 * jax.random.normal(jax.random.key(4), (1000,), jnp.float32)
  v = jnp.concatenate([v, jnp.array([-80.0, -20.0, 0.0, 1e-8])])
  out = fm.apply("elu", v)
  assert bool(jnp.all(out > 0))
  np.testing.assert_allclose(out, naive_phi("elu", np.asarray(v, np.float64)), rtol=1e-6)
  np.testing.assert_array_equal(fm.apply("relu", v), np.maximum(np.asarray(v), 0))
  assert fm.apply("identity", v) is v


# ----------------------------------------------------------------------------------
# 1. linear attention
# ----------------------------------------------------------------------------------


def naive_linear_attention(m, x, seg):
  cfg = m.cfg
  x = np.asarray(x, np.float64)
  wq, wk, wv, wo = P(m.q.kernel), P(m.k.kernel), P(m.v.kernel), P(m.out)
  out = np.zeros(x.shape)
  for b in range(x.shape[0]):
    starts, _ = starts_and_positions(seg[b])
    for h in range(m.num_heads):
      for t in range(x.shape[1]):
        q = naive_phi(cfg.feature_map, x[b, t] @ wq[:, h], cfg.taylor_upper)
        k = naive_phi(cfg.feature_map, x[b, t] @ wk[:, h], cfg.taylor_upper)
        v = x[b, t] @ wv[:, h]
        if starts[t]:
          s, z = np.zeros((len(k), len(v))), np.zeros(len(k))
        s = s + np.outer(k, v)
        z = z + k
        o = q @ s
        if cfg.normalize:
          o = o / (q @ z + cfg.eps)
        if cfg.out_norm:
          o = rms(o, P(m.norm.scale), 1e-5)
        out[b, t] += o @ wo[h]
  return out


@pytest.mark.parametrize("overrides", [
    dict(feature_map="elu", impl="reference"),
    dict(feature_map="taylor", feature_dim=3, taylor_upper=True, normalize=False,
         out_norm=True),
    dict(feature_map="relu", feature_dim=5),
    dict(feature_map="identity", normalize=False),
], ids=["elu-normalised-reference", "taylor-upper-outnorm", "relu", "identity"])
def test_linear_attention_matches_naive(x, overrides):
  cfg = la.LinearAttentionConfig(num_heads=2, chunk_size=4, **overrides)
  m = la.LinearAttention(D, cfg, rngs=nnx.Rngs(0))
  assert_close(forward(m, x, SEG), naive_linear_attention(m, x, SEG))


# ----------------------------------------------------------------------------------
# 2. RetNet
# ----------------------------------------------------------------------------------


def naive_retnet(m, x, seg):
  theta = m.cfg.rope_theta
  x = np.asarray(x, np.float64)
  wq, wk, wv, wg, wo = (P(m.q.kernel), P(m.k.kernel), P(m.v.kernel), P(m.g.kernel),
                        P(m.out))
  scale = P(m.norm.scale)
  out = np.zeros(x.shape)
  for b in range(x.shape[0]):
    starts, pos = starts_and_positions(seg[b])
    for h in range(m.num_heads):
      gamma = 1.0 - 2.0 ** (-5 - h)
      for t in range(x.shape[1]):
        q = naive_rope(x[b, t] @ wq[:, h], pos[t], theta) / math.sqrt(m.head_dim)
        k = naive_rope(x[b, t] @ wk[:, h], pos[t], theta)
        v = x[b, t] @ wv[:, h]
        if starts[t]:
          s = np.zeros((len(k), len(v)))
        s = gamma * s + np.outer(k, v)
        o = rms(q @ s, scale, m.cfg.norm_eps) * silu(x[b, t] @ wg[:, h])
        out[b, t] += o @ wo[h]
  return out


def test_retnet_matches_naive(x):
  m = la.RetNet(D, la.RetNetConfig(num_heads=2, chunk_size=4), rngs=nnx.Rngs(0))
  assert m.value_dim == 2 * m.head_dim
  assert_close(forward(m, x, SEG), naive_retnet(m, x, SEG))


def test_retnet_decays_are_exact():
  m = nnx.eval_shape(lambda: la.RetNet(64, la.RetNetConfig(num_heads=8), rngs=nnx.Rngs(0)))
  expected = 1.0 - 2.0 ** (-5.0 - np.arange(8))
  np.testing.assert_allclose(np.asarray(m.decays(), np.float64), expected, rtol=2e-7, atol=0)
  # In log space exact even where 1 - 2^(-5-h) rounds to 1 in float32.
  logs = np.asarray(la.retnet_log_decays(40), np.float64)
  np.testing.assert_allclose(logs, np.log1p(-(2.0 ** (-5.0 - np.arange(40)))), rtol=3e-6)
  assert np.all(logs < 0)


# ----------------------------------------------------------------------------------
# 3. GLA
# ----------------------------------------------------------------------------------


def naive_gla(m, x, seg):
  cfg = m.cfg
  x = np.asarray(x, np.float64)
  h_, dk, dv = m.num_heads, m.head_dim, m.value_dim
  out = np.zeros(x.shape)
  for b in range(x.shape[0]):
    starts, _ = starts_and_positions(seg[b])
    xb = x[b]
    q, k, v = (lin(xb, m.q).reshape(T, -1), lin(xb, m.k).reshape(T, -1),
               lin(xb, m.v).reshape(T, -1))
    if cfg.use_short_conv:
      q = silu(naive_conv(q, P(m.conv.q.kernel), None, seg[b]))
      k = silu(naive_conv(k, P(m.conv.k.kernel), None, seg[b]))
      v = silu(naive_conv(v, P(m.conv.v.kernel), None, seg[b]))
    q, k, v = q.reshape(T, h_, dk), k.reshape(T, h_, dk), v.reshape(T, h_, dv)
    logits = lin(lin(xb, m.gk_down), m.gk_up)  # [T, H, Dk]
    alpha = np.exp(-np.logaddexp(0.0, -logits) / cfg.gate_logit_normalizer)
    g = lin(xb, m.g)
    for h in range(h_):
      for t in range(T):
        if starts[t]:
          s = np.zeros((dk, dv))
        s = alpha[t, h][:, None] * s + np.outer(k[t, h], v[t, h])
        o = (q[t, h] / math.sqrt(dk)) @ s
        o = rms(o, P(m.norm.scale), cfg.norm_eps) * silu(g[t, h])
        out[b, t] += o @ P(m.out)[h]
  return out


@pytest.mark.parametrize("use_short_conv", [False, True])
def test_gla_matches_naive(x, use_short_conv):
  cfg = la.GLAConfig(num_heads=2, chunk_size=4, gate_low_rank_dim=4,
                     use_short_conv=use_short_conv)
  m = la.GLA(D, cfg, rngs=nnx.Rngs(0))
  # Make the forget gates bite (decays between ~0.6 and 1): the default init is near 0.96.
  m.gk_up.bias[...] = jax.random.normal(jax.random.key(5), m.gk_up.bias.shape) * 4.0 - 4.0
  assert_close(forward(m, x, SEG), naive_gla(m, x, SEG))


# ----------------------------------------------------------------------------------
# 4./5. DeltaNet, Gated DeltaNet
# ----------------------------------------------------------------------------------


def naive_deltanet(m, x, seg):
  cfg = m.cfg
  gated = isinstance(m, la.GatedDeltaNet)
  x = np.asarray(x, np.float64)
  h_, dk, dv = m.num_heads, m.head_dim, m.value_dim
  out = np.zeros(x.shape)
  for b in range(x.shape[0]):
    starts, _ = starts_and_positions(seg[b])
    xb = x[b]
    q, k, v = (lin(xb, m.q).reshape(T, -1), lin(xb, m.k).reshape(T, -1),
               lin(xb, m.v).reshape(T, -1))
    if cfg.use_short_conv:
      q = naive_conv(q, P(m.conv.q.kernel), None, seg[b])
      k = naive_conv(k, P(m.conv.k.kernel), None, seg[b])
      v = naive_conv(v, P(m.conv.v.kernel), None, seg[b])
    q, k, v = silu(q).reshape(T, h_, dk), silu(k).reshape(T, h_, dk), silu(v).reshape(T, h_, dv)
    beta = sigmoid(lin(xb, m.b))  # [T, H]
    if gated:
      log_a = -np.exp(P(m.A_log)) * softplus(lin(xb, m.a) + P(m.dt_bias))
    g = lin(xb, m.g) if cfg.use_gate else None
    for h in range(h_):
      for t in range(T):
        if starts[t]:
          s = np.zeros((dk, dv))
        qt = l2n(q[t, h]) / math.sqrt(dk)
        kt = l2n(k[t, h])
        if gated:
          s = np.exp(log_a[t, h]) * s
        s = s + beta[t, h] * np.outer(kt, v[t, h] - s.T @ kt)
        o = s.T @ qt
        o = rms(o, P(m.norm.scale), cfg.norm_eps)
        if g is not None:
          o = o * silu(g[t, h])
        out[b, t] += o @ P(m.out)[h]
  return out


@pytest.mark.parametrize("cls,overrides", [
    (la.DeltaNet, {}),
    (la.DeltaNet, dict(use_gate=True, use_short_conv=False, impl="reference")),
    (la.GatedDeltaNet, {}),
], ids=["deltanet", "deltanet-gate-noconv-reference", "gated_deltanet"])
def test_deltanet_matches_naive(x, cls, overrides):
  m = cls(D, cls.Config(num_heads=2, chunk_size=4, **overrides), rngs=nnx.Rngs(0))
  if cls is la.GatedDeltaNet:
    # Spread the gates: one head decays fast, the other slowly.
    m.A_log[...] = jnp.log(jnp.array([8.0, 0.5]))
  assert_close(forward(m, x, SEG), naive_deltanet(m, x, SEG))


def test_gated_deltanet_inits_and_tags():
  cfg = la.GatedDeltaNetConfig(num_heads=256, head_dim=2)
  m = la.GatedDeltaNet(512, cfg, rngs=nnx.Rngs(3))
  a = np.exp(np.asarray(m.A_log[...], np.float64))
  dt = softplus(np.asarray(m.dt_bias[...], np.float64))
  assert a.shape == dt.shape == (256,)
  assert np.all(a > 0) and np.all(a <= 16.0 * (1 + 1e-6))
  assert a.min() < 1.0 and a.max() > 15.0  # spread over (0, 16]
  assert np.all(dt >= 1e-3 * (1 - 1e-4)) and np.all(dt <= 0.1 * (1 + 1e-4))
  assert dt.min() < 1.5e-3 and dt.max() > 0.07  # log-uniform over [1e-3, 0.1]
  assert abs(np.median(np.log(dt)) - 0.5 * (math.log(1e-3) + math.log(0.1))) < 0.5
  tags = {}
  for path, v in nnx.iter_graph(m):
    if isinstance(v, nnx.Param):
      tags[".".join(map(str, path))] = v.get_metadata().get("optim_tag")
  assert tags["A_log"] == "ssm" and tags["dt_bias"] == "ssm"
  assert {p for p, t in tags.items() if t == "ssm"} == {"A_log", "dt_bias"}
  assert tags["q.kernel"] is None  # weight matrices keep weight decay
  assert m.A_log.get_metadata()["out_sharding"] == ("heads",)


def test_gated_deltanet_extreme_gates_are_finite(x):
  cfg = la.GatedDeltaNetConfig(num_heads=2, chunk_size=4)
  m = la.GatedDeltaNet(D, cfg, rngs=nnx.Rngs(0))
  # exp(A_log) * softplus(.) ~ 1e4 * 30: log decays around -3e5 (the state is wiped at
  # every token), and a second head with log decays ~ -1e-9 (no decay at all).
  m.A_log[...] = jnp.array([math.log(1e4), math.log(1e-8)], jnp.float32)
  m.dt_bias[...] = jnp.array([30.0, -20.0], jnp.float32)
  graphdef, params = nnx.split(m)
  seg = jnp.asarray(SEG)

  def loss(p, x):
    return jnp.sum(nnx.merge(graphdef, p)(x, segment_ids=seg) ** 2)

  val, (gp, gx) = jit_fast(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  assert bool(jnp.isfinite(val))
  assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.max(jnp.abs(gx))) > 0
  for leaf in jax.tree.leaves(gp):
    assert bool(jnp.all(jnp.isfinite(leaf)))
  # And the values are right, not only finite.
  assert_close(forward(m, x, SEG), naive_deltanet(m, x, SEG))


# ----------------------------------------------------------------------------------
# 6. Based
# ----------------------------------------------------------------------------------


def naive_based(m, x, seg):
  cfg = m.cfg
  x = np.asarray(x, np.float64)
  out = np.zeros(x.shape)
  swa = m.swa
  dh = swa.head_dim
  for b in range(x.shape[0]):
    starts, pos = starts_and_positions(seg[b])
    xb = x[b]
    # Taylor linear attention, normalised.
    q, k, v = lin(xb, m.q), lin(xb, m.k), lin(xb, m.v)
    for h in range(m.num_heads):
      for t in range(T):
        pq, pk = naive_phi("taylor", q[t, h]), naive_phi("taylor", k[t, h])
        if starts[t]:
          s, z = np.zeros((len(pk), m.head_dim)), np.zeros(len(pk))
        s = s + np.outer(pk, v[t, h])
        z = z + pk
        out[b, t] += ((pq @ s) / (pq @ z + cfg.eps)) @ P(m.out)[h]
    # Sliding-window softmax attention (RoPE positions restart per document).
    sq, sk, sv = lin(xb, swa.q), lin(xb, swa.k), lin(xb, swa.v)
    for h in range(swa.num_heads):
      for t in range(T):
        qt = naive_rope(sq[t, h], pos[t], cfg.window_rope_theta)
        js = [j for j in range(t + 1) if seg[b][j] == seg[b][t] and t - j < cfg.window]
        scores = np.array([qt @ naive_rope(sk[j, h], pos[j], cfg.window_rope_theta)
                           for j in js]) / math.sqrt(dh)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        out[b, t] += (p @ sv[js, h]) @ P(swa.out)[h]
    # BaseConv: out(silu(conv(W1 x)) * W2 x).
    u = lin(xb, m.conv_in)  # [T, 2, D]
    c = naive_conv(u[:, 0], P(m.conv.kernel), None, seg[b])
    out[b] += lin(silu(c) * u[:, 1], m.conv_out)
  return out


def test_based_matches_naive(x):
  cfg = la.BasedConfig(num_heads=2, feature_dim=3, window=3, window_heads=2, chunk_size=4)
  m = la.Based(D, cfg, rngs=nnx.Rngs(0))
  assert_close(forward(m, x, SEG), naive_based(m, x, SEG))
  # The two knobs set the state size: linear part H * (1 + f + f^2) * (Dv + 1), window
  # part 2 * window * D (K and V caches), conv part (K - 1) * D.
  expected = 2 * (1 + 3 + 9) * (8 + 1) + 2 * 3 * D + 2 * D
  assert m.state_size(1) == expected
  bigger = nnx.eval_shape(lambda: la.Based(D, la.BasedConfig(
      num_heads=2, feature_dim=4, window=8, window_heads=2), rngs=nnx.Rngs(0)))
  assert bigger.state_size(1) == 2 * (1 + 4 + 16) * 9 + 2 * 8 * D + 2 * D


# ----------------------------------------------------------------------------------
# 7. JRT
# ----------------------------------------------------------------------------------


def naive_jrt(m, x, seg):
  cfg = m.cfg
  M = cfg.prefix_len
  x = np.asarray(x, np.float64)
  out = np.zeros(x.shape)
  phi = lambda v: naive_phi(cfg.feature_map, v, cfg.taylor_upper)
  for b in range(x.shape[0]):
    starts, pos = starts_and_positions(seg[b])
    xb = x[b]
    q, k, v, ke, ve = (lin(xb, m.q), lin(xb, m.k), lin(xb, m.v), lin(xb, m.k_enc),
                       lin(xb, m.v_enc))
    for h in range(m.num_heads):
      for t in range(T):
        if starts[t]:
          # The encoder state of this document: its first M tokens, all of them.
          doc = [j for j in range(T) if seg[b][j] == seg[b][t] and pos[j] < M]
          s_enc = sum(np.outer(phi(ke[j, h]), ve[j, h]) for j in doc)
          z_enc = sum(phi(ke[j, h]) for j in doc)
          s, z = np.zeros_like(s_enc), np.zeros_like(z_enc)
        pk = phi(k[t, h])
        s = s + np.outer(pk, v[t, h])
        z = z + pk
        pq = phi(q[t, h])
        o = pq @ (s + s_enc)
        if cfg.normalize:
          o = o / (pq @ (z + z_enc) + cfg.eps)
        out[b, t] += o @ P(m.out)[h]
  return out


@pytest.fixture(scope="module")
def jrt():
  """A JRT mixer with prefix 4 and its jitted forward / step."""
  m = la.JRT(D, la.JRTConfig(num_heads=2, feature_dim=3, prefix_len=4, chunk_size=4),
             rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(m)
  fwd = jit_fast(lambda x, s: nnx.merge(graphdef, params)(x, segment_ids=s))
  step = jit_fast(lambda x, st: nnx.merge(graphdef, params).step(x, st))
  return m, fwd, step


def _run_steps(m, step, x, sizes):
  state = m.init_state(x.shape[0])
  ys, i = [], 0
  for n in sizes:
    y, state = step(x[:, i:i + n], state)
    ys.append(y)
    i += n
  return np.asarray(jnp.concatenate(ys, axis=1), np.float64), state


def test_jrt_matches_naive(x, jrt):
  m, fwd, _ = jrt
  y = np.asarray(fwd(x, jnp.asarray(SEG)), np.float64)
  assert_close(y, naive_jrt(m, x, SEG))
  y1 = np.asarray(fwd(x, None), np.float64)
  assert_close(y1, naive_jrt(m, x, np.zeros((B, T), np.int32)))


def test_jrt_prefix_is_non_causal_and_the_rest_is_causal(x, jrt):
  _, fwd, _ = jrt
  y = fwd(x, None)
  # Changing token 2 (inside the prefix of 4) moves token 0's output ...
  x2 = x.at[:, 2].add(1.0)
  assert float(jnp.max(jnp.abs(fwd(x2, None)[:, 0] - y[:, 0]))) > 1e-3
  # ... changing token 6 (after the prefix) moves nothing before it.
  x6 = x.at[:, 6].add(1.0)
  y6 = fwd(x6, None)
  np.testing.assert_array_equal(np.asarray(y6[:, :6]), np.asarray(y[:, :6]))
  assert float(jnp.max(jnp.abs(y6[:, 6] - y[:, 6]))) > 1e-3


def test_jrt_step_continues_from_the_combined_state(x, jrt):
  m, fwd, step = jrt
  y = np.asarray(fwd(x, None), np.float64)
  # First call covers the prefix (4 tokens); then token by token, or in chunks.
  for sizes in ((4,) + (1,) * 7, (5, 1, 5)):
    y_step, state = _run_steps(m, step, x, sizes)
    assert_close(y_step, y)
    assert int(state["pos"]) == T
  # A document shorter than the prefix: one call with the whole document.
  y_short = np.asarray(fwd(x[:, :3], None), np.float64)
  y_step, _ = _run_steps(m, step, x[:, :3], (3,))
  assert_close(y_step, y_short)


def test_jrt_step_starting_inside_the_prefix_is_nan(x, jrt):
  m, _, step = jrt
  y_step, state = _run_steps(m, step, x[:, :5], (1, 4))
  assert np.all(np.isfinite(y_step[:, :1]))  # a one-token document is fine so far ...
  assert np.all(np.isnan(y_step[:, 1:]))  # ... continuing it inside the prefix is not
  assert bool(jnp.all(jnp.isnan(state["S"])))


# ----------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kwargs,field", [
    (la.LinearAttention, dict(feature_map="softmax"), "feature_map"),
    (la.LinearAttention, dict(feature_map="identity"), "normalize"),
    (la.LinearAttention, dict(num_heads=3), "num_heads"),
    (la.LinearAttention, dict(impl="cuda"), "impl"),
    (la.RetNet, dict(expand_v=1.3), "expand_v"),
    (la.RetNet, dict(head_dim=3), "head_dim"),
    (la.GLA, dict(expand_k=0.3), "expand_k"),
    (la.GLA, dict(clamp_min=0.5), "clamp_min"),
    (la.DeltaNet, dict(conv_size=0), "conv_size"),
    (la.GatedDeltaNet, dict(dt_min=0.2), "dt_max"),
    (la.Based, dict(window_heads=3), "window_heads"),
    (la.Based, dict(window=0), "window"),
    (la.JRT, dict(prefix_len=0), "prefix_len"),
    (la.JRT, dict(chunk_size=0), "chunk_size"),
])
def test_invalid_config_names_field(cls, kwargs, field):
  with pytest.raises(ConfigError) as e:
    cls.Config(**kwargs).validate(16)
  assert e.value.field == field


def test_impl_error_lists_allowed_values():
  with pytest.raises(ConfigError) as e:
    la.GLAConfig(impl="fast").validate(64)
  for impl in ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu"):
    assert impl in str(e.value)


NAMES = ["linear_attention", "retnet", "gla", "deltanet", "gated_deltanet", "based", "jrt"]


@pytest.mark.parametrize("name", NAMES)
def test_mqar_config_validates(name):
  from configs import mqar  # pylint: disable=g-import-not-at-top
  from lcm import config as config_lib  # pylint: disable=g-import-not-at-top
  from lcm import registry  # pylint: disable=g-import-not-at-top
  assert name in registry.names()
  config_lib.validate(mqar.get_config(name), num_devices=1)
  # Default configs build at the MQAR width (shapes only, nothing is compiled).
  m = nnx.eval_shape(lambda: registry.create(name, d_model=64, rngs=nnx.Rngs(0)))
  assert m.state_size(2) == 2 * m.state_size(1) > 0
