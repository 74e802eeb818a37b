"""layers.memory_mixtures Memory Caching against naive per-token loops.

The naive forms are written from the paper's equations in numpy float64: a python loop over
tokens with explicit state matrices, a python list of cached segment memories, a softmax /
top-k over them. They read only the layers' parameters. The mixers run jitted in float32
with chunk size 4. The mixer contract (parallel == step, packing, state_size, gradients)
runs for ``memory_caching`` in test_mixer_contract.py; here step is also checked against
the naive loop where the contract config does not reach (continuing memories, SSC over a
delta-rule memory).

Memory Caching over Titans' LMM (``inner="titans_lmm"``, whose memory is an MLP's weights)
has its own naive loop (per-token gradient descent with momentum, forgetting, gradient
points at chunk starts and per-token gradient clipping, written with explicit backprop) and
its own contract-style checks (the registry-wide contract test covers one memory_caching
config, over GLA).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

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
# Memory Caching
# ----------------------------------------------------------------------------------


def mc_tokens(mc, xr, seg_row):
  """Per-token inputs of the inner memory from its parameters: (q, k, v, beta, gk, ks),
  gk the log decay ([T, H, Dk] for GLA, None otherwise). GLA: with its SiLU short
  convolutions (no bias); DeltaNet: without (plain SiLU)."""
  m, name = mc.inner, mc.cfg.inner
  if name == "gla":
    dk = m.head_dim
    conv = lambda u, c: silu(naive_conv(u.reshape(len(xr), -1), P(c.kernel), seg_row)
                             ).reshape(u.shape)
    q, k, v = lin(xr, m.q), lin(xr, m.k), lin(xr, m.v)
    if m.conv is not None:
      q, k, v = conv(q, m.conv.q), conv(k, m.conv.k), conv(v, m.conv.v)
    q = q * dk ** -0.5
    logits = lin(lin(xr, m.gk_down), m.gk_up)
    gk = -softplus(-logits) / m.cfg.gate_logit_normalizer
    return q, k, v, None, gk, k
  if name == "deltanet":
    dk = m.head_dim
    q = l2n(silu(lin(xr, m.q))) * dk ** -0.5
    k = l2n(silu(lin(xr, m.k)))
    return q, k, silu(lin(xr, m.v)), sigmoid(lin(xr, m.b)), None, k
  assert name == "linear_attention" and m.cfg.feature_map == "elu" and m.cfg.normalize
  phi = lambda a: np.where(a > 0, a + 1.0, np.exp(a))
  kr = lin(xr, m.k)
  v = lin(xr, m.v)
  v = np.concatenate([v, np.ones(v.shape[:-1] + (1,))], -1)
  return phi(lin(xr, m.q)), phi(kr), v, None, None, kr


def mc_finish(mc, o, xr):
  """The inner mixer's output stage for one row: o [T, H, Dv] -> [T, D]."""
  m, name = mc.inner, mc.cfg.inner
  if name == "linear_attention":
    o = o[..., :-1] / (o[..., -1:] + m.cfg.eps)
  elif m.g is not None:
    o = rms(o, P(m.norm.scale), m.cfg.norm_eps) * silu(lin(xr, m.g))
  else:
    o = rms(o, P(m.norm.scale), m.cfg.norm_eps)
  return np.einsum("thd,hde->te", o, P(m.out))


def naive_mc(mc, x, seg, read_cache=True):
  """Memory Caching, one token at a time: online memory, list of cached segment memories
  (``read_cache=False``: the online memory only, to show that the cache matters)."""
  cfg = mc.cfg
  seg_len, max_seg = cfg.segment_len, cfg.max_segments
  x = np.asarray(x, np.float64)
  ys = []
  for r in range(x.shape[0]):
    starts, pos = starts_and_positions(seg[r])
    q, k, v, beta, gk, ks = mc_tokens(mc, x[r], seg[r])
    u = lin(x[r], mc.gate_q)
    h, dk, dv = q.shape[1], k.shape[2], v.shape[2]
    o_row = np.zeros((x.shape[1], h, dv))
    for t in range(x.shape[1]):
      if starts[t]:
        S, cache = np.zeros((h, dk, dv)), []
      if pos[t] % seg_len == 0:
        ksum = np.zeros((h, ks.shape[2]))
        if cfg.segment_reset:
          S = np.zeros((h, dk, dv))
      for i in range(h):  # the inner recurrence
        if beta is not None:  # delta rule
          S[i] = S[i] + beta[t, i] * np.outer(k[t, i], v[t, i] - S[i].T @ k[t, i])
        else:
          if gk is not None:
            S[i] = np.exp(gk[t, i])[:, None] * S[i]
          S[i] = S[i] + np.outer(k[t, i], v[t, i])
      ksum = ksum + ks[t]
      s_now = pos[t] // seg_len
      avail = [c for c in cache if s_now - max_seg <= c[0] < s_now]
      for i in range(h):
        o = S[i].T @ q[t, i]
        if avail and read_cache:
          scores = np.array([u[t, i] @ c[2][i] for c in avail]) / math.sqrt(ks.shape[2])
          chosen = list(range(len(avail)))
          if cfg.aggregation == "topk":
            chosen = list(np.argsort(-scores, kind="stable")[:cfg.top_k])
          w = softmax(scores[chosen])
          for wj, j in zip(w, chosen):
            o = o + wj * (avail[j][1][i].T @ q[t, i])
        o_row[t, i] = o
      if pos[t] % seg_len == seg_len - 1:
        cache.append((s_now, S.copy(), ksum / seg_len))
    ys.append(mc_finish(mc, o_row, x[r]))
  return np.stack(ys)


