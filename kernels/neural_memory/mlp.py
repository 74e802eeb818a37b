"""The Titans memory network as pure functions of a weights tuple (Behrouz, Zhong & Mirrokni
2025, "Titans: Learning to Memorize at Test Time", Sec. 3.1).

The memory is an MLP ``M`` whose weights ``W = (W^1, ..., W^L)`` (``W^l``: ``[d_{l-1}, d_l]``,
``d_0 = d_L = dim``, hidden ``d_l = hidden``; no biases) are the recurrent state::

    M(W, x) = x + z_L           (``residual=True``; z_L alone with ``residual=False``)
    z_l = a_{l-1} W^l,  a_0 = x,  a_l = act(z_l)   (act: GELU or SiLU)

The associative loss of one token is the squared error averaged over the width,
``l(W; k, v) = ||M(W, k) - v||_2^2 / dim``. Its gradient w.r.t. each layer is an outer
product of the layer's input and the back-propagated error (:meth:`MemoryMLP.grad_terms`)::

    grad_{W^l} l = a_{l-1}^T delta_l,   delta_L = (2 / dim) (M(W, k) - v),
    delta_l = (delta_{l+1} W^{l+1 T}) * act'(z_l)

optionally clipped to a global norm ``tau`` per token (every delta times
``tau / max(tau, ||grad||)``, ``||grad||^2 = sum_l ||a_{l-1}||^2 ||delta_l||^2``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["ACTIVATIONS", "MemoryMLP", "Weights"]

ACTIVATIONS = ("gelu", "silu")
_F32 = jnp.float32

Weights = tuple  # a tuple of arrays, one per memory layer: [..., d_in, d_out]


@dataclasses.dataclass(frozen=True)
class MemoryMLP:
  """The memory network, as pure functions of a weights tuple.

  ``weights[l]``: ``[..., d_{l-1}, d_l]`` with any leading (batch, head) dims; inputs
  ``[..., N, dim]`` with the same leading dims (or broadcastable).
  ``apply``: ``M(W, x) = x + z_L`` (``residual``) or ``z_L``, ``z_l = a_{l-1} W^l``,
  ``a_0 = x``, ``a_l = act(z_l)`` for ``l < L``.
  """

  dim: int
  hidden: int
  depth: int = 2
  activation: str = "gelu"
  residual: bool = True
  max_grad_norm: float | None = None

  def shapes(self) -> tuple[tuple[int, int], ...]:
    dims = (self.dim,) + (self.hidden,) * (self.depth - 1) + (self.dim,)
    return tuple(zip(dims[:-1], dims[1:]))

  def act(self, z: jax.Array) -> jax.Array:
    if self.activation == "gelu":
      return jax.nn.gelu(z, approximate=False)
    return jax.nn.silu(z)

  def act_grad(self, z: jax.Array) -> jax.Array:
    """Elementwise derivative: gelu' = Phi(z) + z phi(z); silu' = s (1 + z (1 - s))."""
    if self.activation == "gelu":
      cdf = 0.5 * (1.0 + jax.lax.erf(z * (1.0 / math.sqrt(2.0))))
      return cdf + z * jnp.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    sig = jax.nn.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))

  def init(self, key: jax.Array, lead: Sequence[int] = (), dtype=_F32) -> Weights:
    """Xavier-uniform weights with leading dims ``lead`` (e.g. (heads,))."""
    keys = jax.random.split(key, self.depth)
    out = []
    for kk, (din, dout) in zip(keys, self.shapes()):
      bound = math.sqrt(6.0 / (din + dout))
      out.append(jax.random.uniform(kk, (*lead, din, dout), _F32, -bound, bound).astype(dtype))
    return tuple(out)

  def apply(self, weights: Weights, x: jax.Array) -> jax.Array:
    """``M(W, x)``: x ``[..., N, dim]`` -> ``[..., N, dim]``."""
    a = x
    for l, w in enumerate(weights):
      if l:
        a = self.act(a)
      a = jnp.einsum("...ni,...io->...no", a, w)
    return a + x if self.residual else a

  def loss(self, weights: Weights, k: jax.Array, v: jax.Array) -> jax.Array:
    """Per-token associative loss ``||M(W, k) - v||^2 / dim``: ``[..., N]``."""
    return jnp.mean(jnp.square(self.apply(weights, k) - v), axis=-1)

  def grad_terms(self, weights: Weights, k: jax.Array, v: jax.Array):
    """Per-token gradient factors: ``grad_{W^l} loss_n = a^l_n^T delta^l_n``.

    Returns ``(inputs, deltas)``, tuples over layers of ``[..., N, d_{l-1}]`` (the layer's
    input a^{l-1}) and ``[..., N, d_l]`` (``delta^l = dl/dz_l``):
    ``delta^L = (2 / dim) (M(W,k) - v)``,
    ``delta^l = (delta^{l+1} W^{l+1 T}) * act'(z_l)``.
    With ``max_grad_norm`` tau, every token's whole gradient is clipped to norm <= tau
    (all its deltas times ``tau / max(tau, ||grad||)``, ``||grad||^2 = sum_l ||a^l||^2
    ||delta^l||^2``: a rank-1 gradient's Frobenius norm is the product of the factors').
    """
    inputs, zs = [], []
    a = k
    for l, w in enumerate(weights):
      if l:
        a = self.act(zs[-1])
      inputs.append(a)
      zs.append(jnp.einsum("...ni,...io->...no", a, w))
    out = zs[-1] + k if self.residual else zs[-1]
    d = (2.0 / self.dim) * (out - v)
    deltas = [d]
    for l in range(len(weights) - 2, -1, -1):
      d = jnp.einsum("...no,...io->...ni", d, weights[l + 1]) * self.act_grad(zs[l])
      deltas.append(d)
    deltas = deltas[::-1]
    if self.max_grad_norm is not None:
      tau = self.max_grad_norm
      sq = lambda x: jnp.sum(x * x, axis=-1)
      n2 = sum(sq(a) * sq(d) for a, d in zip(inputs, deltas))
      # tau / max(tau, n) as tau * rsqrt(max(n^2, tau^2)): no sqrt (inf slope) at zero.
      scale = (tau * jax.lax.rsqrt(jnp.maximum(n2, tau * tau)))[..., None]
      deltas = [d * scale for d in deltas]
    return tuple(inputs), tuple(deltas)
