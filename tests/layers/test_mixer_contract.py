"""The mixer contract (docs/design.md), checked for every name in lcm.registry.

A layer family registered later inherits these tests. Per-mixer overrides (small enough to
be fast, chosen so that the interesting mechanism actually acts at T=12, e.g. a window
shorter than the sequence) go in OVERRIDES; unknown names use their registry defaults.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcm import registry
from tests.kernels.helpers import jit_fast

B, T, D = 2, 12, 16
# Uneven prefill chunks and single decode tokens, interleaved (offsets 0, 5, 6, 11: none on
# a chunk_size-4 boundary). Two step shapes, 1 and 5, both compiled for the token-by-token
# run anyway, so the chunked run adds one compile.
CHUNKS = (5, 1, 5, 1)
DOC_A, DOC_B = 5, 7  # packed row: document 1 then document 2, DOC_A + DOC_B == T
PROJ = jax.random.normal(jax.random.key(9), (B, T, D))  # the gradient tests' loss: sum(y * PROJ)
# Parameters whose gradient is zero by construction at OVERRIDES: memory_caching's top-1
# segment choice gives the chosen segment weight 1 whatever its score, so the scoring
# query gets no gradient (with top_k >= 2 it does).
# rwkv7 called alone is the first RWKV-7 layer, whose value-residual gate is unused (the
# residual mixes later layers' values towards the first one's: tests/layers/test_rwkv7.py).
ZERO_GRADIENT = {"memory_caching": {"gate_q/kernel"}, "rwkv7": {"v0", "v1", "v2"}}

OVERRIDES = {
    "attention": {"num_heads": 2},
    "swa": {"num_heads": 4, "num_kv_heads": 2, "window": 4},
    "landmark": {"num_heads": 4, "num_kv_heads": 2, "block_size": 4, "exact_len": 4,
                 "top_k": 1},
    "s4d": {"d_state": 8, "chunk_size": 4},
    "mamba": {"d_state": 4, "chunk_size": 4},
    "mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 4, "impl": "xla"},
    "linear_attention": {"chunk_size": 4, "num_heads": 2, "feature_map": "taylor",
                         "feature_dim": 4},
    "retnet": {"chunk_size": 4, "num_heads": 2},
    "gla": {"chunk_size": 4, "num_heads": 2, "use_short_conv": True, "gate_low_rank_dim": 4},
    "deltanet": {"chunk_size": 4, "num_heads": 2},
    "gated_deltanet": {"chunk_size": 4, "num_heads": 2},
    "based": {"chunk_size": 4, "num_heads": 2, "feature_dim": 4, "window": 4,
              "window_heads": 2},
    "jrt": {"chunk_size": 4, "num_heads": 2, "feature_dim": 4, "prefix_len": 1},
    "titans_lmm": {"num_heads": 2, "chunk_size": 4},
    "titans_mac": {"num_heads": 2, "chunk_size": 2, "segment_len": 4, "num_persistent": 2,
                   "attn_heads": 2},
    "titans_mag": {"num_heads": 2, "chunk_size": 4, "window": 4, "num_persistent": 2,
                   "attn_heads": 2},
    "titans_mal": {"num_heads": 2, "chunk_size": 4, "window": 4, "num_persistent": 2,
                   "attn_heads": 2},
    "memory_caching": {"chunk_size": 4, "num_heads": 2, "segment_len": 3, "max_segments": 2,
                       "aggregation": "topk", "top_k": 1,
                       "inner_overrides": (("use_short_conv", True), ("gate_low_rank_dim", 4))},
    "mom": {"chunk_size": 4, "num_heads": 2, "num_memories": 4, "top_k": 2, "expand_v": 1.0},
    # zero_init=False: the published zero output projection would make the output 0.
    "rwkv7": {"chunk_size": 4, "num_heads": 2, "zero_init": False, "decay_low_rank_dim": 4,
              "a_low_rank_dim": 4, "v_low_rank_dim": 4, "gate_low_rank_dim": 4},
}


def _accepts(fn, kwarg: str) -> bool:
  return kwarg in inspect.signature(fn).parameters


def _init_state(mixer, batch: int, max_len: int | None = None):
  if max_len is not None and _accepts(mixer.init_state, "max_len"):
    return mixer.init_state(batch, jnp.float32, max_len=max_len)
  return mixer.init_state(batch, jnp.float32)


def _tol(y) -> float:
  return 1e-5 * max(1.0, float(jnp.max(jnp.abs(y))))


class Compiled:
  """One mixer with its forward / step / grad jitted once (shared by this module's tests)."""

  def __init__(self, name: str):
    self.name = name
    self.mixer = registry.create(name, d_model=D, rngs=nnx.Rngs(0), **OVERRIDES.get(name, {}))
    graphdef, params = nnx.split(self.mixer)
    self.params = params

    def fwd(p, x, seg):
      return nnx.merge(graphdef, p)(x, segment_ids=seg)

    def step(p, x, state):
      return nnx.merge(graphdef, p).step(x, state)

    def loss(p, x):
      return jnp.sum(fwd(p, x, None) * PROJ)

    # XLA backend level 0: these tiny programs are compile-bound (this file: 267 s at the
    # suite's level 1, 172 s at level 0, one process); one executable per argument shapes.
    self._fwd = jit_fast(fwd)
    self._step = jit_fast(step)
    self._grad = jit_fast(jax.grad(loss, argnums=(0, 1)))

  def fwd(self, x, seg=None):
    return self._fwd(self.params, x, seg)

  def step(self, x, state):
    return self._step(self.params, x, state)

  def grad(self, x):
    """Gradients of sum(y * PROJ) w.r.t. the parameters and x."""
    return self._grad(self.params, x)

  def run_chunks(self, x, sizes):
    state = _init_state(self.mixer, x.shape[0], max_len=x.shape[1])
    ys, start = [], 0
    for n in sizes:
      y, state = self.step(x[:, start:start + n], state)
      ys.append(y)
      start += n
    assert start == x.shape[1]
    return jnp.concatenate(ys, axis=1), state


@pytest.fixture(scope="module", params=registry.names())
def mixer(request):
  return Compiled(request.param)


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)


