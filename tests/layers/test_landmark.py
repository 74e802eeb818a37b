"""Landmark attention (layers/landmark.py) against a float64 per-query loop written from the
paper's definitions, plus the LM's landmark-token insertion (lcm/model.py).

The registry-wide contract (parallel == step == chunked step, packed documents) runs in
test_mixer_contract.py with retrieval active (OVERRIDES["landmark"]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from layers import landmark as landmark_lib
from layers import landmark_tokens
from lcm import model as model_lib
from lcm import registry
from tests.kernels.helpers import jit_fast  # XLA level 0: these checks are compile-bound

B, D, H, BS = 2, 16, 2, 4


def make(**overrides):
  cfg = {"num_heads": H, "block_size": BS, "max_len": 64, **overrides}
  return registry.create("landmark", d_model=D, rngs=nnx.Rngs(0), **cfg)


def rope64(x, pos, theta=10000.0):
  """Rotate-half RoPE of one vector x [Dh] at integer position pos, float64."""
  half = x.shape[-1] // 2
  ang = pos * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  c, s = np.cos(ang), np.sin(ang)
  return np.concatenate([x[:half] * c - x[half:] * s, x[half:] * c + x[:half] * s])


def naive_heads(m, x, *, exact_len, top_k, keep_previous=False):
  """Per-head outputs [B, T, H, Dh] by a float64 loop over queries (the paper's grouped
  softmax; beyond ``exact_len`` the per-token top-k retrieval with the position mapping;
  ``keep_previous``: the block before the query's is always chosen)."""
  q, k, v = (np.asarray(a, np.float64) for a in m._heads(x))
  _, t, h, dh = q.shape
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for hh in range(h):
      for i in range(t):
        blk = i // BS
        qi = rope64(q[b, i, hh], i)
        score = lambda j, p: float(qi @ rope64(k[b, j, hh], p)) / np.sqrt(dh)
        if i < exact_len:
          chosen = list(range(blk))
          slot = {c: c for c in chosen}
        else:
          cand = list(range(blk))
          sel = [np.inf if keep_previous and c == blk - 1 else
                 score(c * BS + BS - 1, blk * BS - 1) for c in cand]
          chosen = sorted(c for _, c in sorted(zip(sel, cand), reverse=True)[:top_k])
          slot = {c: blk - len(chosen) + r for r, c in enumerate(chosen)}
        # top group: own block's tokens (not its landmark) + the chosen blocks' landmarks
        local = [j for j in range(blk * BS, i + 1) if j % BS != BS - 1]
        ls = {j: score(j, j) for j in local}
        gate = {c: score(c * BS + BS - 1, slot[c] * BS + BS - 1) for c in chosen}
        z = sum(np.exp(s) for s in ls.values()) + sum(np.exp(g) for g in gate.values())
        o = sum(np.exp(ls[j]) / z * v[b, j, hh] for j in local)
        for c in chosen:
          toks = range(c * BS, c * BS + BS - 1)
          s = np.array([score(j, slot[c] * BS + j - c * BS) for j in toks])
          p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
          o = o + np.exp(gate[c]) / z * (p @ v[b, list(toks), hh])
        out[b, i, hh] = o
  return out


_fwd = jit_fast(lambda m, x: m(x))
_step = jit_fast(lambda m, x, s: m.step(x, s))


def project(m, heads):
  return np.asarray(m._project(jnp.asarray(heads, jnp.float32)))


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(1), (B, 22, D))


def test_grouped_softmax_matches_float64_loop(x):
  m = make(exact_len=64)
  want = project(m, naive_heads(m, x, exact_len=64, top_k=0))
  np.testing.assert_allclose(np.asarray(_fwd(m, x)), want, atol=2e-5, rtol=0)


def test_topk_retrieval_matches_float64_loop(x):
  m = make(exact_len=8, top_k=2)  # blocks 2..5 retrieve 2 of up to 4 earlier blocks
  want = project(m, naive_heads(m, x, exact_len=8, top_k=2))
  got = np.asarray(_fwd(m, x))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  exact = np.asarray(_fwd(make(exact_len=64), x))
  assert np.abs(got - exact)[:, 12:].max() > 1e-2  # retrieval really dropped blocks


