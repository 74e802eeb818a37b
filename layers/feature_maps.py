"""Feature maps phi for linear attention: softmax(q.k) ~ phi(q).phi(k).

References (the math only; the code is lcm's own):
  * Katharopoulos et al. 2020, "Transformers are RNNs" (elu(x) + 1).
  * Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
    tradeoff" (Based): the 2nd-order Taylor map
    ``phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]`` with
    ``phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)``, the Taylor expansion of
    ``exp(q.k / sqrt(d))`` to second order.

``taylor`` with ``upper=True`` keeps only the upper triangle (i <= j) of ``x x^T``: the
diagonal terms keep the factor ``1 / (sqrt(2) sqrt(d))`` and the off-diagonal ones get
``1 / sqrt(d)`` (``sqrt(2)`` larger, since each stands for both ``x_i x_j`` and ``x_j x_i``),
so the inner product is unchanged while the feature dimension drops from
``1 + d + d^2`` to ``1 + d + d (d + 1) / 2``.

Every map is computed in float32 and returned in the input's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

FEATURE_MAPS = ("identity", "elu", "relu", "taylor")
# Maps whose features are >= 0, so phi(q).sum phi(k) >= 0 and a normaliser is safe.
# (The Taylor kernel 1 + s + s^2/2 >= 1/2 for every s, although single features may be < 0.)
POSITIVE_FEATURE_MAPS = ("elu", "relu", "taylor")


def feature_dim(name: str, dim: int, *, upper: bool = False) -> int:
  """Output width of feature map ``name`` applied to ``dim`` input features."""
  if name not in FEATURE_MAPS:
    raise ValueError(f"unknown feature map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
  if name != "taylor":
    return dim
  return 1 + dim + (dim * (dim + 1) // 2 if upper else dim * dim)


def elu_plus_one(x: jax.Array) -> jax.Array:
  """elu(x) + 1, written as ``x + 1`` (x > 0) / ``exp(x)`` (x <= 0): the same function, but
  strictly positive down to x ~ -87 in float32, where ``expm1(x) + 1`` is already 0 below
  x ~ -17, and exact in relative terms for negative x."""
  x32 = x.astype(jnp.float32)
  return jnp.where(x32 > 0, x32 + 1.0, jnp.exp(jnp.minimum(x32, 0.0))).astype(x.dtype)


def taylor(x: jax.Array, *, upper: bool = False) -> jax.Array:
  """Based's 2nd-order Taylor feature map over the last axis (``d`` = its width)."""
  d = x.shape[-1]
  x32 = x.astype(jnp.float32)
  outer = x32[..., :, None] * x32[..., None, :]  # [..., d, d]
  if upper:
    rows, cols = np.triu_indices(d)
    scale = np.where(rows == cols, 1.0 / (math.sqrt(2.0) * math.sqrt(d)), 1.0 / math.sqrt(d))
    second = outer[..., rows, cols] * jnp.asarray(scale, jnp.float32)
  else:
    second = outer.reshape(x.shape[:-1] + (d * d,)) / (math.sqrt(2.0) * math.sqrt(d))
  ones = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
  out = jnp.concatenate([ones, x32 / d ** 0.25, second], axis=-1)
  return out.astype(x.dtype)


def apply(name: str, x: jax.Array, *, upper: bool = False) -> jax.Array:
  """Feature map ``name`` (one of :data:`FEATURE_MAPS`) over the last axis of x."""
  if name == "identity":
    return x
  if name == "elu":
    return elu_plus_one(x)
  if name == "relu":
    return jax.nn.relu(x)
  if name == "taylor":
    return taylor(x, upper=upper)
  raise ValueError(f"unknown feature map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
