"""Shared layer pieces: short convolution (parallel == step, no leak), gated RMSNorm."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.common import GatedRMSNorm, ShortConv, segment_positions


def test_short_conv_matches_naive_and_step():
  conv = ShortConv(3, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 9, 3))
  w, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
  xn = np.asarray(x)
  naive = np.zeros_like(xn)
  for t in range(9):
    for lag in range(4):
      if t - lag >= 0:
        naive[:, t] += w[3 - lag] * xn[:, t - lag]
  naive += b
  np.testing.assert_allclose(conv(x), naive, atol=1e-6)
  s = conv.init_state(2)
  ys = []
  for a, e in ((0, 2), (2, 3), (3, 9)):
    y, s = conv.step(x[:, a:e], s)
    ys.append(y)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), naive, atol=1e-6)


def test_short_conv_does_not_leak_across_documents():
  conv = ShortConv(2, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 8, 2))
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  packed = conv(x, seg)
  np.testing.assert_allclose(packed[:, 3:], conv(x[:, 3:]), atol=1e-6)
  np.testing.assert_allclose(packed[:, :3], conv(x[:, :3]), atol=1e-6)


def test_gated_rmsnorm_orders():
  n1 = GatedRMSNorm(4, norm_before_gate=True, rngs=nnx.Rngs(0))
  n2 = GatedRMSNorm(4, norm_before_gate=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 4))
  z = jax.random.normal(jax.random.key(4), (2, 4))
  rms = lambda v: v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-5)
  silu = lambda v: v / (1 + np.exp(-v))
  xn, zn = np.asarray(x), np.asarray(z)
  np.testing.assert_allclose(n1(x, z), rms(xn) * silu(zn), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(n2(x, z), rms(xn * silu(zn)), rtol=1e-5, atol=1e-6)


def test_segment_positions_restart():
  seg = jnp.array([[0, 0, 1, 1, 1, 2]])
  np.testing.assert_array_equal(segment_positions(seg, 1, 6), [[0, 1, 0, 1, 2, 0]])


def test_dense_values_and_gradients_equal_autodiff_of_tensordot():
  """layers.common.dense (hand-written backward: x^T dy, dy w^T) == jax.grad of the plain
  tensordot, for a multi-axis input and a multi-axis output."""
  from layers.common import dense  # pylint: disable=import-outside-toplevel
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(ks[0], (2, 5, 6))
  plain = lambda x, w: jnp.tensordot(x, w, axes=((2,), (0,)))
  # out wider than d_in (x^T dy) and narrower (dy^T x, transposed back)
  for w in (jax.random.normal(ks[1], (6, 3, 4)), jax.random.normal(ks[1], (6, 2))):
    c = jax.random.normal(ks[2], (2, 5) + w.shape[1:])
    np.testing.assert_allclose(dense(x, w), plain(x, w), rtol=1e-6, atol=1e-6)
    got = jax.grad(lambda x, w: jnp.sum(jnp.sin(dense(x, w)) * c), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(jnp.sin(plain(x, w)) * c), argnums=(0, 1))(x, w)
    for a, b in zip(got, want):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_linear_parts_equal_slices_of_the_full_output():
  from layers.common import Linear  # pylint: disable=import-outside-toplevel
  lin = Linear(6, (3, 4), ("embed", None, "mlp"), use_bias=True, rngs=nnx.Rngs(0))
  lin.bias[...] = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 6))
  full, parts = lin(x), lin.parts(x)
  assert len(parts) == 3
  for i, p in enumerate(parts):
    np.testing.assert_allclose(p, full[:, :, i], rtol=1e-6, atol=1e-6)  # near-zero entries
