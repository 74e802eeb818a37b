"""The Titans memory recurrence token by token: the ground truth of
:func:`kernels.neural_memory.memory_recurrence` (Behrouz, Zhong & Mirrokni 2025, "Titans:
Learning to Memorize at Test Time", Eqs. 9-14).

A ``lax.scan`` over tokens with materialised weights. Per token t, for every batch row and
head::

    if t starts a document:   M <- W_init,  S <- 0
    if t starts a chunk:      W' <- M           (the memory just before the chunk)
    G_t = grad_W ||M(W', k_t) - v_t||^2 / Dh    (``jax.grad``; clipped to norm <= tau)
    S_t = eta_t S_{t-1} - theta_t G_t
    M_t = (1 - alpha_t) M_{t-1} + S_t
    o_t = M(M_t, q_t)

The chunked gradient point W' is part of the recurrence's definition (the paper's
mini-batch gradient descent, Sec. 3.2), so this reference takes the chunk size: chunks
start where the position in the document is a multiple of ``chunk_size`` (``doc_pos``), or at
every multiple of it from token 0 when ``doc_pos`` is None (then no token starts a document:
the carried state, or the initial weights, continue). ``chunk_size=1`` is the exact
sequential rule (``W' = M_{t-1}``). Nothing is shared with the chunk-parallel form but the
memory network's forward ``MemoryMLP.apply``: the gradient is autodiff of the loss, not
``MemoryMLP.grad_terms``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["memory_recurrence_reference"]


def memory_recurrence_reference(mlp, init_weights, q, k, v, log_keep, log_eta, theta, *,
                                chunk_size: int, state=None, doc_pos=None,
                                return_chunk_states: bool = False, memory_at=None):
  """Per-token form of :func:`kernels.neural_memory.memory_recurrence` (same arguments but
  ``impl``, same results; float32 throughout).

  The optional outputs are gathered from the per-token states on the physical chunk grid
  of the chunked form (``P = chunk_size`` tokens, or ``min(chunk_size, T)`` with
  ``doc_pos``): ``return_chunk_states`` gives ``(w0, m, s)`` at each physical chunk's last
  token; ``memory_at`` gives ``M_t`` at each physical chunk's marked token (a row with no
  mark in a chunk gets the memory before the chunk; the chunked form returns another
  meaningless value there).
  """
  f32 = jnp.float32
  b, t = q.shape[:2]
  init = tuple(jnp.broadcast_to(w.astype(f32), (b,) + w.shape) for w in init_weights)
  zeros = tuple(jnp.zeros_like(w) for w in init)
  if state is None:
    state = (init, init, zeros)
  state = tuple(tuple(w.astype(f32) for w in part) for part in state)
  if doc_pos is None:
    starts_doc = jnp.zeros((b, t), bool)
    starts_chunk = jnp.broadcast_to(jnp.arange(t) % chunk_size == 0, (b, t))
  else:
    dp = jnp.broadcast_to(doc_pos, (b, t))
    starts_doc, starts_chunk = dp == 0, dp % chunk_size == 0

  keep_states = return_chunk_states or memory_at is not None

  def pick(mask, a, c):  # per batch row: a where mask else c
    return tuple(jnp.where(mask[:, None, None, None], x, y) for x, y in zip(a, c))

  def read(w, x):  # w: [B, H, i, o]; x: [B, H, Dh] -> M(w, x) [B, H, Dh]
    return mlp.apply(w, x[..., None, :])[..., 0, :]

  def gradient(w, k_t, v_t):
    # Each (row, head) loss depends on its own weights only: the gradient of the sum is
    # the per-(row, head) gradient.
    loss = lambda w: jnp.sum(jnp.mean(jnp.square(read(w, k_t) - v_t), axis=-1))
    g = jax.grad(loss)(w)
    if mlp.max_grad_norm is not None:
      tau = mlp.max_grad_norm
      norm = jnp.sqrt(jnp.maximum(sum(jnp.sum(x * x, axis=(-2, -1)) for x in g), tau * tau))
      g = tuple(x * (tau / norm)[..., None, None] for x in g)
    return g

  def step(carry, x):
    w0, m, s = carry
    q_t, k_t, v_t, lk, le, th, doc_t, chunk_t = x
    m = pick(doc_t, init, m)
    s = pick(doc_t, zeros, s)
    w0 = pick(chunk_t, m, w0)
    g = gradient(w0, k_t, v_t)
    eta, keep, th = (a[..., None, None] for a in (jnp.exp(le), jnp.exp(lk), th))
    s = tuple(eta * s_l - th * g_l for s_l, g_l in zip(s, g))
    m = tuple(keep * m_l + s_l for m_l, s_l in zip(m, s))
    new = (w0, m, s)
    return new, (read(m, q_t), new if keep_states else None)

  time_major = lambda a: jnp.moveaxis(a.astype(f32), 1, 0)
  xs = tuple(time_major(a) for a in (q, k, v, log_keep, log_eta, theta))
  xs += (jnp.moveaxis(starts_doc, 1, 0), jnp.moveaxis(starts_chunk, 1, 0))
  final, (o, per_token) = jax.lax.scan(step, state, xs)
  out = (jnp.moveaxis(o, 0, 1), final)
  if not keep_states:
    return out
  p = chunk_size if doc_pos is None else min(chunk_size, t)
  n = -(-t // p)
  first = jnp.arange(n) * p  # first token of each physical chunk
  if return_chunk_states:
    last = jnp.minimum(first + p - 1, t - 1)
    out += (jax.tree.map(lambda a: a[last], per_token),)
  if memory_at is not None:
    marks = jnp.pad(jnp.broadcast_to(memory_at, (b, t)), ((0, 0), (0, n * p - t)))
    marks = marks.reshape(b, n, p)
    at = jnp.where(jnp.any(marks, -1), first + jnp.argmax(marks, -1), first - 1)  # [B, n]
    # Memory before token 0 (the carried one) at index 0, M_j at index j + 1.
    m_all = tuple(jnp.concatenate([m0[None], mt]) for m0, mt in zip(state[1], per_token[1]))
    rows = jnp.arange(b)[None, :]
    out += (tuple(a[at.T + 1, rows] for a in m_all),)
  return out
