"""Pure-jnp forms of the diagonal-plus-low-rank (DPLR) recurrence: the per-token ground
truth, the per-chunk preparation and the chunk hand-off shared by every implementation.

The recurrence, per batch row and head (``S_t``: ``[Dk, Dv]``)::

    S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T,        o_t = S_t^T q_t

with ``g_t = log_decay_t`` a per-key-channel log decay, ``S_{-1} = initial_state`` (zeros by
default) and, where ``reset[t]`` is True, ``S_{t-1}`` replaced by zeros before token t.

Chunked form. With the *removal values* ``u_t = S_{t-1}^T b_t`` the update is a
per-channel-gated linear recurrence with two writes, ``S_t = diag(e^{g_t}) S_{t-1}
+ a_t u_t^T + k_t v_t^T``. Inside a chunk with entering state ``S`` and the per-channel
log decays ``X_ij = sum_{j<m<i} g_m`` (between j and i, both excluded) and
``Y_ij = sum_{j<m<=i} g_m`` (i included), both *segment sums* of exactly the log decays in
between, masked before ``exp`` (never a product or ratio of raw decays)::

    M_ij = sum_d b_id a_jd e^{X_ijd},   N_ij = sum_d b_id k_jd e^{X_ijd}         (j < i)
    (I - M) u = (b * e^{B_{i-1}}) S + N V          B_i = sum_{m<=i} g_m (chunk start = 0)
    u = W S + U,        W = (I - M)^{-1} (b * e^{B_{i-1}}),   U = (I - M)^{-1} N V
    o = (q * e^{B_i}) S + P u + R V,   P_ij = sum_d q_id a_jd e^{Y_ijd},  R_ij likewise with k
    S' = e^{B_C} * S + (a * e^{B_C - B_j})^T u + (k * e^{B_C - B_j})^T V

Everything but ``u = W S + U``, the outputs' ``S`` terms and the hand-off ``S -> S'``
is independent of the state: :func:`prepare` computes it for a chunk (the ``[C, C, Dk]``
decay tensors are built per chunk and never kept), :func:`apply` does the state part.
``(I - M)^{-1}`` is the delta rule's blocked forward substitution
(:func:`kernels.delta_rule.reference.unit_lower_inverse`).

Resets are masks with ``seg`` the within-chunk count of resets: pairs interact only inside
one document (``seg_i == seg_j``, so ``I - M`` is block diagonal over documents), the
entering state reaches token i only when ``seg_i == 0``, token j reaches the chunk-end
state only when ``seg_j == seg_last``, the entering state survives only when
``seg_last == 0``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kernels.common import segment_sum, suffix_sum
from kernels.delta_rule.reference import unit_lower_inverse

_HI = lax.Precision.HIGHEST
NEG_INF = -jnp.inf

# The prepared per-chunk arrays, in this order (chunk-major ``[B, H, N, C, ...]``):
#   q_in [C,Dk]  q * e^{B_i} (0 after a reset)       w   [C,Dk]  W
#   u    [C,Dv]  U                                   p   [C,C]   P (lower, incl. diagonal)
#   o_v  [C,Dv]  R V (the state-free outputs)       a_out [C,Dk] a * e^{B_C - B_j} (masked)
#   k_out [C,Dk] k * e^{B_C - B_j} (masked)          v   [C,Dv]  V
#   decay [Dk]   e^{B_C} (0 if a document starts in the chunk)
PREPARED = ("q_in", "w", "u", "p", "o_v", "a_out", "k_out", "v", "decay")


def check_inputs(q, k, v, a, b, log_decay, initial_state=None, reset=None):
  """Raise a ValueError naming the argument whose shape is wrong."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B,T,H,Dk]; got shape {q.shape}.")
  B, T, H, Dk = q.shape
  for name, x in (("k", k), ("a", a), ("b", b), ("log_decay", log_decay)):
    if x is None or x.shape != q.shape:
      raise ValueError(f"{name} must have q's shape [B,T,H,Dk]={q.shape}; got "
                       f"{None if x is None else x.shape}.")
  if v.ndim != 4 or v.shape[:3] != (B, T, H):
    raise ValueError(f"v must be [B,T,H,Dv] with B,T,H={(B, T, H)}; got {v.shape}.")
  Dv = v.shape[-1]
  if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
    raise ValueError(
        f"initial_state must be [B,H,Dk,Dv]={(B, H, Dk, Dv)}; got {initial_state.shape}.")
  if reset is not None and reset.shape != (B, T):
    raise ValueError(f"reset must be a [B,T]={(B, T)} bool array; got {reset.shape}.")


