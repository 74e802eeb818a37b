"""Titans: a neural long-term memory (LMM) and the MAC / MAG / MAL architectures.

Reference (the math; the code is lcm's own): Behrouz, Zhong & Mirrokni 2025, "Titans: Learning
to Memorize at Test Time". Facts checked against lucidrains/titans-pytorch
(``titans_pytorch/neural_memory.py``, ``memory_models.py``, ``mac_transformer.py``) and fla
(``fla/ops/titans/naive.py``).

Long-term memory (:class:`TitansLMM`, registered as ``titans_lmm``)
-------------------------------------------------------------------
Per head h (H heads of width Dh = d_model / H) the memory is an MLP ``M`` whose weights
``W = (W^1, ..., W^L)`` (``W^l``: [d_{l-1}, d_l], d_0 = d_L = Dh, hidden d_l = expansion * Dh)
are the recurrent state::

    M(W, x) = x + z_L           (``residual=True``; z_L alone with ``residual=False``)
    z_l = a_{l-1} W^l,  a_0 = x,  a_l = act(z_l)   (act: GELU or SiLU; no biases)

Keys, values and queries: ``k, v, q = silu(conv(x W_k)), silu(conv(x W_v)), silu(conv(x W_q))``
(a causal depthwise short convolution per projection, ``use_short_conv``), q and k
L2-normalised per head. Per token the associative loss is the squared error averaged over the
head dim, ``l(W; k_t, v_t) = ||M(W, k_t) - v_t||_2^2 / Dh`` (titans-pytorch's default; the
paper writes the plain squared norm, the same up to the constant 1/Dh in theta).
Data-dependent, per token and head (sigmoids of linear projections of the layer input x, as
titans-pytorch)::

    theta_t = max_lr * sigmoid(w_theta . x_t + b_theta)     inner learning rate
    eta_t   = sigmoid(w_eta . x_t + b_eta)                   momentum ("past surprise") decay
    alpha_t = sigmoid(w_alpha . x_t + b_alpha)               forgetting

and the update with momentum and forgetting, then retrieval with the updated memory::

    S_t = eta_t S_{t-1} - theta_t grad_W l(W'_t; k_t, v_t)
    M_t = (1 - alpha_t) M_{t-1} + S_t
    o_t = M(M_t, q_t)

Chunked ("mini-batch") gradient: the gradient point ``W'_t`` is the memory at the start of
token t's chunk, ``W'_t = M_{c(t) - 1}``, with chunk boundaries at document positions that are
multiples of ``chunk_size`` C. C = 1 is the exact sequential rule (``W'_t = M_{t-1}``). The
decode state holds exactly what this needs: ``w0`` (W' of the current chunk), ``m`` (M_t),
``s`` (S_t), and ``pos`` (the position in the document, per batch row), so any split of a
sequence into ``step`` calls gives the same result. All memory math is float32 (``eta`` and
``1 - alpha`` as log-sigmoids; products of gates are exponentials of sums of log gates).

Chunk-parallel form. Inside a block of tokens that share the gradient point W' and start from
(M^, S^), with ``beta_i = prod_{j<=i} (1 - alpha_j)``, ``m_i = prod_{j<=i} eta_j``,
``A_{i,r} = prod_{r<j<=i} (1 - alpha_j)`` and ``N_{r,s} = prod_{s<j<=r} eta_j``::

    S_i = m_i S^ - sum_{s<=i} theta_s N_{i,s} G_s
    M_i = beta_i M^ + f_i S^ - sum_{s<=i} C_{i,s} G_s,
    f_i = sum_{r<=i} A_{i,r} m_r,     C_{i,s} = theta_s sum_{s<=r<=i} A_{i,r} N_{r,s}

(the two linear recurrences solved in closed form; all products are exponentials of sums of
exactly the log gates in between). Because every ``G_s`` is taken at the same W', the
gradient of a linear layer is an outer product, ``G^l_s = a^l_{s}^T delta^l_s`` (a^l: the
layer's input, delta^l = dl/dz_l, both from one forward/backward pass of all the block's keys
at W'), so a layer of ``M_i`` applied to the retrieval activation u_i never needs the
per-token weights::

    u_i M^l_i = beta_i u_i M^^l + f_i u_i S^^l - sum_s C_{i,s} (u_i . a^l_s) delta^l_s

-- attention-like [P, P] matmuls, layer by layer (u_i^l = act(u_i^{l-1} M^{l-1}_i)). States
are materialised only at chunk ends.

Documents and arbitrary offsets. The chunk grid restarts at every document start (and the
memory restarts from the learned initial weights with S = 0). The sequence is cut into
physical chunks of P <= C tokens; a physical chunk then holds at most three kinds of blocks:
(A) the tail of the chunk the carried state is in (gradient point: the carried ``w0``), (D)
chunks that start at a document start inside it (gradient point: the initial weights), and
at most one (B) chunk that starts at a grid point of the carried document inside it, whose
gradient point is the memory just before it. The A tokens' gradients give that state
(materialised); then one more gradient pass (D and B together) and one retrieval pass with
per-token start states. Without documents and from a chunk boundary (the usual training
call) only B exists and this is a single pass (``doc_pos=None``). A single token (decode)
applies the rule directly with materialised weights (:func:`_single_token`).

Initialisation (lcm's choices where the references leave them open): memory weights
Xavier-uniform per head (as titans-pytorch; they are learned "slow" parameters and every
document starts from them); gate projections LeCun-normal with biases
``theta_bias_init`` / ``eta_bias_init`` / ``alpha_bias_init`` (default 0, 0, -6: a half-max
inner step, momentum 0.5, forgetting ~0.25% per token; ``max_lr`` 0.25, see Stability).
Output: per-head RMSNorm times ``silu(x W_g)`` (``output_gate``), then the output projection.

Stability. A chunk applies C gradients taken at one point; for the linear part of the memory
the chunk multiplies the memory by about ``I - (2 theta / Dh) sum_s a_s a_s^T`` (a_s: the
layer's inputs; momentum adds a factor up to ``1 / (1 - eta)`` on slow modes), so with
aligned keys the step is ``~ theta C |a|^2 / Dh``; above ~2 the inner descent overshoots
and the memory grows geometrically. Two defaults keep it bounded (both lcm's choices):

* ``max_lr`` 0.25 (titans-pytorch: 1). Measured at d_model 32, 4 heads (Dh 8), C 16, on
  ``x ~ N(0, 1)``: with max_lr 1 titans_mac went NaN after ~1000 tokens (fp32), titans_lmm
  after 112 tokens of 30x inputs, the bf16 run drifted 29% from fp32 over 65k tokens, and
  passkey training (configs/passkey.py:titans_mac) went NaN at step 8; with 0.25 all are
  finite and bf16 stays within 1.5% (``python -m experiments.numerics``).
* ``max_grad_norm`` 1.0: every token's whole gradient is clipped to that norm (a scalar per
  token on its deltas, so the chunked form keeps its outer-product structure; titans-pytorch
  has the same option, off by default). Growth per token is then bounded whatever the outer
  training does to the gates; with max_lr 1 the clip alone kept the 30x-input run finite.
  Typical per-token gradient norms at init are 0.3 - 2 (Dh 4 - 8), so it binds on outliers.

Normalising the memory's output (titans-pytorch's ``x + LayerNorm(MLP(x))``, tried as an
RMSNorm) made it worse here: the normalised output makes the step size grow as the weights
shrink, and fp32 vs bf16 (and step vs parallel) runs decorrelated (35% apart at 65k). Strong
forgetting (alpha ~ 2.6% per token) decays the deep memory towards W = 0, where its gradient
vanishes (both layers small), hence the mild default forgetting.

Architectures (the paper's Section 4)
--------------------------------------
Persistent memory: ``num_persistent`` learnable tokens ``P`` [Np, D], projected by the
attention's key/value projections. They carry no position: their scores use the queries
before RoPE (position-free "task knowledge"), and a sliding window never drops them.

* :class:`TitansMAG` (``titans_mag``, memory as gate): ``o = W_o(norm_a(SWA([P] || x)) *
  sigmoid(norm_m(LMM(x))))``, sliding-window attention with the persistent prefix and the
  memory branch in parallel, both RMS-normalised with learned scales, the memory branch as a
  sigmoid gate.
* :class:`TitansMAL` (``titans_mal``, memory as layer): ``u = x + LMM(x)``, ``o = SWA([P] ||
  u)``; a residual around the memory keeps the raw tokens visible to the attention.
* :class:`TitansMAC` (``titans_mac``, memory as context): the document is cut into segments
  of ``segment_len`` tokens. For segment s with tokens x (queries ``q_x = l2norm(silu(x W_q))``
  with the memory's query projection, no convolution)::

      h = LMM-read(M_{s-1}, q_x)                   memory state at the segment start
      y = norm_y(Attn([P] || h || x))              queries: x; token i sees P, h_{<=i}, x_{<=i}
      r = LMM(y)  (updates the memory with y, per token, then reads with q from y)
      o = y * sigmoid(norm_r(r))

  The paper writes ``o = y (x) M(y)``; the two RMSNorms (learned scales) are lcm's, as the
  paper's MAG gate: with the raw ``y * sigmoid(r)`` (r is small at init, the gate ~ 1/2) the
  200-step MQAR test of tests/layers/test_mqar_training.py stalled at the "values only"
  loss (ratio 0.71; stopping the gradient through the memory into y, or normalising r,
  let it learn: 0.21 / 0.22; with both norms 0.10).
  ``h_i`` depends on x_i, so the memory tokens are causally masked too (all of h would leak
  later tokens into earlier ones). RoPE positions: h_j and x_j share position j. Without
  ``segment_ids`` the layer runs segment-parallel (a scan over segments, attention and the
  memory update parallel inside; ``segment_len`` must be a multiple of ``chunk_size`` so the
  memory's chunks align with segments). With ``segment_ids``, and in ``step``, it runs the
  exact token-by-token form (a scan over tokens), which equals the segment-parallel one;
  the per-token form is slower -- packed-document training of MAC pays for it.

Deviations from the paper, on purpose: the memory branch of MAG / MAL reads the tokens
only (not the persistent prefix), so every document starts from the same learned state
without replaying the prefix; the persistent keys/values of MAC are not stored in the decode
state (they are parameters). MAC's state: the memory (w0, m, s), the memory at the current
segment start, the segment's KV cache of h and x (2 * segment_len slots), the conv states.

Reusable pure functions (for other layers, e.g. memory caching): :class:`MemoryMLP`
(``apply(weights, x)``, ``loss``, ``grad_terms``, ``init``), :func:`memory_recurrence`
(the whole chunked recurrence, optionally returning the state at every chunk end or the
memory right after marked tokens), and on
:class:`TitansLMM`: ``project`` (q, k, v and gates), ``initial_weights``, ``read``,
``output``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import apply_rope
from layers.common import (GatedRMSNorm, Linear, RMSNorm, ShortConv, check, dense_init, param,
                           segment_positions)
from layers.common import check_bool, check_finite, check_pos_int, check_positive, is_int, is_num

__all__ = [
    "MemoryMLP", "memory_recurrence", "TitansLMM", "TitansLMMConfig", "TitansMAC",
    "TitansMACConfig", "TitansMAG", "TitansMAGConfig", "TitansMAL", "TitansMALConfig",
]

ACTIVATIONS = ("gelu", "silu")
_NEG_INF = -1e30
_F32 = jnp.float32

Weights = tuple  # a tuple of arrays, one per memory layer: [..., d_in, d_out]


# ----------------------------------------------------------------------------------
# The memory MLP as pure functions of (weights, input)
# ----------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------
# The chunked recurrence
# ----------------------------------------------------------------------------------


def _bsel(mask: jax.Array, a: Weights, b: Weights) -> Weights:
  """Per batch row: ``mask`` [B] -> a where True else b (weights [B, H, i, o])."""
  return tuple(jnp.where(mask[:, None, None, None], x, y) for x, y in zip(a, b))


def _coefficients(log_keep, log_eta, theta, same):
  """In-block coefficients. log_keep, log_eta, theta: [B, H, P]; same: [B, P, P] bool
  (s <= i and tokens i, s in the same block).

  Returns beta_i, m_i, f_i [B, H, P] and C_{i,s}, theta_s N_{i,s} [B, H, P, P] (see the
  module docstring); every product of gates is exp of a sum of exactly the gates between.
  """
  p = log_keep.shape[-1]
  same = same[:, None]
  strict = jnp.tril(jnp.ones((p, p), bool), -1)  # (i, r): r < i

  def decay(g):  # (i, r) -> prod_{r<j<=i} exp(g_j) within the block, else 0
    x = jnp.where(strict, g[..., :, None], 0.0)
    ss = jnp.cumsum(x, axis=-2)
    return jnp.where(same, jnp.exp(jnp.where(same, ss, 0.0)), 0.0)

  a_dec, n_dec = decay(log_keep), decay(log_eta)
  samef = same.astype(_F32)
  beta = jnp.exp(jnp.einsum("bxij,bhj->bhi", samef, log_keep))
  mcum = jnp.exp(jnp.einsum("bxij,bhj->bhi", samef, log_eta))
  f = jnp.einsum("bhir,bhr->bhi", a_dec, mcum)
  c = jnp.einsum("bhir,bhrs->bhis", a_dec, n_dec) * theta[..., None, :]
  n_theta = n_dec * theta[..., None, :]
  return beta, mcum, f, c, n_theta


def _retrieve(mlp: MemoryMLP, q, starts, beta, f, c, terms):
  """``M(M_i, q_i)`` for the tokens of a block structure, layer by layer (no per-token
  weights). ``starts``: list of (token mask [B, P] or None, M^ weights, S^ weights or None);
  each token uses the start state whose mask selects it. ``terms``: (inputs, deltas)."""
  inputs, deltas = terms
  u, z = q, None
  for l in range(mlp.depth):
    if l:
      u = mlp.act(z)
    base = 0.0
    for mask, m_hat, s_hat in starts:
      t = beta[..., None] * jnp.einsum("bhpi,bhio->bhpo", u, m_hat[l])
      if s_hat is not None:
        t = t + f[..., None] * jnp.einsum("bhpi,bhio->bhpo", u, s_hat[l])
      base = base + (t if mask is None else jnp.where(mask[:, None, :, None], t, 0.0))
    scores = jnp.einsum("bhid,bhsd->bhis", u, inputs[l]) * c
    z = base - jnp.einsum("bhis,bhso->bhio", scores, deltas[l])
  return z + q if mlp.residual else z


def _state_at(sel, coefs, m_hat, s_hat, terms):
  """(M_j, S_j) at the token that the one-hot ``sel`` [B, P] picks (rows with no pick keep
  (M^, S^)). m_hat, s_hat: weights [B, H, i, o] per batch row."""
  beta, mcum, f, c, n_theta = coefs
  inputs, deltas = terms
  sel = sel.astype(_F32)[:, None]  # [B, 1, P]
  none = 1.0 - jnp.sum(sel, -1)  # [B, 1]
  b_ = (jnp.sum(sel * beta, -1) + none)[..., None, None]
  f_ = jnp.sum(sel * f, -1)[..., None, None]
  m_ = (jnp.sum(sel * mcum, -1) + none)[..., None, None]
  cc = jnp.einsum("bxi,bhis->bhs", sel, c)
  cn = jnp.einsum("bxi,bhis->bhs", sel, n_theta)
  new_m, new_s = [], []
  for l in range(len(m_hat)):
    g_c = jnp.einsum("bhs,bhsi,bhso->bhio", cc, inputs[l], deltas[l])
    g_n = jnp.einsum("bhs,bhsi,bhso->bhio", cn, inputs[l], deltas[l])
    new_m.append(b_ * m_hat[l] + f_ * s_hat[l] - g_c)
    new_s.append(m_ * s_hat[l] - g_n)
  return tuple(new_m), tuple(new_s)


def _single_token(mlp: MemoryMLP, init_weights: Weights, q, k, v, log_keep, log_eta, theta,
                  *, chunk_size: int, state, doc_pos):
  """One token per row (decode): the rule itself, with materialised weights. Same inputs
  and outputs as :func:`memory_recurrence` with T = 1."""
  b = q.shape[0]
  init_b = tuple(jnp.broadcast_to(w.astype(_F32), (b,) + w.shape) for w in init_weights)
  if state is None:
    state = (init_b, init_b, tuple(jnp.zeros_like(w) for w in init_b))
  wg, m, s = (tuple(w.astype(_F32) for w in part) for part in state)
  dp = jnp.broadcast_to(doc_pos, (b, 1))[:, 0]
  start, grid = dp == 0, dp % chunk_size == 0
  m = _bsel(start, init_b, m)  # a document starts: initial weights, zero momentum
  s = _bsel(start, tuple(jnp.zeros_like(w) for w in s), s)
  wg = _bsel(grid, m, wg)  # a chunk starts: its gradient point is the memory before it
  col = lambda a: jnp.moveaxis(a.astype(_F32), 1, 2)  # [B, 1, H, Dh] -> [B, H, 1, Dh]
  inputs, deltas = mlp.grad_terms(wg, col(k), col(v))
  keep = jnp.exp(log_keep.astype(_F32))[:, 0, :, None, None]
  eta = jnp.exp(log_eta.astype(_F32))[:, 0, :, None, None]
  th = theta.astype(_F32)[:, 0, :, None, None]
  s = tuple(eta * s_l - th * jnp.einsum("bhni,bhno->bhio", a, d)
            for s_l, a, d in zip(s, inputs, deltas))
  m = tuple(keep * m_l + s_l for m_l, s_l in zip(m, s))
  o = jnp.moveaxis(mlp.apply(m, col(q)), 1, 2)
  return o, (wg, m, s)


def memory_recurrence(mlp: MemoryMLP, init_weights: Weights, q, k, v, log_keep, log_eta,
                      theta, *, chunk_size: int, state=None, doc_pos=None,
                      return_chunk_states: bool = False, memory_at=None):
  """The Titans memory recurrence (module docstring), chunk-parallel.

  Args:
    mlp: the memory network.
    init_weights: learned initial weights, tuple of ``[H, d_in, d_out]``; every document
      (and ``state=None``) starts from them with zero momentum.
    q, k, v: ``[B, T, H, Dh]`` (any float dtype; computed in float32).
    log_keep: ``[B, T, H]``, ``log(1 - alpha_t)`` (<= 0); log_eta: ``[B, T, H]``,
      ``log eta_t`` (<= 0); theta: ``[B, T, H]``, the inner learning rate (>= 0).
    chunk_size: C, the gradient-sharing chunk (grid at document positions multiple of C).
    state: ``(w0, m, s)``, tuples of ``[B, H, d_in, d_out]`` (gradient point of the current
      chunk, memory, momentum) or None (the initial weights, zero momentum).
    doc_pos: ``[B, T]`` int, position of each token in its document (0 = document start),
      e.g. ``segment_positions(segment_ids)`` or ``pos + arange(T)`` when continuing.
      ``None``: one document whose chunk grid starts at token 0 (a fresh sequence, or a
      state taken at a chunk boundary); the single-pass fast path.
    return_chunk_states: also return the ``(w0, m, s)`` state after each physical chunk,
      stacked on a leading axis (physical chunks are C tokens, or T when T < C with
      ``doc_pos`` given; the last one is taken at the last real token).
    memory_at: optional ``[B, T]`` bool marking tokens whose memory ``M_t`` (the weights
      right after token t's update) is wanted, at most one marked token per row in each
      physical chunk (e.g. segment ends every L >= C tokens: memory caching). Then the
      memory at each physical chunk's marked token is returned too, a tuple over layers of
      ``[n, B, H, d_in, d_out]`` (a row with no mark in a chunk gets that chunk's start
      memory: meaningless, mask it).

  Returns:
    ``o`` ``[B, T, H, Dh]`` float32 (``o_t = M(M_t, q_t)``), the final ``(w0, m, s)`` and,
    with ``return_chunk_states``, the per-chunk states, then with ``memory_at`` the marked
    memories.
  """
  b, t, h, _ = q.shape
  c_len = chunk_size
  aligned = doc_pos is None
  if t == 1 and not aligned and not return_chunk_states:
    o, final = _single_token(mlp, init_weights, q, k, v, log_keep, log_eta, theta,
                             chunk_size=c_len, state=state, doc_pos=doc_pos)
    if memory_at is None:
      return o, final
    return o, final, tuple(w[None] for w in final[1])
  p = c_len if aligned else min(c_len, t)
  n = -(-t // p)
  tp = n * p
  pad = tp - t

  def prep(a):  # [B, T, H, ...] -> [n, B, H, P, ...] float32, identity padding
    a = jnp.pad(a.astype(_F32), ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    a = jnp.moveaxis(a, 2, 1).reshape((b, h, n, p) + a.shape[3:])
    return jnp.moveaxis(a, 2, 0)

  init_b = tuple(jnp.broadcast_to(w.astype(_F32), (b,) + w.shape) for w in init_weights)
  if state is None:
    state = (init_b, init_b, tuple(jnp.zeros_like(w) for w in init_b))
  carry0 = tuple(tuple(w.astype(_F32) for w in part) for part in state)

  idx = jnp.arange(tp)
  if aligned:
    same = jnp.broadcast_to(jnp.tril(jnp.ones((p, p), bool)), (n, b, p, p))
    cats = (same,)
  else:
    valid = idx < t
    dp = jnp.pad(jnp.broadcast_to(doc_pos, (b, t)).astype(jnp.int32), ((0, 0), (0, pad)),
                 constant_values=1)
    grid = valid & (dp % c_len == 0)
    dstart = valid & (dp == 0)
    vstart = jax.lax.cummax(jnp.where(grid, idx, -1), axis=1)
    dstart_at = jax.lax.cummax(jnp.where(dstart, idx, -1), axis=1)
    c0 = (idx // p) * p
    is_a = vstart < c0
    is_d = ~is_a & (vstart == dstart_at)
    is_b = ~is_a & ~is_d
    block = jnp.maximum(vstart, c0)
    next_b = jnp.concatenate([is_b[:, 1:], jnp.zeros((b, 1), bool)], 1) & (idx % p != p - 1)
    last_a = is_a & next_b

    def chunked(a):  # [B, Tp] -> [n, B, P]
      return jnp.moveaxis(a.reshape(b, n, p), 1, 0)

    blk = chunked(block)
    tri = jnp.tril(jnp.ones((p, p), bool))
    same = (blk[..., :, None] == blk[..., None, :]) & tri
    cats = (same, chunked(is_a), chunked(is_b), chunked(is_d), chunked(last_a))

  # The state after a chunk is taken at its last real token (padding is not an identity
  # step of the recurrence: M_t = (1 - alpha_t) M_{t-1} + S_t adds S even when theta_t = 0).
  last_real = jnp.minimum(jnp.arange(n) * p + p - 1, t - 1)
  last_tok = (jnp.arange(n)[:, None] * p + jnp.arange(p)[None, :]) == last_real[:, None]
  marks = None
  if memory_at is not None:
    marks = jnp.pad(jnp.broadcast_to(memory_at, (b, t)), ((0, 0), (0, pad)))
    marks = jnp.moveaxis(marks.reshape(b, n, p), 1, 0)  # [n, B, P]
  xs = (prep(q), prep(k), prep(v), prep(log_keep), prep(log_eta), prep(theta), cats, last_tok,
        marks)

  def body(carry, inp):
    wg, m, s = carry
    qc, kc, vc, lk, le, th, cat, last, mark = inp
    coefs = _coefficients(lk, le, th, cat[0])
    beta, _, f, c, _ = coefs
    last = jnp.broadcast_to(last, (b, p))
    if aligned:
      terms = mlp.grad_terms(m, kc, vc)
      y = _retrieve(mlp, qc, [(None, m, s)], beta, f, c, terms)
      m_end, s_end = _state_at(last, coefs, m, s, terms)
      wg_end = m
      m_at = None if mark is None else _state_at(mark, coefs, m, s, terms)[0]
    else:
      _, is_a, is_b, is_d, last_a = cat
      # Stage 1: the tail of the carried chunk (gradient at w0) gives the state just before
      # the grid point inside this chunk (the carry itself if there is none, or it is at 0).
      t_a = mlp.grad_terms(wg, kc, vc)
      m_b, s_b = _state_at(last_a, coefs, m, s, t_a)
      # Stage 2: gradients of the chunks that start at a document start (at the initial
      # weights) and of the chunk that starts at that grid point (at M_{b-1}), in one pass.
      stacked = tuple(jnp.stack([x, y]) for x, y in zip(init_b, m_b))
      t_db = mlp.grad_terms(stacked, kc[None], vc[None])
      terms = tuple(
          tuple(jnp.where(is_b[:, None, :, None], zb[1],
                          jnp.where(is_d[:, None, :, None], zb[0], za))
                for zb, za in zip(part_db, part_a))
          for part_db, part_a in zip(t_db, t_a))
      y = _retrieve(mlp, qc, [(is_a, m, s), (is_d, init_b, None), (is_b, m_b, s_b)],
                    beta, f, c, terms)
      la, lb, ld = (jnp.any(z & last, -1) for z in (is_a, is_b, is_d))
      zeros = tuple(jnp.zeros_like(w) for w in s)
      m_hat = _bsel(la, m, _bsel(ld, init_b, m_b))
      s_hat = _bsel(la, s, _bsel(ld, zeros, s_b))
      m_end, s_end = _state_at(last, coefs, m_hat, s_hat, terms)
      wg_end = _bsel(la, wg, _bsel(lb, m_b, init_b))
      m_at = None
      if mark is not None:  # as for `last`: the start state of the marked token's block
        ma, md = jnp.any(is_a & mark, -1), jnp.any(is_d & mark, -1)
        m_at = _state_at(mark, coefs, _bsel(ma, m, _bsel(md, init_b, m_b)),
                         _bsel(ma, s, _bsel(md, zeros, s_b)), terms)[0]
    new = (wg_end, m_end, s_end)
    return new, (y, new if return_chunk_states else None, m_at)

  final, (ys, chunk_states, marked) = jax.lax.scan(body, carry0, xs)
  o = jnp.moveaxis(ys, 0, 2).reshape(b, h, tp, -1)[:, :, :t]
  o = jnp.moveaxis(o, 1, 2)
  out = (o, final) + ((chunk_states,) if return_chunk_states else ())
  return out + ((marked,) if memory_at is not None else ())


# ----------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------


def _heads(d_model: int, heads: Any, field: str) -> int:
  check_pos_int(heads, field)
  check(d_model % heads == 0, field, f"must divide d_model={d_model} (got {heads})")
  return d_model // heads


def _l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum x^2 + eps) over the last axis, in float32."""
  x = x.astype(_F32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _fields_of(cfg, cls):
  return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------------
# titans_lmm
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TitansLMMConfig:
  """Hyper-parameters of :class:`TitansLMM` (the neural long-term memory).

  num_heads: memory heads H (must divide d_model; Dh = d_model / H).
  depth: linear layers of the memory MLP (1 = a linear matrix memory; the paper: >= 2).
  expansion: hidden width of the memory MLP = expansion * Dh.
  activation: "gelu" (titans-pytorch) or "silu".
  residual: memory output ``x + MLP(x)``.
  chunk_size: tokens that share one gradient point (C = 1: the exact sequential rule).
  max_lr: theta_t = max_lr * sigmoid(.) (see "Stability" in the module docstring).
  max_grad_norm: clip each token's memory gradient to this global norm (None: no clip).
  theta_bias_init, eta_bias_init, alpha_bias_init: bias inits of the three gate logits.
  use_short_conv, conv_size: causal depthwise convolution on q, k, v.
  output_gate: per-head RMSNorm * silu(x W_g) before the output projection (else RMSNorm).
  norm_eps: epsilon of that RMSNorm.
  """

  num_heads: int = 4
  depth: int = 2
  expansion: float = 2.0
  activation: str = "gelu"
  residual: bool = True
  chunk_size: int = 16
  max_lr: float = 0.25
  max_grad_norm: float | None = 1.0
  theta_bias_init: float = 0.0
  eta_bias_init: float = 0.0
  alpha_bias_init: float = -6.0
  use_short_conv: bool = True
  conv_size: int = 4
  output_gate: bool = True
  norm_eps: float = 1e-5

  def head_dim(self, d_model: int) -> int:
    return d_model // self.num_heads

  def hidden_dim(self, d_model: int) -> int:
    return int(round(self.head_dim(d_model) * self.expansion))

  def memory_mlp(self, d_model: int) -> MemoryMLP:
    return MemoryMLP(dim=self.head_dim(d_model), hidden=self.hidden_dim(d_model),
                     depth=self.depth, activation=self.activation, residual=self.residual,
                     max_grad_norm=self.max_grad_norm)

  def validate(self, d_model: int) -> None:
    check(is_int(d_model) and d_model >= 1, "d_model",
          f"must be a positive integer (got {d_model!r})")
    dh = _heads(d_model, self.num_heads, "num_heads")
    check_pos_int(self.depth, "depth")
    check_positive(self.expansion, "expansion")
    hidden = dh * self.expansion
    check(abs(hidden - round(hidden)) < 1e-6 and round(hidden) >= 1, "expansion",
          f"hidden width = head_dim {dh} * {self.expansion} = {hidden} must be a positive "
          "integer")
    check(self.activation in ACTIVATIONS, "activation",
          f"must be one of {', '.join(ACTIVATIONS)} (got {self.activation!r})")
    check_bool(self.residual, "residual")
    check_pos_int(self.chunk_size, "chunk_size")
    check_positive(self.max_lr, "max_lr")
    if self.max_grad_norm is not None:
      check_positive(self.max_grad_norm, "max_grad_norm")
    check_finite(self.theta_bias_init, "theta_bias_init")
    check_finite(self.eta_bias_init, "eta_bias_init")
    check_finite(self.alpha_bias_init, "alpha_bias_init")
    check_bool(self.use_short_conv, "use_short_conv")
    check(is_int(self.conv_size) and self.conv_size >= 2, "conv_size",
          f"must be an integer >= 2 (got {self.conv_size!r})")
    check_bool(self.output_gate, "output_gate")
    check_positive(self.norm_eps, "norm_eps")


def _xavier_init(key, shape, dtype):
  din, dout = shape[-2], shape[-1]
  bound = math.sqrt(6.0 / (din + dout))
  return jax.random.uniform(key, shape, _F32, -bound, bound).astype(dtype)


def _const_rows_init(values: Sequence[float]):
  def init(key, shape, dtype):
    del key
    return jnp.broadcast_to(jnp.asarray(values, _F32)[:, None], shape).astype(dtype)
  return init


def _normal_init(std: float):
  def init(key, shape, dtype):
    return (std * jax.random.normal(key, shape, _F32)).astype(dtype)
  return init


class _ConvQKV(nnx.Module):
  """Three causal short convolutions (q, k, v) over the flattened heads."""

  def __init__(self, width: int, size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, axis_name="heads", dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.q = ShortConv(width, size, **kw)
    self.k = ShortConv(width, size, **kw)
    self.v = ShortConv(width, size, **kw)

  def __call__(self, xs, segment_ids=None, state=None):
    outs, new = [], {}
    for name, x in zip("qkv", xs):
      conv = getattr(self, name)
      flat = x.reshape(x.shape[:2] + (-1,))
      if state is None:
        y = conv(flat, segment_ids)
      else:
        y, new[f"conv_{name}"] = conv.step(flat, state[f"conv_{name}"])
      outs.append(y.reshape(x.shape))
    return outs, (new if state is not None else None)

  def init_state(self, batch: int, dtype) -> dict[str, jax.Array]:
    return {f"conv_{n}": getattr(self, n).init_state(batch, dtype) for n in "qkv"}

  def state_size(self, batch: int) -> int:
    return 3 * batch * (self.q.kernel_size - 1) * self.q.channels


class TitansLMM(nnx.Module):
  """The Titans neural long-term memory as a token mixer (module docstring).

  State: ``{"w0", "m", "s"}`` (tuples over memory layers of ``[B, H, d_in, d_out]``: the
  chunk's gradient point, the memory, the momentum), ``"pos"`` ``[B]`` int32 (position in the
  document) and, with ``use_short_conv``, ``conv_q``/``conv_k``/``conv_v``.
  """

  Config = TitansLMMConfig

  def __init__(self, d_model: int, cfg: TitansLMMConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg = TitansLMMConfig() if cfg is None else _fields_of(cfg, TitansLMMConfig)
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.num_heads = h = cfg.num_heads
    self.head_dim = dh = cfg.head_dim(d_model)
    self.mlp = cfg.memory_mlp(d_model)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (h, dh), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (h, dh), ("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (h, dh), ("embed", "heads", "head_dim"), **kw)
    self.conv = (_ConvQKV(h * dh, cfg.conv_size, **kw) if cfg.use_short_conv else None)
    # Gate logits [theta, eta, alpha] per head.
    self.gate_w = param(rngs, dense_init(d_model), (d_model, 3, h), ("embed", None, "heads"),
                        param_dtype)
    self.gate_b = param(rngs, _const_rows_init((cfg.theta_bias_init, cfg.eta_bias_init,
                                                cfg.alpha_bias_init)),
                        (3, h), (None, "heads"), param_dtype, tag="no_decay")
    for l, (din, dout) in enumerate(self.mlp.shapes()):
      setattr(self, f"memory_{l}", param(rngs, _xavier_init, (h, din, dout),
                                         ("heads", None, None), param_dtype))
    if cfg.output_gate:
      self.g = Linear(d_model, (h, dh), ("embed", "heads", "head_dim"), **kw)
      self.norm = GatedRMSNorm(dh, eps=cfg.norm_eps, norm_before_gate=True,
                               axis_name="head_dim", **kw)
    else:
      self.g = None
      self.norm = RMSNorm(dh, eps=cfg.norm_eps, axis_name="head_dim", **kw)
    self.out = param(rngs, dense_init(h * dh), (h, dh, d_model), ("heads", "head_dim", "embed"),
                     param_dtype)

  # ---------------------------------------------------------------- pieces (public API)
  def _check_x(self, x: jax.Array) -> None:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"{type(self).__name__} expects x of shape [B, T, {self.d_model}], "
                       f"got {x.shape}")

  def initial_weights(self) -> Weights:
    """The learned initial memory weights, tuple of ``[H, d_in, d_out]`` float32."""
    return tuple(getattr(self, f"memory_{l}")[...].astype(_F32) for l in range(self.cfg.depth))

  def gates(self, x: jax.Array):
    """``(log(1 - alpha), log eta, theta)``, each ``[B, T, H]`` float32."""
    logits = jnp.einsum("btd,dgh->btgh", x.astype(_F32), self.gate_w[...].astype(_F32))
    logits = logits + self.gate_b[...].astype(_F32)
    a_theta, a_eta, a_alpha = logits[:, :, 0], logits[:, :, 1], logits[:, :, 2]
    theta = self.cfg.max_lr * jax.nn.sigmoid(a_theta)
    return jax.nn.log_sigmoid(-a_alpha), jax.nn.log_sigmoid(a_eta), theta

  def project(self, x: jax.Array, segment_ids=None, conv_state=None):
    """q, k, v ``[B, T, H, Dh]`` (float32; q, k L2-normalised), the gates and the new conv
    state (None unless ``conv_state`` is given)."""
    q, k, v = self.q(x), self.k(x), self.v(x)
    new_conv = None
    if self.conv is not None:
      (q, k, v), new_conv = self.conv((q, k, v), segment_ids, conv_state)
    q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
    return _l2norm(q), _l2norm(k), v.astype(_F32), self.gates(x), new_conv

  def query(self, x: jax.Array) -> jax.Array:
    """Queries without the convolution, ``l2norm(silu(x W_q))`` (MAC's memory read)."""
    return _l2norm(jax.nn.silu(self.q(x)))

  def read(self, weights: Weights, q: jax.Array) -> jax.Array:
    """``M(W, q)`` per head: weights ``[B, H, i, o]`` (or ``[H, i, o]``), q ``[B, T, H, Dh]``."""
    qh = jnp.moveaxis(q.astype(_F32), 2, 1)
    return jnp.moveaxis(self.mlp.apply(weights, qh), 1, 2)

  def output(self, o: jax.Array, x: jax.Array) -> jax.Array:
    """Per-head reads ``[B, T, H, Dh]`` -> ``[B, T, D]`` (norm, gate from x, projection)."""
    o = o.astype(self.dtype)
    o = self.norm(o, self.g(x)) if self.g is not None else self.norm(o)
    return jnp.einsum("bthd,hde->bte", o.astype(self.dtype), self.out[...].astype(self.dtype))

  def _run(self, x, segment_ids=None, state=None, *, aligned: bool = False):
    """(y, new state or None). ``aligned``: no documents and ``state`` (if any) at a chunk
    boundary of its document."""
    b, t, _ = x.shape
    conv_state = state if (state is not None and self.conv is not None) else None
    q, k, v, (lk, le, th), new_conv = self.project(x, segment_ids, conv_state)
    mem = None if state is None else (state["w0"], state["m"], state["s"])
    if aligned:
      doc_pos = None
    elif segment_ids is not None:
      doc_pos = segment_positions(segment_ids, b, t)
    else:
      pos = jnp.zeros((b,), jnp.int32) if state is None else state["pos"]
      doc_pos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)
    o, (w0, m, s) = memory_recurrence(self.mlp, self.initial_weights(), q, k, v, lk, le, th,
                                      chunk_size=self.cfg.chunk_size, state=mem,
                                      doc_pos=doc_pos)
    y = self.output(o, x)
    if state is None:
      return y, None
    dt = state["m"][0].dtype
    new = {"w0": tuple(w.astype(dt) for w in w0), "m": tuple(w.astype(dt) for w in m),
           "s": tuple(w.astype(dt) for w in s), "pos": state["pos"] + t}
    if new_conv:
      new.update(new_conv)
    return y, new

  # ---------------------------------------------------------------- contract
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    return self._run(x, segment_ids, None, aligned=segment_ids is None)[0]

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    w = tuple(jnp.broadcast_to(a, (batch,) + a.shape).astype(dtype)
              for a in self.initial_weights())
    state = {"w0": w, "m": w, "s": tuple(jnp.zeros_like(a) for a in w),
             "pos": jnp.zeros((batch,), jnp.int32)}
    if self.conv is not None:
      state.update(self.conv.init_state(batch, dtype))
    return state

  def step(self, x: jax.Array, state):
    """x ``[B, t, D]``: the next t tokens of one document per row -> (y, new state)."""
    self._check_x(x)
    return self._run(x, None, state, aligned=False)

  def memory_size(self, batch: int) -> int:
    return batch * self.num_heads * sum(i * o for i, o in self.mlp.shapes())

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    n = 3 * self.memory_size(batch)
    return n + (self.conv.state_size(batch) if self.conv is not None else 0)


# ----------------------------------------------------------------------------------
# Attention with a persistent-memory prefix
# ----------------------------------------------------------------------------------


class _PrefixAttention(nnx.Module):
  """Softmax attention whose keys are ``[persistent tokens] + context``.

  Persistent tokens ``P`` [Np, D] (learned, N(0, 1) init) are projected by the same key /
  value projections, are never rotated, and are scored with the un-rotated queries:
  ``s_{i,j} = q_i . k_j / sqrt(Dh)`` over ``[q_raw . k_P, rope(q) . rope(k)]``, one softmax.
  """

  def __init__(self, d_model: int, heads: int, num_persistent: int, rope_theta: float, *,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.heads = heads
    self.head_dim = dh = d_model // heads
    self.rope_theta = rope_theta
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (heads, dh), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (heads, dh), ("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (heads, dh), ("embed", "heads", "head_dim"), **kw)
    self.out = param(rngs, dense_init(d_model), (heads, dh, d_model),
                     ("heads", "head_dim", "embed"), param_dtype)
    self.persistent = (param(rngs, _normal_init(1.0), (num_persistent, d_model), (None, "embed"),
                             param_dtype) if num_persistent else None)

  def qkv(self, x, pos):
    """(rotated q, raw q, rotated k, v), each [B, T, H, Dh]."""
    q_raw = self.q(x)
    return (apply_rope(q_raw, pos, self.rope_theta), q_raw,
            apply_rope(self.k(x), pos, self.rope_theta), self.v(x))

  def attend(self, q, q_raw, keys, vals, mask) -> jax.Array:
    """q [B,Tq,H,Dh]; keys/vals [B,Tk,H,Dh]; mask [B,Tq,Tk] -> [B,Tq,D]."""
    scale = 1.0 / math.sqrt(self.head_dim)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, keys.astype(q.dtype),
                   preferred_element_type=_F32) * scale
    s = jnp.where(mask[:, None], s, _NEG_INF)
    vals = vals.astype(self.dtype)
    if self.persistent is not None:
      p = self.persistent[...].astype(self.dtype)
      pk, pv = self.k(p), self.v(p)  # [Np, H, Dh]
      sp = jnp.einsum("bqhd,khd->bhqk", q_raw, pk, preferred_element_type=_F32) * scale
      s = jnp.concatenate([sp, s], axis=-1)
      vals = jnp.concatenate([jnp.broadcast_to(pv, (vals.shape[0],) + pv.shape), vals], 1)
    w = jax.nn.softmax(s, axis=-1).astype(self.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, vals)
    return jnp.einsum("bqhd,hde->bqe", o, self.out[...].astype(self.dtype))

  # ---- sliding window (MAG, MAL): a cache of the last `window` tokens, as layers.attention
  def window_call(self, x, segment_ids, window: int):
    b, t, _ = x.shape
    pos = segment_positions(segment_ids, b, t)
    q, q_raw, k, v = self.qkv(x, pos)
    i = jnp.arange(t)
    diff = i[:, None] - i[None, :]
    mask = ((diff >= 0) & (diff < window))[None]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return self.attend(q, q_raw, k, v, jnp.broadcast_to(mask, (b, t, t)))

  def window_init_state(self, batch: int, dtype, window: int):
    shape = (batch, window, self.heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "slot_pos": jnp.full((window,), -1, jnp.int32), "pos": jnp.zeros((), jnp.int32)}

  def window_step(self, x, cache, window: int):
    b, t, _ = x.shape
    pos = cache["pos"]
    q_pos = pos + jnp.arange(t, dtype=jnp.int32)
    q, q_raw, k, v = self.qkv(x, q_pos)
    keys = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], 1)
    vals = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], 1)
    k_pos = jnp.concatenate([cache["slot_pos"], q_pos])
    diff = q_pos[:, None] - k_pos[None, :]
    mask = (k_pos[None, :] >= 0) & (diff >= 0) & (diff < window)
    y = self.attend(q, q_raw, keys, vals, jnp.broadcast_to(mask, (b, t, keys.shape[1])))
    new = {"k": keys[:, t:], "v": vals[:, t:], "slot_pos": k_pos[t:], "pos": pos + t}
    return y, new