MC_CASES = {
    # GRM over GLA (key-wise decay, short convolutions), fresh memory per segment.
    "gla_gated": dict(inner="gla", aggregation="gated", segment_len=3, max_segments=2,
                      inner_overrides=(("gate_low_rank_dim", 4), ("use_short_conv", True))),
    # SSC over DeltaNet, the memory running on across segments (checkpoints).
    "deltanet_topk_running": dict(inner="deltanet", aggregation="topk", top_k=1,
                                  segment_len=2, max_segments=3, segment_reset=False,
                                  inner_overrides=(("use_short_conv", False),)),
    # Normalised linear attention: numerators and denominators aggregated alike.
    "linear_attention_gated": dict(inner="linear_attention", aggregation="gated",
                                   segment_len=3, max_segments=4,
                                   inner_overrides=(("feature_map", "elu"),)),
}



@pytest.mark.parametrize("case", list(MC_CASES))
def test_memory_caching_matches_naive_loop(case, x):
  mc = Jitted("memory_caching", **MC_CASES[case])
  y = mc.fwd(mc.params, x, jnp.asarray(SEG))
  ref = naive_mc(mc.mixer, x, SEG)
  assert float(np.std(ref)) > 1e-2
  np.testing.assert_allclose(np.asarray(y), ref, atol=TOL, rtol=0)
  # the cached reads matter: the online memory alone gives something else
  assert float(np.max(np.abs(ref - naive_mc(mc.mixer, x, SEG, read_cache=False)))) > 1e-3
  if case == "deltanet_topk_running":  # steps of 5 tokens (segments straddle the calls)
    y_step, _ = mc.run_steps(x, 5)
    ref0 = naive_mc(mc.mixer, x, np.zeros_like(SEG))
    np.testing.assert_allclose(np.asarray(y_step), ref0, atol=TOL, rtol=0)


def test_cache_weights_select_top_k_available_segments():
  scores = jnp.array([[0.5, 3.0, 2.0, 1.0, 9.0],
                      [0.1, 0.2, 0.3, 0.4, 0.5],
                      [1.0, 2.0, 3.0, 4.0, 5.0]], jnp.float32)
  avail = jnp.array([[True, True, True, True, False],  # segment 4 not (yet) readable
                     [False, False, False, False, False],  # nothing cached yet
                     [True, False, False, False, False]])  # fewer than top_k available
  w = np.asarray(mm.cache_weights(scores, avail, 2))
  e = np.exp(np.array([3.0, 2.0]) - 3.0)
  np.testing.assert_allclose(w[0], [0, e[0] / e.sum(), e[1] / e.sum(), 0, 0], atol=1e-7)
  np.testing.assert_array_equal(w[1], np.zeros(5))
  np.testing.assert_allclose(w[2], [1, 0, 0, 0, 0], atol=1e-7)
  # gated (GRM): softmax over every available segment
  g = np.asarray(mm.cache_weights(scores, avail, None))
  e = np.exp(np.array([0.5, 3.0, 2.0, 1.0]) - 3.0)
  np.testing.assert_allclose(g[0], np.append(e / e.sum(), 0.0), atol=1e-7)
  np.testing.assert_array_equal(g[1], np.zeros(5))
  # gradients stay finite with masked and empty rows
  grad = jax.grad(lambda s: jnp.sum(mm.cache_weights(s, avail, 2) * jnp.arange(5.0)))(scores)
  assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("overrides,field", [
    ({"inner": "mamba"}, "inner"),
    ({"segment_len": 0}, "segment_len"),
    ({"aggregation": "max"}, "aggregation"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 3, "max_segments": 2}, "top_k"),
    ({"max_segments": 0}, "max_segments"),
    ({"segment_reset": 1}, "segment_reset"),
    ({"num_heads": 3}, "num_heads"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"impl": "cuda"}, "impl"),
    ({"inner_overrides": (("bogus", 1),)}, "inner_overrides"),
    ({"inner_overrides": (("num_heads", 2),)}, "inner_overrides"),
    ({"inner_overrides": (("gate_low_rank_dim", 0),)}, "inner_overrides"),
    ({"inner_overrides": 5}, "inner_overrides"),
])
def test_memory_caching_config_errors_name_the_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    registry.validate("memory_caching", 16, overrides, prefix="model.mixers.memory_caching.")
  assert e.value.field == f"model.mixers.memory_caching.{field}", str(e.value)