# ----------------------------------------------------------------------------------
# Ground truth: one token at a time.
# ----------------------------------------------------------------------------------


def dplr_reference(q, k, v, a, b, log_decay, initial_state=None, reset=None):
  """Per-token ``lax.scan``, fp32 state. Returns ``(o, S_final)``."""
  check_inputs(q, k, v, a, b, log_decay, initial_state, reset)
  B, T, H, Dk = q.shape
  Dv = v.shape[-1]
  f32 = jnp.float32
  s0 = (jnp.zeros((B, H, Dk, Dv), f32) if initial_state is None
        else initial_state.astype(f32))
  tm = lambda x: jnp.swapaxes(x.astype(f32), 0, 1)  # time-major
  xs = dict(q=tm(q), k=tm(k), v=tm(v), a=tm(a), b=tm(b), g=tm(log_decay))
  if reset is not None:
    xs["r"] = jnp.swapaxes(reset.astype(bool), 0, 1)

  def step(s, x):
    if "r" in x:
      s = jnp.where(x["r"][:, None, None, None], 0.0, s)
    removal = jnp.einsum("bhd,bhde->bhe", x["b"], s, precision=_HI)  # S^T b
    s = (jnp.exp(x["g"])[..., None] * s + x["a"][..., :, None] * removal[..., None, :]
         + x["k"][..., :, None] * x["v"][..., None, :])
    return s, jnp.einsum("bhd,bhde->bhe", x["q"], s, precision=_HI)

  sf, o = lax.scan(step, s0, xs)
  return jnp.swapaxes(o, 0, 1).astype(q.dtype), sf


# ----------------------------------------------------------------------------------
# Chunked form: per-chunk preparation (state-free) and the state part.
# ----------------------------------------------------------------------------------


def prepare(q, k, v, a, b, g, seg):
  """The state-free part of chunks, fp32: ``q, k, a, b, g`` ``[B,H,N,C,Dk]``, ``v``
  ``[B,H,N,C,Dv]``, ``seg`` ``[B,N,C]`` int32 (within-chunk reset counts). Returns the
  dict of :data:`PREPARED` arrays. Memory: two ``[B,H,N,C,C,Dk]`` decay tensors, so
  callers pass one chunk (or a few) at a time."""
  C = q.shape[-2]
  segh = seg[:, None]  # [B,1,N,C]
  same = (segh[..., :, None] == segh[..., None, :])[..., None]  # [B,1,N,C,C,1]
  gt = jnp.swapaxes(g, -1, -2)  # [B,H,N,Dk,C]
  incl = jnp.moveaxis(segment_sum(gt), -3, -1)  # [B,H,N,C,C,Dk]: sum_{j<m<=i}
  # sum_{j<m<i} = the inclusive sum of row i-1 (row 0 never used: no j < 0)
  excl = jnp.concatenate([jnp.zeros_like(incl[..., :1, :, :]), incl[..., :-1, :, :]],
                         axis=-3)
  lower = jnp.tril(jnp.ones((C, C), bool))[..., None]
  strict = jnp.tril(jnp.ones((C, C), bool), -1)[..., None]
  e_x = jnp.exp(jnp.where(strict & same, excl, NEG_INF))
  e_y = jnp.exp(jnp.where(lower & same, incl, NEG_INF))
  pair = lambda x, y, e: jnp.sum(x[..., :, None, :] * y[..., None, :, :] * e, axis=-1)
  m, n = pair(b, a, e_x), pair(b, k, e_x)
  p, r = pair(q, a, e_y), pair(q, k, e_y)
  first = (segh == 0)[..., None]  # the entering state reaches token i
  cum = jnp.cumsum(g, axis=-2)  # B_i (within the first document it is a true prefix sum)
  cum_prev = cum - g  # B_{i-1}
  b_in = b * jnp.exp(jnp.where(first, cum_prev, NEG_INF))
  q_in = q * jnp.exp(jnp.where(first, cum, NEG_INF))
  inv = unit_lower_inverse(-m)
  w = jnp.einsum("...ij,...jd->...id", inv, b_in, precision=_HI)
  u = jnp.einsum("...ij,...jd->...id", inv,
                 jnp.einsum("...ij,...jd->...id", n, v, precision=_HI), precision=_HI)
  o_v = jnp.einsum("...ij,...jd->...id", r, v, precision=_HI)
  to_end = (segh == segh[..., -1:])[..., None]
  e_end = jnp.exp(jnp.where(to_end, suffix_sum(g, axis=-2), NEG_INF))
  decay = jnp.where((segh[..., -1] == 0)[..., None], jnp.exp(jnp.sum(g, axis=-2)), 0.0)
  return dict(q_in=q_in, w=w, u=u, p=p, o_v=o_v, a_out=a * e_end, k_out=k * e_end, v=v,
              decay=decay)