@pytest.fixture(scope="module")
def runs(mixer, x):
  """Parallel output, token-by-token (output, state), chunked (output, state)."""
  y = mixer.fwd(x)
  y_tok, s_tok = mixer.run_chunks(x, [1] * T)
  y_chunk, s_chunk = mixer.run_chunks(x, CHUNKS)
  return y, (y_tok, s_tok), (y_chunk, s_chunk)


def test_parallel_equals_step_token_by_token_and_chunked(mixer, runs):
  y, (y_tok, _), (y_chunk, _) = runs
  assert y.shape == (B, T, D)
  assert float(jnp.std(y)) > 1e-3, "output is (nearly) constant; the test would be vacuous"
  np.testing.assert_allclose(y_tok, y, atol=_tol(y), rtol=0)
  np.testing.assert_allclose(y_chunk, y, atol=_tol(y), rtol=0)


def test_final_state_independent_of_chunking(mixer, runs):
  _, (_, s_tok), (_, s_chunk) = runs
  leaves_tok, tree_tok = jax.tree.flatten(s_tok)
  leaves_chunk, tree_chunk = jax.tree.flatten(s_chunk)
  assert tree_tok == tree_chunk
  assert leaves_tok, "state has no leaves"
  for a, b in zip(leaves_tok, leaves_chunk):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, atol=_tol(a), rtol=0)
  # The state keeps the initial state's structure, shapes and dtypes (generate() decodes in
  # a lax.scan with the state as its carry) and actually carries the sequence.
  init, tree_init = jax.tree.flatten(_init_state(mixer.mixer, B, max_len=T))
  assert tree_init == tree_tok
  assert [(a.shape, a.dtype) for a in init] == [(a.shape, a.dtype) for a in leaves_tok]
  assert any(not np.array_equal(a, b) for a, b in zip(init, leaves_tok))