def _attention_fields(cfg, d_model: int) -> None:
  """Validates the attention fields shared by MAC / MAG / MAL configs."""
  check(is_int(cfg.num_persistent) and cfg.num_persistent >= 0, "num_persistent",
        f"must be an integer >= 0 (got {cfg.num_persistent!r})")
  dh = _heads(d_model, cfg.attn_heads, "attn_heads")
  check(is_num(cfg.rope_theta) and cfg.rope_theta >= 0, "rope_theta",
        f"must be a finite number >= 0, 0 disables RoPE (got {cfg.rope_theta!r})")
  if cfg.rope_theta > 0:
    check(dh % 2 == 0, "attn_heads",
          f"attention head dim d_model / attn_heads = {dh} must be even with RoPE; "
          "change attn_heads or set rope_theta=0")


# ----------------------------------------------------------------------------------
# titans_mag / titans_mal
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TitansMAGConfig(TitansLMMConfig):
  """:class:`TitansLMMConfig` fields (the memory branch) plus the attention branch:

  window: sliding window of the attention (the persistent tokens are always visible).
  num_persistent: learnable persistent-memory tokens (0 = none).
  attn_heads: attention heads (must divide d_model; head dim even with RoPE).
  rope_theta: RoPE base of the attention (0 disables it).
  """

  window: int = 64
  num_persistent: int = 4
  attn_heads: int = 4
  rope_theta: float = 10000.0

  def validate(self, d_model: int) -> None:
    super().validate(d_model)
    check_pos_int(self.window, "window")
    _attention_fields(self, d_model)