def apply(h, q_in, w, u, p, o_v, a_out, k_out, v, decay):
  """The state part of chunks, given the state entering each (``h`` ``[B,H,N,Dk,Dv]``):
  returns ``(o [B,H,N,C,Dv], S_next [B,H,N,Dk,Dv])``. The Pallas kernels compute exactly
  this, chunk after chunk; their backward differentiates it at the saved states."""
  mm = lambda x, y: jnp.einsum("...ij,...jd->...id", x, y, precision=_HI)
  mt = lambda x, y: jnp.einsum("...ci,...cd->...id", x, y, precision=_HI)  # x^T y
  rem = mm(w, h) + u  # u = W S + U: the removal values
  o = mm(q_in, h) + mm(p, rem) + o_v
  s_next = decay[..., None] * h + mt(a_out, rem) + mt(k_out, v)
  return o, s_next


# ----------------------------------------------------------------------------------
# The state part as a scan over chunks: the ``xla`` implementation's "kernels" (the jnp
# twins of pallas_tpu / pallas_gpu's ``forward`` / ``backward``, same signatures).
# ----------------------------------------------------------------------------------


def forward(q_in, w, u, p, o_v, a_out, k_out, v, decay, s0, *, want_states=False,
            compute_dtype="float32", interpret=False):
  """:func:`apply` chunk after chunk (``lax.scan``) from ``s0``: ``(o, S_final)`` and, with
  ``want_states``, the state entering every chunk ``h`` ``[B,H,N,Dk,Dv]``."""
  del compute_dtype, interpret  # fp32 throughout
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q_in, w, u, p, o_v, a_out, k_out, v, decay))

  def step(s, x):
    o, s_next = apply(s, *x)
    return s_next, (o, s)

  sf, (o, h) = lax.scan(step, s0, xs)
  o, h = jnp.moveaxis(o, 0, 2), jnp.moveaxis(h, 0, 2)
  return (o, sf, h) if want_states else (o, sf)


def backward(q_in, w, p, a_out, decay, do, dsf, *, compute_dtype="float32", interpret=False):
  """The state cotangent carried from the last chunk to the first::

      drem = P^T dO + a_out dS',     dS = decay * dS' + q_in^T dO + W^T drem

  Returns ``(dh [B,H,N,Dk,Dv]``: the cotangent of the state *leaving* every chunk,
  ``ds0)``."""
  del compute_dtype, interpret
  mt = lambda x, y: jnp.einsum("...ci,...cd->...id", x, y, precision=_HI)  # x^T y
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q_in, w, p, a_out, decay, do))

  def step(ds_out, x):
    q_in_, w_, p_, a_out_, decay_, do_ = x
    drem = mt(p_, do_) + jnp.einsum("...cd,...de->...ce", a_out_, ds_out, precision=_HI)
    ds_in = decay_[..., None] * ds_out + mt(q_in_, do_) + mt(w_, drem)
    return ds_in, ds_out

  ds0, dh = lax.scan(step, dsf, xs, reverse=True)
  return jnp.moveaxis(dh, 0, 2), ds0