# ----------------------------------------------------------------------------------
# Memory Caching over Titans' LMM
# ----------------------------------------------------------------------------------


DT, TT = 16, 14  # d_model (2 heads of 8), tokens
# Row 0: one document (3 full segments + 2 tokens: eviction with max_segments=2);
# row 1: documents of 5 and 9 tokens (segments cut by the boundary, restarted after it).
SEG_T = np.array([[0] * 14, [0] * 5 + [1] * 9], np.int32)
MC_TITANS = {
    # GRM, a fresh memory per segment; chunk 3 does not divide L = 4: the chunk grid
    # restarts at every segment start (chunks of 3 + 1 tokens).
    "reset_gated": dict(inner="titans_lmm", segment_len=4, max_segments=2, chunk_size=3,
                        aggregation="gated"),
    # SSC over checkpoints of the running memory (segment_len a multiple of chunk_size);
    # the gradient clip binds on about half the tokens (norms 0.1 - 0.8 here).
    "running_topk": dict(inner="titans_lmm", segment_len=4, max_segments=2, chunk_size=2,
                         aggregation="topk", top_k=1, segment_reset=False,
                         inner_overrides=(("max_grad_norm", 0.3),)),
}
_TITANS: dict[str, Jitted] = {}


def titans_mc(case: str) -> Jitted:
  """One jitted mixer per case, shared by the tests below (compiles are the cost)."""
  if case not in _TITANS:
    _TITANS[case] = Jitted("memory_caching", d_model=DT, **MC_TITANS[case])
  return _TITANS[case]


@pytest.fixture(scope="module")
def xt():
  return jax.random.normal(jax.random.key(11), (B, TT, DT), jnp.float32)


