"""Pure-jnp forms of the diagonal (element-wise) linear recurrence: the per-token ground
truth, the two-level chunked form (the ``"xla"`` implementation) and the log-depth
associative-scan form.

The recurrence, independently for every batch row and channel::

    h_t = a_t * h_{t-1} + b_t,        a_t = exp(log_a_t)

with ``h_{-1} = initial_state`` (zeros by default) and, where ``reset[t]`` is True,
``h_{t-1}`` replaced by zeros before step ``t`` (a document starts at ``t``: ``h_t = b_t``).

Callers pass the decay in log space, which is what they have:

  * S4D (Gu et al. 2022, "On the parameterization and initialization of diagonal state
    space models"): the ZOH-discretised ``log_a = dt * A`` with complex ``A`` (``Re A < 0``),
    ``b = (exp(dt A) - 1) / A * B * u``: complex64 ``log_a`` and ``b``;
  * Mamba-1 selective scan (Gu & Dao 2023): ``log_a = dt * A`` ``[B, T, D, N]``,
    ``b = dt * B_t * x_t``;
  * RG-LRU (De et al. 2024, Griffin): ``log_a = -c * r_t * softplus(-Lambda)``,
    ``b = sqrt(1 - a_t^2) * (i_t * x_t)``.

The associative form is ``jax.lax.associative_scan`` over time with the operator on
(log decay, value, reset flag) triples

    (A1, B1, r1) o (A2, B2, r2) = (A1 + A2 if not r2 else A2,
                                   B2 + (exp(A2) * B1 if not r2 else 0),
                                   r1 | r2),

i.e. decays compose by *adding* logs (a product of raw decays is never formed), and a
reset inside the right span drops everything to its left. Resets are selected with
``where`` (never ``-inf`` log decays), so autodiff of these forms has no ``inf * 0``.
The chunked form (:func:`diagonal_recurrence_chunked`) applies the same idea in two
sequential levels (inside chunks, then across chunks): O(T) work and ``C + T/C``
sequential steps, cheap to compile, the faster of the two on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels.common import pad_time

NEG_INF = -jnp.inf


def check_inputs(log_a, b, initial_state=None, reset=None):
  """Validate shapes; raise a ValueError naming the argument that is wrong."""
  if b.ndim < 3:
    raise ValueError(f"b must be [B, T, ...channels] with at least one channel axis "
                     f"(e.g. [B,T,D] or [B,T,D,N]); got shape {b.shape}.")
  if not jnp.issubdtype(b.dtype, jnp.inexact):
    raise ValueError(f"b must be a floating or complex array; got dtype {b.dtype}.")
  try:
    shape = jnp.broadcast_shapes(jnp.shape(log_a), b.shape)
  except ValueError:
    shape = None
  if shape != b.shape:
    raise ValueError(f"log_a must have b's shape {b.shape} or broadcast to it (e.g. a "
                     f"time-invariant [D, N] decay); got {jnp.shape(log_a)}.")
  Bn, T = b.shape[:2]
  if initial_state is not None and initial_state.shape != (Bn,) + b.shape[2:]:
    raise ValueError(f"initial_state must be [B, ...channels]={(Bn,) + b.shape[2:]}; got "
                     f"{initial_state.shape}.")
  if reset is not None and reset.shape != (Bn, T):
    raise ValueError(f"reset must be a [B,T]={(Bn, T)} bool array; got {reset.shape}.")


def state_dtype(log_a, b):
  """fp32 accumulation; complex64 when either input is complex."""
  if jnp.iscomplexobj(log_a) or jnp.iscomplexobj(b):
    return jnp.complex64
  return jnp.float32


def _reset_mask(reset, ndim):
  return reset.reshape(reset.shape + (1,) * (ndim - 2))


# ----------------------------------------------------------------------------------
# Ground truth: one token at a time.
# ----------------------------------------------------------------------------------


def diagonal_recurrence_reference(log_a, b, initial_state=None, reset=None):
  """Per-token ``lax.scan`` (fp32 / complex64 state). Returns ``(h, final_state)``."""
  check_inputs(log_a, b, initial_state, reset)
  dt = state_dtype(log_a, b)
  log_a = jnp.broadcast_to(log_a, b.shape)
  h0 = (jnp.zeros((b.shape[0],) + b.shape[2:], dt) if initial_state is None
        else initial_state.astype(dt))
  tm = lambda x: jnp.swapaxes(x, 0, 1)  # time-major
  xs = {"la": tm(log_a.astype(dt)), "b": tm(b.astype(dt))}
  if reset is not None:
    xs["r"] = tm(reset.astype(bool))

  def step(h, x):
    if "r" in x:
      h = jnp.where(x["r"].reshape(x["r"].shape + (1,) * (h.ndim - 1)), 0.0, h)
    h = jnp.exp(x["la"]) * h + x["b"]
    return h, h

  hf, h = lax.scan(step, h0, xs)
  return tm(h).astype(b.dtype), hf


# ----------------------------------------------------------------------------------
# Parallel form (the "xla" implementation).
# ----------------------------------------------------------------------------------


def _combine(left, right):
  """Compose two spans, ``left`` earlier in time (see the module docstring)."""
  la1, b1, r1 = left
  la2, b2, r2 = right
  la = jnp.where(r2, la2, la1 + la2)
  val = b2 + jnp.where(r2, 0.0, jnp.exp(la2) * b1)
  return la, val, r1 | r2


def diagonal_recurrence_associative(log_a, b, initial_state=None, reset=None):
  """``jax.lax.associative_scan`` over time (O(T) work, O(log T) depth) in fp32 (or
  complex64), differentiated by ordinary autodiff. Returns ``(h, final_state)``.

  The initial state is folded into the first token (``b_0 += a_0 * h0`` unless a
  document starts there), so the scan itself starts from zero.
  """
  check_inputs(log_a, b, initial_state, reset)
  dt = state_dtype(log_a, b)
  la = jnp.broadcast_to(log_a, b.shape).astype(dt)
  x = b.astype(dt)
  if reset is None:
    r = jnp.zeros(b.shape[:2] + (1,) * (b.ndim - 2), bool)
  else:
    r = _reset_mask(reset.astype(bool), b.ndim)
  if initial_state is not None:
    carry_in = jnp.exp(la[:, 0]) * initial_state.astype(dt)
    carry_in = jnp.where(r[:, 0], 0.0, carry_in)
    x = x.at[:, 0].add(carry_in)
  _, h, _ = lax.associative_scan(_combine, (la, x, r), axis=1)
  return h.astype(b.dtype), h[:, -1]



def diagonal_recurrence_chunked(log_a, b, initial_state=None, reset=None, chunk_size=128):
  """Two-level chunked form: O(T) work in ``C + T/C`` sequential steps instead of T.

  Tokens are split into N chunks of C (T padded at the front). Level 1 is a ``lax.scan``
  over the C positions, vectorised over *all* chunks at once, computing per token the
  value with a zero carry-in ``V_i`` and the log decay since the chunk start ``A_i``
  (a running *sum* of log decays; a reset restarts both and sets ``R_i``). Level 2 is a
  ``lax.scan`` over the N chunks handing the ``[B, ...channels]`` carry across, and then
  ``h_i = V_i + (0 if R_i else exp(A_i)) * carry_in``. Exponents are sums of log decays
  (no raw-decay products, no differences of cumulative sums); resets are ``where``s, so
  autodiff sees no ``inf * 0``.
  """
  check_inputs(log_a, b, initial_state, reset)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
  dt = state_dtype(log_a, b)
  Bn, T = b.shape[:2]
  chan = b.shape[2:]
  C = int(min(chunk_size, T))
  N = -(-T // C)
  Tp = N * C

  def to_chunks(x, fill=0):  # [B, T, ...] -> [C, B, N, ...] (position-major), front-padded
    x = pad_time(x, Tp, fill)
    return jnp.moveaxis(x.reshape((Bn, N, C) + x.shape[2:]), 2, 0)

  xs = {"la": to_chunks(jnp.broadcast_to(log_a, b.shape).astype(dt)),
        "b": to_chunks(b.astype(dt))}
  if reset is not None:
    xs["r"] = to_chunks(_reset_mask(reset.astype(bool), b.ndim), False)

  def within(carry, x):
    a_cum, v, seen = carry
    a_cum = a_cum + x["la"]
    v = jnp.exp(x["la"]) * v + x["b"]
    if "r" in x:
      a_cum = jnp.where(x["r"], 0.0, a_cum)
      v = jnp.where(x["r"], x["b"], v)
      seen = seen | x["r"]
    return (a_cum, v, seen), (a_cum, v, seen)

  zeros = jnp.zeros((Bn, N) + chan, dt)
  seen0 = jnp.zeros((Bn, N) + (1,) * len(chan), bool)
  _, (a_cum, v, seen) = lax.scan(within, (zeros, zeros, seen0), xs)  # [C, B, N, ...]
  decay_in = jnp.where(seen, 0.0, jnp.exp(a_cum))  # how the carry-in reaches token i
  h0 = (jnp.zeros((Bn,) + chan, dt) if initial_state is None
        else initial_state.astype(dt))

  def across(c, x):
    d_last, v_last = x
    return d_last * c + v_last, c

  tm = lambda x: jnp.moveaxis(x, 1, 0)  # [B, N, ...] -> [N, B, ...]
  hf, c_in = lax.scan(across, h0, (tm(decay_in[-1]), tm(v[-1])))
  h = v + decay_in * jnp.moveaxis(c_in, 0, 1)[None]  # [C, B, N, ...]
  h = jnp.moveaxis(h, 0, 2).reshape((Bn, Tp) + chan)[:, Tp - T:]
  return h.astype(b.dtype), hf