@pytest.mark.parametrize("top_k", [1, 2])
def test_keep_previous_matches_float64_loop_in_every_form(x, top_k):
  """The block before the query's is always retrieved: blockwise (parallel), step and
  packed forms against the float64 loop; it changes the output where top-k dropped it."""
  m = make(exact_len=0, top_k=top_k, keep_previous=True)
  want = project(m, naive_heads(m, x, exact_len=0, top_k=top_k, keep_previous=True))
  np.testing.assert_allclose(np.asarray(_fwd(m, x)), want, atol=2e-5, rtol=0)
  y, _ = _step(m, x, m.init_state(B))
  np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=0)
  seg = jnp.array([[0] * 9 + [1] * 13] * B)
  packed = np.asarray(jit_fast(lambda m, x, s: m(x, s))(m, x, seg))
  np.testing.assert_allclose(packed[:, :9], np.asarray(_fwd(m, x[:, :9])), atol=2e-5, rtol=0)
  np.testing.assert_allclose(packed[:, 9:], np.asarray(_fwd(m, x[:, 9:])), atol=2e-5, rtol=0)
  plain = np.asarray(_fwd(make(exact_len=0, top_k=top_k), x))
  assert np.abs(plain - want).max() > 1e-2  # plain top-k drops the previous block somewhere


def test_k_all_blocks_equals_grouped_softmax_training_forward(x):
  """#6 item 2: retrieving every earlier block (all positions retrieve, exact_len=0) is the
  grouped-softmax forward, in the parallel and the step form."""
  exact = make(exact_len=64)
  ret = make(exact_len=0, top_k=8)  # 22 tokens = 6 blocks: k covers them all
  want = np.asarray(_fwd(exact, x))
  np.testing.assert_allclose(np.asarray(_fwd(ret, x)), want, atol=1e-5, rtol=0)
  y, _ = _step(ret, x, ret.init_state(B))
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, rtol=0)


def test_packed_rows_retrieve_like_documents_alone(x):
  """Packed rows take the dense per-token retrieval form; it equals each document run
  alone (the blockwise form), with retrieval dropping blocks in both documents."""
  m = make(exact_len=4, top_k=1)
  seg = jnp.array([[0] * 9 + [1] * 13] * B)
  packed = np.asarray(jit_fast(lambda m, x, s: m(x, s))(m, x, seg))
  np.testing.assert_allclose(packed[:, :9], np.asarray(_fwd(m, x[:, :9])), atol=2e-5, rtol=0)
  np.testing.assert_allclose(packed[:, 9:], np.asarray(_fwd(m, x[:, 9:])), atol=2e-5, rtol=0)
  full = np.asarray(_fwd(make(exact_len=64), x[:, 9:]))
  assert np.abs(packed[:, 9:] - full).max() > 1e-2


def test_weights_sum_to_one_and_landmarks_get_none():
  t = 11
  s = jax.random.normal(jax.random.key(2), (1, 1, t, t)) * 3
  pos = jnp.arange(t)[None]
  vis = (pos[0][:, None] >= pos[0][None, :])[None]
  weights = jax.jit(landmark_lib.grouped_softmax_weights, static_argnums=(5,))
  w = np.asarray(weights(s, pos, pos, vis, None, BS))[0, 0]
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  assert np.all(w[:, BS - 1::BS] == 0)  # landmark values are never read
  assert np.all(w[np.triu_indices(t, 1)] == 0)  # causal
  # Packed-row (segment) form of the same single document gives the same weights.
  grp = (pos - pos % BS).astype(jnp.int32)
  w2 = np.asarray(weights(s, pos, pos, vis, grp, BS))[0, 0]
  np.testing.assert_allclose(w2, w, atol=1e-6)
  # Block 0 (3 tokens + landmark) seen from block 2: its mass is the landmark's top prob.
  i = 9
  top = [8, 9, 3, 7]  # own block's tokens, landmarks of blocks 0 and 1
  p = np.exp(np.asarray(s)[0, 0, i, top]) / np.exp(np.asarray(s)[0, 0, i, top]).sum()
  np.testing.assert_allclose(w[i, 0:3].sum(), p[2], rtol=1e-5)
  np.testing.assert_allclose(w[i, 4:7].sum(), p[3], rtol=1e-5)