def test_packed_documents_are_isolated(mixer, x):
  seg = jnp.array([[0] * DOC_A + [1] * DOC_B] * B, jnp.int32)
  y = mixer.fwd(x, seg)
  # Document 2 in the packed row == document 2 run alone (positions restart at 0). "Alone" =
  # at the start of a row without segment ids, followed by document 1 (which, by causality,
  # it does not see): the same [B, T, D] forward as the other calls, so no extra compile.
  y_alone = mixer.fwd(jnp.concatenate([x[:, DOC_A:], x[:, :DOC_A]], axis=1))[:, :DOC_B]
  np.testing.assert_allclose(y[:, DOC_A:], y_alone, atol=_tol(y), rtol=0)
  # Changing document 1 does not move document 2's outputs (but does move document 1's).
  x1 = x.at[:, :DOC_A].set(jax.random.normal(jax.random.key(7), (B, DOC_A, D)))
  y1 = mixer.fwd(x1, seg)
  np.testing.assert_allclose(y1[:, DOC_A:], y[:, DOC_A:], atol=_tol(y), rtol=0)
  assert float(jnp.max(jnp.abs(y1[:, :DOC_A] - y[:, :DOC_A]))) > 1e-3
  # Changing document 2 does not move document 1's outputs.
  x2 = x.at[:, DOC_A:].set(jax.random.normal(jax.random.key(8), (B, DOC_B, D)))
  y2 = mixer.fwd(x2, seg)
  np.testing.assert_allclose(y2[:, :DOC_A], y[:, :DOC_A], atol=_tol(y), rtol=0)
  assert float(jnp.max(jnp.abs(y2[:, DOC_A:] - y[:, DOC_A:]))) > 1e-3
  # Segments matter: without them document 2 would see document 1.
  y_noseg = mixer.fwd(x)
  assert float(jnp.max(jnp.abs(y_noseg[:, DOC_A:] - y[:, DOC_A:]))) > 1e-3


def _float_elements(state) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state)
             if jnp.issubdtype(leaf.dtype, jnp.floating))


def test_state_size(mixer):
  m = mixer.mixer
  s1 = m.state_size(1)
  s3 = m.state_size(3)
  assert isinstance(s1, int) and s1 > 0
  assert s3 == 3 * s1
  assert s1 == _float_elements(jax.eval_shape(lambda: m.init_state(1, jnp.float32)))
  assert s3 == _float_elements(jax.eval_shape(lambda: m.init_state(3, jnp.float32)))
  if _accepts(m.state_size, "max_len"):
    assert m.state_size(2, max_len=T) == _float_elements(_init_state(m, 2, max_len=T))


@pytest.fixture(scope="module")
def grads(mixer, x):
  return mixer.grad(x)


def test_every_parameter_gets_a_finite_nonzero_gradient(mixer, grads):
  """No dead parameter (e.g. a gate that a refactor stopped using, or a stop_gradient in
  the wrong place): each parameter array's gradient is finite and somewhere nonzero."""
  dead, seen = set(), set()
  for path, g in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads[0]))[0]:
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    seen.add(key)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), key
    if not np.any(g):
      dead.add(key)
  assert seen, "no parameters"
  assert dead == ZERO_GRADIENT.get(mixer.name, set()), sorted(dead)


def test_gradient_is_finite_and_matches_finite_differences(mixer, x, grads):
  g = grads[1]
  assert g.shape == x.shape
  assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.max(jnp.abs(g))) > 0
  # The gradient is the derivative of the forward (a wrong sign or a dropped term in a
  # custom VJP, in the kernels or a layer, fails this): central differences of the loss
  # along random unit directions v, with the compiled forward, against <g, v>. Unit: the typical
  # |<g, v>| = |g| / sqrt(n). Measured when written: errors <= 6e-4 of it at eps 1e-2 for
  # every mixer; a sign error in 20% of the gradient's norm moves <g, v> by ~0.4 of it.
  # (Random directions, not g's own: along g, normalised layers such as retnet's curve
  # so much that the difference quotient needs eps ~1e-4, where float32 rounding takes over.)
  eps, unit = 1e-2, float(jnp.linalg.norm(g)) / np.sqrt(g.size)
  loss = lambda z: float(jnp.sum(mixer.fwd(z) * PROJ))
  for seed in (3, 4):
    v = jax.random.normal(jax.random.key(seed), x.shape, x.dtype)
    v = v / jnp.linalg.norm(v)
    fd = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    assert abs(fd - float(jnp.sum(g * v))) < 2e-2 * unit, (seed, fd, float(jnp.sum(g * v)))
