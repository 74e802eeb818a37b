"""layers.attention against a naive numpy implementation (loops over heads, explicit masks)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import Attention, AttentionConfig, apply_rope
from layers.common import ConfigError
from tests.kernels.helpers import jit_fast  # XLA level 0: these checks are compile-bound

B, T, D = 2, 10, 16


def naive_rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
  """x [T, Dh], pos [T]: rotate pair (i, i + Dh/2) by pos * theta^(-2i/Dh), as a complex number."""
  if theta == 0:
    return x
  half = x.shape[-1] // 2
  freq = theta ** (-2.0 * np.arange(half) / x.shape[-1])
  z = (x[:, :half] + 1j * x[:, half:]) * np.exp(1j * pos[:, None] * freq[None, :])
  return np.concatenate([z.real, z.imag], axis=-1)


def naive_attention(m: Attention, x: np.ndarray, seg: np.ndarray | None) -> np.ndarray:
  cfg = m.cfg
  h, hkv, dh = m.num_heads, m.num_kv_heads, m.head_dim
  wq = np.asarray(m.q.kernel[...], np.float64)
  wk = np.asarray(m.k.kernel[...], np.float64)
  wv = np.asarray(m.v.kernel[...], np.float64)
  wo = np.asarray(m.out[...], np.float64)
  x = np.asarray(x, np.float64)
  bsz, t, _ = x.shape
  out = np.zeros((bsz, t, x.shape[-1]))
  for b in range(bsz):
    s = np.zeros(t, int) if seg is None else np.asarray(seg[b])
    pos = np.zeros(t, int)  # position inside the document, restarting at each new segment
    for i in range(1, t):
      pos[i] = pos[i - 1] + 1 if s[i] == s[i - 1] else 0
    mask = np.zeros((t, t), bool)
    for i in range(t):
      for j in range(t):
        mask[i, j] = (j <= i and s[i] == s[j]
                      and (cfg.window is None or i - j < cfg.window))
    for head in range(h):
      kvh = head // (h // hkv)
      q = naive_rope(x[b] @ wq[:, head], pos, cfg.rope_theta)
      k = naive_rope(x[b] @ wk[:, kvh], pos, cfg.rope_theta)
      v = x[b] @ wv[:, kvh]
      scores = q @ k.T / np.sqrt(dh)
      scores = np.where(mask, scores, -np.inf)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b] += (p @ v) @ wo[head]
  return out


CASES = {
    "mha": AttentionConfig(num_heads=4),
    "gqa": AttentionConfig(num_heads=4, num_kv_heads=2),
    "window3": AttentionConfig(num_heads=4, num_kv_heads=2, window=3),
    "mqa_norope_hd6": AttentionConfig(num_heads=2, num_kv_heads=1, head_dim=6, rope_theta=0),
}


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(3), (B, T, D), jnp.float32)


@pytest.fixture(scope="module")
def seg():
  return jnp.array([[0] * 4 + [1] * 6, [0] * 7 + [3] * 3], jnp.int32)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_naive(case, x, seg):
  m = Attention(D, CASES[case], rngs=nnx.Rngs(5))
  fwd = jit_fast(lambda m, x, s: m(x, segment_ids=s))
  y = fwd(m, x, seg)
  ref = naive_attention(m, np.asarray(x), np.asarray(seg))
  np.testing.assert_allclose(y, ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0)
  if case == "gqa":  # also without segments
    np.testing.assert_allclose(fwd(m, x, None), naive_attention(m, np.asarray(x), None),
                               atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0)


def test_rope_matches_naive_and_is_relative():
  theta = 10000.0
  rng = np.random.default_rng(0)
  q = rng.standard_normal((1, 6, 2, 8)).astype(np.float32)
  k = rng.standard_normal((1, 6, 2, 8)).astype(np.float32)
  pos = np.arange(6)[None] * 3
  rope = jax.jit(apply_rope, static_argnums=2)
  rq = rope(q, pos, theta)
  np.testing.assert_allclose(rq[0, :, 1], naive_rope(np.asarray(q[0, :, 1], np.float64),
                                                     pos[0], theta), atol=1e-5)
  # A rotation: norms are preserved, position 0 is the identity.
  np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(rope(q, np.zeros((1, 6), np.int32), theta), q, atol=1e-7)

  @jax.jit
  def scores(shift):
    a = apply_rope(q, pos + shift, theta)
    b = apply_rope(k, pos + shift, theta)
    return jnp.einsum("bqhd,bkhd->bhqk", a, b)

  s0 = scores(0)
  np.testing.assert_allclose(scores(17), s0, atol=1e-4)
  np.testing.assert_allclose(scores(1000), s0, atol=1e-3)
  # ... while the scores do depend on relative positions (the test is not vacuous).
  unrotated = np.einsum("bqhd,bkhd->bhqk", q, k)
  assert float(np.max(np.abs(s0 - unrotated))) > 1e-2
  assert apply_rope(q, pos, 0.0) is q


def test_bf16_close_to_fp32(x):
  cfg = AttentionConfig(num_heads=4, num_kv_heads=2, window=5)
  m32 = Attention(D, cfg, rngs=nnx.Rngs(2))
  m16 = Attention(D, cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
  assert m16.q.kernel[...].dtype == jnp.float32  # params stay fp32
  y32 = jit_fast(lambda m, x: m(x))(m32, x)
  y16 = jit_fast(lambda m, x: m(x))(m16, x)
  assert y16.dtype == jnp.bfloat16
  rel = jnp.sqrt(jnp.mean((y16.astype(jnp.float32) - y32) ** 2) / jnp.mean(y32 ** 2))
  assert float(rel) < 2e-2
  # bf16 decoding with a bf16 cache runs and agrees too.
  state = m16.init_state(B, jnp.bfloat16, max_len=T)
  y_step, state = jit_fast(lambda m, x, s: m.step(x, s))(m16, x, state)
  assert y_step.dtype == jnp.bfloat16 and state["k"].dtype == jnp.bfloat16
  rel = jnp.sqrt(jnp.mean((y_step.astype(jnp.float32) - y32) ** 2) / jnp.mean(y32 ** 2))
  assert float(rel) < 2e-2


def test_full_cache_overflow_is_sliding_window(x):
  """Past max_len tokens a full-attention cache behaves as a window of max_len, for any split."""
  m_full = Attention(D, AttentionConfig(num_heads=2), rngs=nnx.Rngs(4))
  m_win = Attention(D, AttentionConfig(num_heads=2, window=4), rngs=nnx.Rngs(4))
  y_win = jit_fast(lambda m, x: m(x))(m_win, x)
  step = jit_fast(lambda m, x, s: m.step(x, s))
  for sizes in ([1] * T, [3, 7]):
    state = m_full.init_state(B, max_len=4)
    assert state["k"].shape == (B, 4, 2, D // 2)
    ys, start = [], 0
    for n in sizes:
      y, state = step(m_full, x[:, start:start + n], state)
      ys.append(y)
      start += n
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y_win, atol=1e-5)
    np.testing.assert_array_equal(state["slot_pos"], np.arange(T - 4, T))
    assert int(state["pos"]) == T
  # ... and differs from true full attention, so the check above is not vacuous.
  y_full = jit_fast(lambda m, x: m(x))(m_full, x)
  assert float(jnp.max(jnp.abs(y_full - y_win))) > 1e-3


def test_cache_shapes_and_state_size():
  m = Attention(D, AttentionConfig(num_heads=4, num_kv_heads=2, window=8, max_len=32),
                rngs=nnx.Rngs(0))
  s = m.init_state(3)
  assert s["k"].shape == (3, 8, 2, 4) and s["v"].shape == (3, 8, 2, 4)
  assert s["slot_pos"].dtype == jnp.int32 and s["pos"].dtype == jnp.int32
  assert bool(jnp.all(s["slot_pos"] == -1)) and int(s["pos"]) == 0
  assert m.state_size(3) == 2 * 3 * 8 * 2 * 4
  assert m.init_state(1, max_len=5)["k"].shape[1] == 5  # min(window, max_len)
  full = Attention(D, AttentionConfig(max_len=32), rngs=nnx.Rngs(0))
  assert full.init_state(1)["k"].shape[1] == 32
  assert full.state_size(2, max_len=7) == 2 * 2 * 7 * 4 * 4


def test_param_axes():
  m = Attention(D, AttentionConfig(num_heads=4, num_kv_heads=2), rngs=nnx.Rngs(0))
  assert m.q.kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
  assert m.k.kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads", "head_dim")
  assert m.v.kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads", "head_dim")
  assert m.out.get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")
  assert m.out[...].shape == (4, 4, D)


def test_bad_input_shape():
  m = Attention(D, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\[B, T, 16\]"):
    m(jnp.zeros((2, 5, 8)))


def test_positions_restart_at_document_start(monkeypatch, x):
  """RoPE is relative, so a missing position restart is invisible in the outputs up to rounding.
  Swap in an absolute position encoding to see the positions the layer actually uses."""
  import layers.attention as attention_lib  # pylint: disable=g-import-not-at-top

  def absolute(v, positions, theta):
    del theta
    return v + 0.1 * jnp.broadcast_to(positions, v.shape[:2])[..., None, None].astype(v.dtype)

  monkeypatch.setattr(attention_lib, "apply_rope", absolute)
  m = Attention(D, AttentionConfig(num_heads=2), rngs=nnx.Rngs(6))
  fwd = jit_fast(lambda m, x, s: m(x, segment_ids=s))
  seg = jnp.array([[0] * 4 + [1] * 6] * B, jnp.int32)
  y = fwd(m, x, seg)
  np.testing.assert_allclose(y[:, 4:], fwd(m, x[:, 4:], None), atol=1e-5)
  # The encoding is not shift-invariant, so the check above can fail: shifting doc 2's
  # positions by 4 (what a missing restart would do) moves its outputs.
  y_shift = jit_fast(lambda m, x: m._attend(*m._qkv(x, jnp.arange(4, 10)),  # pylint: disable=protected-access
                                           jnp.tril(jnp.ones((6, 6), bool))[None]))(m, x[:, 4:])
  assert float(jnp.max(jnp.abs(y_shift - y[:, 4:]))) > 1e-3


# ------------------------------------------------- sliding window on the block-sparse kernel

BS = 8  # block_size of the kernel-path tests: T = 32 is 4 blocks


def _dense_window(m: Attention, x):
  """The dense masked path (what ``__call__`` ran before the kernel path) for one document."""
  t = x.shape[1]
  i = jnp.arange(t)
  mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < m.cfg.window)
  return m._attend(*m._qkv(x, jnp.arange(t)), mask[None])  # pylint: disable=protected-access


@pytest.mark.parametrize("t,cfg", [
    (32, AttentionConfig(num_heads=4, num_kv_heads=2, window=11, block_size=BS)),  # 4 blocks, GQA
    (29, AttentionConfig(num_heads=4, num_kv_heads=1, window=8, block_size=BS)),   # padded to 32
], ids=["gqa_T4blocks", "mqa_T_padded"])
def test_window_kernel_path_matches_dense(t, cfg, monkeypatch):
  import layers.attention as attention_lib  # pylint: disable=g-import-not-at-top
  calls = []
  real = attention_lib.block_sparse_attention

  def spy(q, *a, **kw):
    calls.append((q.shape, kw["block_size"], kw["window"]))
    return real(q, *a, **kw)

  monkeypatch.setattr(attention_lib, "block_sparse_attention", spy)
  x = jax.random.normal(jax.random.key(7), (B, t, D), jnp.float32)
  m = Attention(D, cfg, rngs=nnx.Rngs(8))
  assert m.uses_block_sparse(t) and not m.uses_block_sparse(t, jnp.zeros((B, t), jnp.int32))
  y = jit_fast(lambda m, x: m(x))(m, x)
  # the kernel ran, on T padded up to a multiple of the block
  assert calls == [((B, 32, cfg.num_heads, D // cfg.num_heads), BS, cfg.window)]
  assert y.shape == (B, t, D)
  y_dense = jit_fast(_dense_window)(m, x)
  np.testing.assert_allclose(y, y_dense, atol=1e-5, rtol=0)
  np.testing.assert_allclose(y, naive_attention(m, np.asarray(x), None), atol=2e-5, rtol=0)
  # gradients w.r.t. x through the kernel's custom VJP agree with the dense path's
  w = jax.random.normal(jax.random.key(9), (B, t, D), jnp.float32)
  grad = lambda f: jit_fast(lambda m, x: jax.grad(lambda x: jnp.sum(f(m, x) * w))(x))(m, x)
  np.testing.assert_allclose(grad(lambda m, x: m(x)), grad(_dense_window), atol=1e-5, rtol=0)
  # the window acts at this length (so the comparison is not one of full causal attention)
  m_full = Attention(D, dataclasses.replace(cfg, window=None), rngs=nnx.Rngs(8))
  assert float(jnp.max(jnp.abs(jit_fast(lambda m, x: m(x))(m_full, x) - y))) > 1e-3


def test_window_with_segments_keeps_exact_dense_path(monkeypatch):
  """Packed documents take the dense masked path (the kernel has no document mask)."""
  import layers.attention as attention_lib  # pylint: disable=g-import-not-at-top

  def fail(*a, **kw):
    raise AssertionError("block_sparse_attention must not run with segment_ids")

  monkeypatch.setattr(attention_lib, "block_sparse_attention", fail)
  cfg = AttentionConfig(num_heads=2, window=6, block_size=BS)
  m = Attention(D, cfg, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (B, 32, D), jnp.float32)
  seg = jnp.array([[0] * 13 + [1] * 19, [0] * 30 + [4] * 2], jnp.int32)
  y = jit_fast(lambda m, x, s: m(x, segment_ids=s))(m, x, seg)
  np.testing.assert_allclose(y, naive_attention(m, np.asarray(x), np.asarray(seg)), atol=2e-5)


def test_short_sequences_stay_dense():
  m = Attention(D, AttentionConfig(window=64), rngs=nnx.Rngs(0))  # default block_size 64
  assert m.cfg.block_size == 64
  assert not m.uses_block_sparse(128) and m.uses_block_sparse(129)  # 129 pads to 192
  assert not Attention(D, AttentionConfig(), rngs=nnx.Rngs(0)).uses_block_sparse(4096)


@pytest.mark.parametrize("bad", [0, -8, 16.0, True, "64"])
def test_block_size_validated(bad):
  with pytest.raises(ConfigError) as e:
    AttentionConfig(window=8, block_size=bad).validate(D)
  assert e.value.field == "block_size"