@dataclasses.dataclass(frozen=True)
class TitansMALConfig(TitansMAGConfig):
  """Same fields as :class:`TitansMAGConfig`."""


class _WindowMemory(nnx.Module):
  """MAG / MAL: an LMM plus sliding-window attention with persistent tokens."""

  Config = TitansMAGConfig

  def __init__(self, d_model: int, cfg=None, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    cfg = self.Config() if cfg is None else cfg
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lmm = TitansLMM(d_model, _fields_of(cfg, TitansLMMConfig), **kw)
    self.attn = _PrefixAttention(d_model, cfg.attn_heads, cfg.num_persistent, cfg.rope_theta,
                                 **kw)

  _check_x = TitansLMM._check_x

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    return {"lmm": self.lmm.init_state(batch, dtype),
            "swa": self.attn.window_init_state(batch, dtype, self.cfg.window)}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    return (self.lmm.state_size(batch)
            + 2 * batch * self.cfg.window * self.attn.heads * self.attn.head_dim)


class TitansMAG(_WindowMemory):
  """Memory as a gate: ``o = W_o(norm_a(SWA([P] || x)) * sigmoid(norm_m(LMM(x))))``.

  State: ``{"lmm": the memory's state, "swa": the window's KV cache}``.
  """

  Config = TitansMAGConfig

  def __init__(self, d_model: int, cfg: TitansMAGConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(d_model, cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_attn = RMSNorm(d_model, **kw)
    self.norm_mem = RMSNorm(d_model, **kw)
    self.proj = Linear(d_model, d_model, ("embed", "mlp"), **kw)

  def _combine(self, ya, ym):
    gate = jax.nn.sigmoid(self.norm_mem(ym).astype(_F32))
    return self.proj((self.norm_attn(ya).astype(_F32) * gate).astype(self.dtype))

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    return self._combine(self.attn.window_call(x, segment_ids, self.cfg.window),
                         self.lmm(x, segment_ids))

  def step(self, x: jax.Array, state):
    self._check_x(x)
    ya, swa = self.attn.window_step(x, state["swa"], self.cfg.window)
    ym, lmm = self.lmm.step(x, state["lmm"])
    return self._combine(ya, ym), {"lmm": lmm, "swa": swa}


class TitansMAL(_WindowMemory):
  """Memory as a layer: ``u = x + LMM(x)``, ``o = SWA([P] || u)``.

  State: ``{"lmm": the memory's state, "swa": the window's KV cache}``.
  """

  Config = TitansMALConfig

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    u = x + self.lmm(x, segment_ids).astype(x.dtype)
    return self.attn.window_call(u, segment_ids, self.cfg.window)

  def step(self, x: jax.Array, state):
    self._check_x(x)
    ym, lmm = self.lmm.step(x, state["lmm"])
    y, swa = self.attn.window_step(x + ym.astype(x.dtype), state["swa"], self.cfg.window)
    return y, {"lmm": lmm, "swa": swa}


# ----------------------------------------------------------------------------------
# titans_mac
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TitansMACConfig(TitansLMMConfig):
  """:class:`TitansLMMConfig` fields (the memory) plus:

  segment_len: segment length of the attention (a multiple of chunk_size).
  num_persistent: learnable persistent-memory tokens (0 = none).
  attn_heads: attention heads (must divide d_model; head dim even with RoPE).
  rope_theta: RoPE base of the attention (0 disables it).
  """

  segment_len: int = 64
  num_persistent: int = 4
  attn_heads: int = 4
  rope_theta: float = 10000.0

  def validate(self, d_model: int) -> None:
    super().validate(d_model)
    check_pos_int(self.segment_len, "segment_len")
    check(self.segment_len % self.chunk_size == 0, "segment_len",
          f"must be a multiple of chunk_size={self.chunk_size} (got {self.segment_len}) so "
          "that the memory's chunks align with the segments")
    _attention_fields(self, d_model)


class TitansMAC(nnx.Module):
  """Memory as context (module docstring): per segment, attention over ``[persistent
  tokens, memory read h, segment]`` (causal), the memory updated with the attention output
  y, and ``o = norm_y(y) * sigmoid(norm_r(LMM(norm_y(y))))``.

  State: ``{"lmm": the memory's state (w0, m, s, pos, conv), "mseg": the memory weights at
  the current segment start, "hk"/"hv"/"xk"/"xv": [B, segment_len, Ha, Dha] the segment's
  keys/values of h and x, "pos": [B] int32}``.
  """

  Config = TitansMACConfig

  def __init__(self, d_model: int, cfg: TitansMACConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg = TitansMACConfig() if cfg is None else cfg
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lmm = TitansLMM(d_model, _fields_of(cfg, TitansLMMConfig), **kw)
    self.attn = _PrefixAttention(d_model, cfg.attn_heads, cfg.num_persistent, cfg.rope_theta,
                                 **kw)
    self.norm_y = RMSNorm(d_model, **kw)
    self.norm_r = RMSNorm(d_model, **kw)

  _check_x = TitansLMM._check_x

  def _gate(self, y, r):
    """o = y * sigmoid(norm_r(r)) (y already normalised)."""
    return (y.astype(_F32) * jax.nn.sigmoid(self.norm_r(r).astype(_F32))).astype(self.dtype)

  def memory_tokens(self, weights: Weights, x: jax.Array) -> jax.Array:
    """h = the memory's read of x's queries with ``weights`` -> ``[B, T, D]``."""
    return self.lmm.output(self.lmm.read(weights, self.lmm.query(x)), x)

  def segment_attention(self, x, h, pos) -> jax.Array:
    """Attention of one segment: queries x_i, keys [P, h_{<=i}, x_{<=i}] (RoPE position
    ``pos`` [L] for both h_j and x_j) -> y [B, L, D]."""
    b, ls, _ = x.shape
    q, q_raw, kx, vx = self.attn.qkv(x, pos)
    _, _, kh, vh = self.attn.qkv(h, pos)
    tri = jnp.tril(jnp.ones((ls, ls), bool))
    mask = jnp.broadcast_to(jnp.concatenate([tri, tri], 1), (b, ls, 2 * ls))
    return self.attn.attend(q, q_raw, jnp.concatenate([kh, kx], 1),
                            jnp.concatenate([vh, vx], 1), mask)

  def _segments(self, x):
    """Segment-parallel form (no documents): scan over segments."""
    b, t, d = x.shape
    ls = min(self.cfg.segment_len, t)  # one segment needs no padding (causal inside)
    n = -(-t // ls)
    xp = jnp.pad(x, ((0, 0), (0, n * ls - t), (0, 0)))
    xs = jnp.moveaxis(xp.reshape(b, n, ls, d), 1, 0)
    state0 = self.lmm.init_state(b, _F32)

    def body(state, inp):
      xseg, i = inp
      h = self.memory_tokens(state["m"], xseg)
      y = self.segment_attention(xseg, h, i * ls + jnp.arange(ls, dtype=jnp.int32))
      y = self.norm_y(y)
      r, state = self.lmm._run(y, None, state, aligned=True)
      return state, self._gate(y, r)

    _, ys = jax.lax.scan(body, state0, (xs, jnp.arange(n, dtype=jnp.int32)))
    return jnp.moveaxis(ys, 0, 1).reshape(b, n * ls, d)[:, :t]

  def _token(self, state, x_t):
    """One token per row: x_t [B, 1, D] -> (o_t, new state)."""
    ls = self.cfg.segment_len
    b = x_t.shape[0]
    pos = state["pos"]  # [B]
    j = pos % ls
    new_seg = j == 0
    mseg = _bsel(new_seg, state["lmm"]["m"], state["mseg"])
    h_t = self.memory_tokens(mseg, x_t)
    q, q_raw, kx, vx = self.attn.qkv(x_t, pos[:, None])
    _, _, kh, vh = self.attn.qkv(h_t, pos[:, None])
    rows = jnp.arange(b)
    cache = {}
    for name, new in (("hk", kh), ("hv", vh), ("xk", kx), ("xv", vx)):
      cache[name] = state[name].at[rows, j].set(new[:, 0].astype(state[name].dtype))
    visible = jnp.arange(ls)[None, :] <= j[:, None]  # [B, Ls]
    mask = jnp.concatenate([visible, visible], 1)[:, None, :]
    y = self.attn.attend(q, q_raw, jnp.concatenate([cache["hk"], cache["xk"]], 1),
                         jnp.concatenate([cache["hv"], cache["xv"]], 1), mask)
    y = self.norm_y(y)
    r, lmm = self.lmm.step(y, state["lmm"])
    o = self._gate(y, r)
    dt = state["mseg"][0].dtype
    new_state = {"lmm": lmm, "mseg": tuple(w.astype(dt) for w in mseg), **cache,
                 "pos": pos + 1}
    return o, new_state

  def _tokens(self, x, state, reset=None):
    """Token-by-token scan. reset: [B, T] bool (document starts) or None."""
    init = self.init_state(x.shape[0], state["mseg"][0].dtype) if reset is not None else None

    def body(st, inp):
      x_t, r_t = inp
      if r_t is not None:  # every leaf has the batch axis first
        st = jax.tree.map(
            lambda a, z: jnp.where(r_t.reshape((-1,) + (1,) * (a.ndim - 1)), z, a), st, init)
      o, st = self._token(st, x_t[:, None])
      return st, o[:, 0]

    xs = jnp.moveaxis(x, 1, 0)
    rs = None if reset is None else jnp.moveaxis(reset, 1, 0)
    state, ys = jax.lax.scan(body, state, (xs, rs))
    return jnp.moveaxis(ys, 0, 1), state

  # ---------------------------------------------------------------- contract
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    if segment_ids is None:
      return self._segments(x)
    b, t, _ = x.shape
    reset = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                            1)
    return self._tokens(x, self.init_state(b, _F32), reset)[0]

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    lmm = self.lmm.init_state(batch, dtype)
    shape = (batch, self.cfg.segment_len, self.attn.heads, self.attn.head_dim)
    state = {"lmm": lmm, "mseg": lmm["m"], "pos": jnp.zeros((batch,), jnp.int32)}
    for name in ("hk", "hv", "xk", "xv"):
      state[name] = jnp.zeros(shape, dtype)
    return state

  def step(self, x: jax.Array, state):
    """x ``[B, t, D]``: exact token-by-token form (a scan over the t tokens)."""
    self._check_x(x)
    return self._tokens(x, state)

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    cache = 4 * batch * self.cfg.segment_len * self.attn.heads * self.attn.head_dim
    return self.lmm.state_size(batch) + self.lmm.memory_size(batch) + cache