def test_masked_out_scores_never_reach_the_gradient():
  """A score the mask hides (here a future key's) may be huge: exp(s - max) overflows to
  inf there, and where(mask, inf, 0) has a NaN gradient (inf * 0). The weights and their
  gradient must be those of the same scores with the hidden entries set to 0. (Found as a
  NaN gradient at step 596 of a joint-recall run, session 9.)"""
  t = 11
  s = jax.random.normal(jax.random.key(3), (1, 1, t, t)) * 3
  pos = jnp.arange(t)[None]
  vis = (pos[0][:, None] >= pos[0][None, :])[None]
  grp = (pos - pos % BS).astype(jnp.int32)
  future = np.triu(np.ones((t, t), bool), 1)
  r = jax.random.normal(jax.random.key(4), (t, t))
  for group in (None, grp):
    f = jax.jit(jax.value_and_grad(lambda z, g=group: jnp.sum(
        landmark_lib.grouped_softmax_weights(z, pos, pos, vis, g, BS) * r)))
    val0, g0 = f(jnp.where(future, 0.0, s))
    val, g = f(jnp.where(future, 200.0, s))  # exp(200) overflows fp32
    assert np.all(np.isfinite(np.asarray(g))), group
    np.testing.assert_allclose(float(val), float(val0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), atol=1e-6)
    assert np.all(np.asarray(g)[0, 0][future] == 0)


def test_gradients_flow_through_gates_and_retrieval(x):
  m = make(exact_len=8, top_k=2)
  g = jit_fast(lambda m, xx: jax.grad(lambda z: jnp.sum(m(z) ** 2))(xx))(m, x)
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g[:, :4]).max()) > 0
  # Perturbing an early token moves a late output only through retrieval / the gates.
  y = _fwd(m, x)
  y2 = _fwd(m, x.at[:, 1].add(1.0))
  assert float(jnp.abs(y2[:, -1] - y[:, -1]).max()) > 1e-6


def test_host_memory_cache_matches_device_cache(x):
  dev = make(exact_len=8, top_k=2)
  host = make(exact_len=8, top_k=2, kv_memory="pinned_host")
  state = host.init_state(B)
  assert state["k"].sharding.memory_kind == "pinned_host"
  y_host, new = jit_fast(lambda m, xx, s: m.step(xx, s))(host, x, state)
  y_dev, _ = _step(dev, x, dev.init_state(B))
  np.testing.assert_array_equal(np.asarray(y_host), np.asarray(y_dev))
  assert new["k"].sharding.memory_kind == "pinned_host"


def test_bad_config_names_the_field():
  from layers.common import ConfigError  # pylint: disable=g-import-not-at-top
  for field, value in [("block_size", 1), ("exact_len", 6), ("top_k", 0),
                       ("keep_previous", 1),
                       ("kv_memory", "disk"), ("window", 8)]:
    with pytest.raises(ConfigError) as e:
      make(**{field: value})
    assert field in str(e.value)


# ------------------------------------------------------------------ the LM inserts landmarks


def test_landmark_layout_per_document():
  seg = jnp.array([[0, 0, 0, 0, 0, 1, 1, 1, 1]])
  tok, lm, has, ext = landmark_tokens.landmark_layout(seg, 1, 9, 3)  # a landmark after 3 tokens
  assert ext == 12
  assert tok[0].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 10]
  assert np.asarray(has[0]).nonzero()[0].tolist() == [2, 7]
  assert lm[0][np.asarray(has[0])].tolist() == [3, 9]


def tiny_lm(pattern="landmark", **landmark):
  from lcm import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config().model
  c.vocab_size, c.d_model, c.num_layers, c.pattern, c.mlp_ratio = 32, D, 2, pattern, 2.0
  c.remat = c.scan_layers = False  # compile time (one group of two layers)
  c.mixers = ml_collections.ConfigDict({
      "landmark": {"num_heads": H, "block_size": BS, **landmark},
      "mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 4, "impl": "xla"}})
  return model_lib.LM(c, rngs=nnx.Rngs(0))


def test_lm_with_landmarks_step_equals_parallel_and_uses_them():
  m = tiny_lm("mamba2,landmark", exact_len=8, top_k=1)
  assert m.layout.every == BS - 1
  tok = jax.random.randint(jax.random.key(3), (B, 13), 0, 32)
  want = np.asarray(_fwd(m, tok))
  assert want.shape == (B, 13, 32)
  st = m.init_state(B, max_len=13)
  a, st = _step(m, tok[:, :5], st)
  b, st = _step(m, tok[:, 5:], st)
  np.testing.assert_allclose(np.concatenate([a, b], 1), want, atol=2e-5, rtol=0)
  assert int(st["tokens"]) == 13
  m.layout.embedding[...] = m.layout.embedding[...] + 1.0  # the landmark embedding reaches the logits
  moved = np.asarray(_fwd(m, tok))
  assert np.abs(moved[:, 3:] - want[:, 3:]).max() > 1e-4
  np.testing.assert_allclose(moved[:, :3], want[:, :3], atol=1e-6)