def gelu(z):
  return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def gelu_grad(z):
  return 0.5 * (1.0 + erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def mlp_apply(ws, x):
  """The memory MLP ``x + W_L^T act(... act(W_1^T x))`` (GELU, residual) for one head."""
  a = x
  for l, w in enumerate(ws):
    a = (gelu(a) if l else a) @ w
  return a + x


def mlp_grad(ws, k, v, tau):
  """Gradient of ``mean((M(W, k) - v)^2)`` w.r.t. every W^l by explicit backprop, the whole
  gradient clipped to Frobenius norm ``tau`` (None: no clip)."""
  inputs, zs, a = [], [], k
  for l, w in enumerate(ws):
    a = gelu(zs[-1]) if l else k
    inputs.append(a)
    zs.append(a @ w)
  d = 2.0 / len(k) * (zs[-1] + k - v)
  grads = [None] * len(ws)
  for l in range(len(ws) - 1, -1, -1):
    grads[l] = np.outer(inputs[l], d)
    if l:
      d = (ws[l] @ d) * gelu_grad(zs[l - 1])
  if tau is not None:
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    grads = [g * min(1.0, tau / norm) for g in grads]
  return grads


def naive_mc_titans(mc, x, seg, read_cache=True):
  """Memory Caching over the Titans LMM, one token at a time: per head, the memory's
  weights M and momentum S (restarted from the learned initial weights at every document
  start and, with segment_reset, every segment start), the gradient point W' taken at every
  chunk start (positions since the restart that are multiples of chunk_size), then
  ``S = eta S - theta grad l(W'; k, v)``, ``M = (1 - alpha) M + S``, read ``M(M, q)`` plus
  the softmax-weighted reads ``M(M_i, q)`` of a list of cached segment-end weights."""
  cfg, lmm = mc.cfg, mc.inner
  seg_len, max_seg, chunk = cfg.segment_len, cfg.max_segments, lmm.cfg.chunk_size
  assert lmm.cfg.activation == "gelu" and lmm.cfg.residual and lmm.conv is not None
  h, dh, depth = lmm.num_heads, lmm.head_dim, lmm.cfg.depth
  w_init = [P(getattr(lmm, f"memory_{l}")) for l in range(depth)]  # [H, i, o]
  x = np.asarray(x, np.float64)
  n_tok = x.shape[1]
  ys = []
  for r in range(x.shape[0]):
    starts, pos = starts_and_positions(seg[r])
    xr = x[r]
    conv = lambda u, c: naive_conv(u.reshape(n_tok, -1), P(c.kernel), seg[r]).reshape(u.shape)
    q = l2n(silu(conv(lin(xr, lmm.q), lmm.conv.q)))  # [T, H, Dh]
    k = l2n(silu(conv(lin(xr, lmm.k), lmm.conv.k)))
    v = silu(conv(lin(xr, lmm.v), lmm.conv.v))
    logits = np.einsum("td,dgh->tgh", xr, P(lmm.gate_w)) + P(lmm.gate_b)
    theta = lmm.cfg.max_lr * sigmoid(logits[:, 0])
    eta, keep = sigmoid(logits[:, 1]), 1.0 - sigmoid(logits[:, 2])
    u = lin(xr, mc.gate_q)
    o_row = np.zeros((n_tok, h, dh))
    for t in range(n_tok):
      if starts[t]:
        cache = []
      rpos = pos[t] % seg_len if cfg.segment_reset else pos[t]
      if pos[t] % seg_len == 0:
        ksum = np.zeros((h, dh))
      if rpos == 0:
        mem = [[w[i].copy() for w in w_init] for i in range(h)]
        mom = [[np.zeros_like(w[i]) for w in w_init] for i in range(h)]
      if rpos % chunk == 0:
        point = [[w.copy() for w in mem[i]] for i in range(h)]
      for i in range(h):
        grads = mlp_grad(point[i], k[t, i], v[t, i], lmm.cfg.max_grad_norm)
        for l in range(depth):
          mom[i][l] = eta[t, i] * mom[i][l] - theta[t, i] * grads[l]
          mem[i][l] = keep[t, i] * mem[i][l] + mom[i][l]
      ksum = ksum + k[t]
      s_now = pos[t] // seg_len
      avail = [c for c in cache if s_now - max_seg <= c[0] < s_now]
      for i in range(h):
        o = mlp_apply(mem[i], q[t, i])
        if avail and read_cache:
          scores = np.array([u[t, i] @ c[2][i] for c in avail]) / math.sqrt(dh)
          chosen = list(range(len(avail)))
          if cfg.aggregation == "topk":
            chosen = list(np.argsort(-scores, kind="stable")[:cfg.top_k])
          for wj, j in zip(softmax(scores[chosen]), chosen):
            o = o + wj * mlp_apply(avail[j][1][i], q[t, i])
        o_row[t, i] = o
      if pos[t] % seg_len == seg_len - 1:
        cache.append((s_now, [[w.copy() for w in mem[i]] for i in range(h)], ksum / seg_len))
    ys.append(mc_finish(mc, o_row, xr))
  return np.stack(ys)


@pytest.mark.parametrize("case", list(MC_TITANS))
def test_memory_caching_titans_matches_naive_loop(case, xt):
  mc = titans_mc(case)
  y = mc.fwd(mc.params, xt, jnp.asarray(SEG_T))
  ref = naive_mc_titans(mc.mixer, xt, SEG_T)
  assert float(np.std(ref)) > 1e-2
  np.testing.assert_allclose(np.asarray(y), ref, atol=TOL, rtol=0)
  # the cached reads matter: the online memory alone gives something else
  assert float(np.max(np.abs(ref - naive_mc_titans(mc.mixer, xt, SEG_T,
                                                    read_cache=False)))) > 1e-3


@pytest.mark.parametrize("case", list(MC_TITANS))
def test_memory_caching_titans_contract(case, xt):
  """parallel == step (token by token and in uneven chunks, final states equal);
  packed documents do not leak; state_size == the state's element count."""
  mc = titans_mc(case)
  layer = mc.mixer
  y = mc.fwd(mc.params, xt, None)
  assert float(np.std(np.asarray(y))) > 1e-2
  y_tok, s_tok = mc.run_steps(xt, 1)
  np.testing.assert_allclose(np.asarray(y_tok), np.asarray(y), atol=TOL, rtol=0)
  state, ys, start = layer.init_state(B), [], 0
  # Uneven calls (one new compile: size 1 is the token-by-token one): segments straddle
  # them, calls start inside the LMM's chunks, and tokens 7..12 hold two segment ends.
  for n in (6, 1, 6, 1):
    y_n, state = mc.step(mc.params, xt[:, start:start + n], state)
    ys.append(y_n)
    start += n
  assert start == TT
  np.testing.assert_allclose(np.asarray(jnp.concatenate(ys, 1)), np.asarray(y), atol=TOL,
                             rtol=0)
  leaves_tok, tree_tok = jax.tree.flatten(s_tok)
  leaves_chunk, tree_chunk = jax.tree.flatten(state)
  assert tree_tok == tree_chunk
  for a, b in zip(leaves_tok, leaves_chunk):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)
  # Both cache slots were written (3 segments completed), with different memories.
  cache = [np.asarray(w) for w in state["cache"]]
  assert all(float(np.min(np.abs(c).reshape(B, 2, -1).max(-1))) > 0 for c in cache)
  assert float(np.max(np.abs(cache[0][:, 0] - cache[0][:, 1]))) > 1e-3
  # Packing: document 2 (tokens 5..13) == the same tokens run as the first document.
  doc_a = 5
  seg = jnp.asarray([[0] * doc_a + [1] * (TT - doc_a)] * B, jnp.int32)
  y_pack = np.asarray(mc.fwd(mc.params, xt, seg))
  x_first = jnp.concatenate([xt[:, doc_a:], xt[:, :doc_a]], 1)
  seg_first = jnp.asarray([[0] * (TT - doc_a) + [1] * doc_a] * B, jnp.int32)
  y_first = np.asarray(mc.fwd(mc.params, x_first, seg_first))
  np.testing.assert_allclose(y_pack[:, doc_a:], y_first[:, :TT - doc_a], atol=TOL, rtol=0)
  # Changing document 1 moves only document 1; changing document 2 moves only document 2.
  x1 = xt.at[:, :doc_a].set(jax.random.normal(jax.random.key(7), (B, doc_a, DT)))
  y1 = np.asarray(mc.fwd(mc.params, x1, seg))
  np.testing.assert_allclose(y1[:, doc_a:], y_pack[:, doc_a:], atol=TOL, rtol=0)
  assert float(np.max(np.abs(y1[:, :doc_a] - y_pack[:, :doc_a]))) > 1e-3
  x2 = xt.at[:, doc_a:].set(jax.random.normal(jax.random.key(8), (B, TT - doc_a, DT)))
  y2 = np.asarray(mc.fwd(mc.params, x2, seg))
  np.testing.assert_allclose(y2[:, :doc_a], y_pack[:, :doc_a], atol=TOL, rtol=0)
  assert float(np.max(np.abs(y2[:, doc_a:] - y_pack[:, doc_a:]))) > 1e-3
  # without segment ids, document 2 would see document 1
  assert float(np.max(np.abs(np.asarray(y)[:, doc_a:] - y_pack[:, doc_a:]))) > 1e-3
  # state_size: the element count of the real state (online (w0, m, s), cache, summaries)
  for batch in (1, 3):
    shapes = jax.eval_shape(lambda: layer.init_state(batch, jnp.float32))
    assert layer.state_size(batch) == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)
                                          if jnp.issubdtype(a.dtype, jnp.floating))
  mem = layer.inner.memory_size(1)  # 2 heads * (8 * 16 + 16 * 8)
  assert mem == 512
  assert layer.state_size(1) == (3 + 2) * mem + (1 + 2) * 2 * 8 + 3 * 3 * 16


@pytest.mark.parametrize("overrides", [
    dict(segment_len=6, chunk_size=4, segment_reset=False),
    dict(segment_len=2, chunk_size=4, segment_reset=False),
])
def test_memory_caching_titans_running_memory_needs_aligned_chunks(overrides):
  with pytest.raises(ConfigError) as e:
    registry.validate("memory_caching", 16, dict(inner="titans_lmm", num_heads=2, **overrides),
                      prefix="model.mixers.memory_caching.")
  assert e.value.field == "model.mixers.memory_caching.segment_len", str(e.value)
  assert "chunk_size=4" in str(e.value)
  # the same lengths are fine with a fresh memory per segment, or aligned
  ok = dict(overrides, segment_reset=True)
  registry.validate("memory_caching", 16, dict(inner="titans_lmm", num_heads=2, **ok))
  registry.validate("memory_caching", 16, dict(inner="titans_lmm", num_heads=2,
                                               segment_len=8, chunk_size=4,
                                               segment_reset=False))
