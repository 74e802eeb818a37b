"""Shared by test_memory_caching.py and test_mom.py: the test sizes, the numpy float64
helpers of the naive per-token loops (projections, activations, norms, the causal
document-masked short convolution) and a jitted mixer wrapper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcm import registry

B, T, D = 2, 10, 8
# Row 0: one document; row 1: documents of 4 and 6 tokens (a segment cut by the boundary).
SEG = np.array([[0] * 10, [0] * 4 + [1] * 6], np.int32)
TOL = 2e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # ~2x faster CPU compiles


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


def softmax(v):
  e = np.exp(v - np.max(v))
  return e / e.sum()


def starts_and_positions(seg_row):
  starts = np.array([i == 0 or seg_row[i] != seg_row[i - 1] for i in range(len(seg_row))])
  pos = np.zeros(len(seg_row), int)
  for i in range(1, len(seg_row)):
    pos[i] = 0 if starts[i] else pos[i - 1] + 1
  return starts, pos


def naive_conv(u, kernel, seg_row):
  """Causal depthwise conv of u [T, C] with taps kernel [K, C], no tap across documents."""
  k = kernel.shape[0]
  y = np.zeros_like(u)
  for t in range(u.shape[0]):
    for i in range(k):
      j = t - (k - 1 - i)
      if j >= 0 and seg_row[j] == seg_row[t]:
        y[t] += kernel[i] * u[j]
  return y


class Jitted:
  """One mixer with its parallel form (``fwd``; ``fwd_aux`` -> (y, aux) for MoM) and
  ``step`` jitted once."""

  def __init__(self, name, d_model=D, **overrides):
    overrides = {"num_heads": 2, "chunk_size": 4, **overrides}
    self.mixer = registry.create(name, d_model=d_model, rngs=nnx.Rngs(0), **overrides)
    graphdef, state = nnx.split(self.mixer)
    self.graphdef = graphdef
    self.params = nnx.to_pure_dict(state)  # plain arrays: easy to modify in tests
    jit = lambda f: jax.jit(f, compiler_options=FAST_COMPILE)
    if hasattr(self.mixer, "call_with_aux"):
      self.fwd_aux = jit(lambda p, x, s: nnx.merge(graphdef, p).call_with_aux(x, segment_ids=s))
      self.fwd = lambda p, x, s: self.fwd_aux(p, x, s)[0]
    else:
      self.fwd = jit(lambda p, x, s: nnx.merge(graphdef, p)(x, segment_ids=s))
    self.step = jit(lambda p, x, st: nnx.merge(graphdef, p).step(x, st))

  def run_steps(self, x, size, state=None):
    state = self.mixer.init_state(x.shape[0]) if state is None else state
    ys = []
    for i in range(0, x.shape[1], size):
      y, state = self.step(self.params, x[:, i:i + size], state)
      ys.append(y)
    return jnp.concatenate(ys, axis=1), state
