"""The chunk-parallel ("xla") form of the Titans memory recurrence (Behrouz, Zhong &
Mirrokni 2025, "Titans: Learning to Memorize at Test Time", Sec. 3.2, "Parallelizing the
long-term memory training"); the recurrence itself is in :mod:`kernels.neural_memory`.

Inside a block of tokens that share the gradient point W' and start from (M^, S^), with
``beta_i = prod_{j<=i} (1 - alpha_j)``, ``m_i = prod_{j<=i} eta_j``,
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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.neural_memory.mlp import MemoryMLP, Weights

__all__ = ["memory_recurrence_chunked"]

_F32 = jnp.float32


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
  and outputs as :func:`memory_recurrence_chunked` with T = 1."""
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


def memory_recurrence_chunked(mlp: MemoryMLP, init_weights: Weights, q, k, v, log_keep,
                              log_eta, theta, *, chunk_size: int, state=None, doc_pos=None,
                              return_chunk_states: bool = False, memory_at=None):
  """The chunk-parallel form of :func:`kernels.neural_memory.memory_recurrence` (same
  arguments but ``impl``, same results)."""
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


