"""Pallas Mosaic-TPU kernels for the state part of the chunked DPLR recurrence.

The recurrence (:mod:`kernels.dplr`), per batch row and head, ``S_t``: ``[Dk, Dv]``::

    S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T,        o_t = S_t^T q_t

Everything that does not depend on the state -- the per-channel segment-sum decays, the
UT transform ``(I - M)^{-1}`` of the rank-one removals, the intra-chunk outputs -- is
prepared before the kernel, one chunk at a time, by XLA (:func:`kernels.dplr.prepare_all`,
:func:`kernels.dplr.reference.prepare`; resets are already folded into the prepared
masks). The kernels do only the sequential part, exactly :func:`reference.apply` chunk
after chunk. Per chunk, with entering state ``S`` (fp32 ``[Dk, Dv]``)::

    rem = W S + U                                   (removal values S^T b, [C, Dv])
    o   = Q_in S + P rem + O_v                      ([C, Dv])
    S'  = decay[:, None] * S + A_out^T rem + K_out^T V

with the prepared ``Q_in = q * e^{B_i}`` ``[C, Dk]``, ``W`` ``[C, Dk]``, ``U`` ``[C, Dv]``,
``P`` ``[C, C]`` (lower triangular), ``O_v`` ``[C, Dv]`` (the state-free outputs),
``A_out``, ``K_out`` ``[C, Dk]`` (a, k decayed to the chunk end), ``V`` ``[C, Dv]`` and
``decay = e^{B_C}`` ``[Dk]`` (0 when a document starts inside the chunk).

Forward, grid ``(B, H, num_chunks)``: batch and heads ``"parallel"``, the chunk axis
``"arbitrary"`` (sequential) with the fp32 ``[Dk, Dv]`` state in VMEM scratch, initialised
from ``s0`` at chunk 0 and written to ``S_final`` after the last chunk. Optionally
(``want_states``) the state *entering* every chunk is written out ``[B, H, N, Dk, Dv]`` for
the backward pass.

Backward (:func:`backward`), same grid with the chunks visited last to first and the state
cotangent ``dS`` in VMEM scratch (initialised from the final state's cotangent)::

    drem = P^T dO + A_out dS'                       ([C, Dv])
    dS   = decay[:, None] * dS' + Q_in^T dO + W^T drem

It writes ``dS'`` (the cotangent of the state *leaving* every chunk) and the ``dS`` of the
first chunk (the initial state's cotangent). The rest of the gradient is local to each
chunk: the VJP of :func:`reference.apply` at the saved entering states, computed by XLA
in parallel over chunks (see ``kernels/dplr/__init__.py``).

Layout: the chunk-major ``[B, H, N, C, D]`` inputs are read through the free view
``[B, H, N*C, D]`` as ``(C, D)`` blocks (Mosaic's (8, 128) rule: C a multiple of 8 -- 16 for
bf16 -- and D the whole last axis); ``P`` likewise as ``(C, C)`` blocks of
``[B, H, N*C, C]``. The per-channel ``decay`` ``[B, H, N, Dk]`` is reshaped outside the
kernel to ``[B, H, N, Dk, 1]`` and read as a ``(Dk, 1)`` column (both block sides whole),
which scales the state's rows by broadcasting, with no in-kernel transpose of a vector.
MXU operands (``Q_in, W, P, A_out, K_out, V``, ``dO`` and the fp32 ``rem`` / ``drem`` /
state when multiplied) are in the compute dtype with fp32 accumulation (fp32 uses
``Precision.HIGHEST``); the additive terms ``U`` and ``O_v``, the decay and the state stay
fp32. Transposed operands (``X^T Y``) are transposed in-kernel before the dot, as in
:mod:`kernels.delta_rule.pallas_tpu`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32


def _dot(a, b, cdt, trans_a=False):
  """``a @ b`` (or ``a^T @ b``) with operands in ``cdt`` and fp32 accumulation."""
  a = a.astype(cdt)
  b = b.astype(cdt)
  if trans_a:
    a = a.T
  prec = lax.Precision.HIGHEST if cdt == F32 else None
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=prec,
                         preferred_element_type=F32)


def _fwd_kernel(q_ref, w_ref, u_ref, p_ref, ov_ref, a_ref, k_ref, v_ref, d_ref, s0_ref,
                o_ref, sf_ref, *rest, want_states, cdt):
  h_ref = rest[0] if want_states else None
  st_ref = rest[-1]
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _init():
    st_ref[...] = s0_ref[...].astype(F32)

  s = st_ref[...]
  if want_states:
    h_ref[...] = s
  rem = _dot(w_ref[...], s, cdt) + u_ref[...].astype(F32)  # removal values W S + U
  o = _dot(q_ref[...], s, cdt) + _dot(p_ref[...], rem, cdt) + ov_ref[...].astype(F32)
  o_ref[...] = o.astype(o_ref.dtype)
  s_new = (d_ref[...] * s + _dot(a_ref[...], rem, cdt, trans_a=True)
           + _dot(k_ref[...], v_ref[...], cdt, trans_a=True))
  st_ref[...] = s_new

  @pl.when(n == pl.num_programs(2) - 1)
  def _final():
    sf_ref[...] = s_new


def _bwd_kernel(q_ref, w_ref, p_ref, a_ref, d_ref, do_ref, dsf_ref, dh_ref, ds0_ref, st_ref,
                *, cdt):
  n = pl.program_id(2)  # step n handles chunk N - 1 - n

  @pl.when(n == 0)
  def _init():
    st_ref[...] = dsf_ref[...].astype(F32)

  ds = st_ref[...]  # cotangent of the state leaving this chunk
  dh_ref[...] = ds
  do = do_ref[...]
  drem = _dot(p_ref[...], do, cdt, trans_a=True) + _dot(a_ref[...], ds, cdt)
  ds_new = (d_ref[...] * ds + _dot(q_ref[...], do, cdt, trans_a=True)
            + _dot(w_ref[...], drem, cdt, trans_a=True))
  st_ref[...] = ds_new

  @pl.when(n == pl.num_programs(2) - 1)
  def _final():
    ds0_ref[...] = ds_new


def _chunk_of(N, rev):
  return (lambda n: N - 1 - n) if rev else (lambda n: n)


def _tok_spec(C, d, N, rev):
  """``(C, d)`` block of chunk ``c(n)`` in the ``[B, H, N*C, d]`` view."""
  c = _chunk_of(N, rev)
  return pl.BlockSpec((pl.squeezed, pl.squeezed, C, d), lambda bi, h, n: (bi, h, c(n), 0))


def _decay_spec(Dk, N, rev):
  """``(Dk, 1)`` column of chunk ``c(n)`` in ``[B, H, N, Dk, 1]``."""
  c = _chunk_of(N, rev)
  sq = pl.squeezed
  return pl.BlockSpec((sq, sq, sq, Dk, 1), lambda bi, h, n: (bi, h, c(n), 0, 0))


def _flat(x, dtype):
  B, H, N, C, d = x.shape
  return x.astype(dtype).reshape(B, H, N * C, d)


def _decay_col(decay):
  return decay.astype(F32)[..., None]  # [B, H, N, Dk, 1]


def forward(q_in, w, u, p, o_v, a_out, k_out, v, decay, s0, *, want_states=False,
            compute_dtype="float32", interpret=False):
  """Forward kernel on prepared chunk-major inputs (:data:`reference.PREPARED`).

  Args:
    q_in, w, a_out, k_out: ``[B, H, N, C, Dk]``; u, o_v, v: ``[B, H, N, C, Dv]``;
    p: ``[B, H, N, C, C]``; decay: ``[B, H, N, Dk]``; s0: ``[B, H, Dk, Dv]``.
    want_states: also return the state entering every chunk.
    compute_dtype: dtype (name) of the MXU operands.
    interpret: passed to ``pallas_call``.
  Returns:
    ``o [B, H, N, C, Dv]`` in the compute dtype, ``S_final [B, H, Dk, Dv]`` fp32 and, with
    ``want_states``, ``h [B, H, N, Dk, Dv]`` fp32 (the state entering every chunk).
  """
  B, H, N, C, Dk = q_in.shape
  Dv = v.shape[-1]
  cdt = jnp.dtype(compute_dtype)
  sq = pl.squeezed
  tk, tv = _tok_spec(C, Dk, N, False), _tok_spec(C, Dv, N, False)
  state_spec = pl.BlockSpec((sq, sq, Dk, Dv), lambda bi, h, n: (bi, h, 0, 0))
  in_specs = [tk, tk, tv, _tok_spec(C, C, N, False), tv, tk, tk, tv,
              _decay_spec(Dk, N, False), state_spec]
  args = [_flat(q_in, cdt), _flat(w, cdt), _flat(u, F32), _flat(p, cdt), _flat(o_v, F32),
          _flat(a_out, cdt), _flat(k_out, cdt), _flat(v, cdt), _decay_col(decay),
          s0.astype(F32)]
  out_shape = [jax.ShapeDtypeStruct((B, H, N * C, Dv), cdt),
               jax.ShapeDtypeStruct((B, H, Dk, Dv), F32)]
  out_specs = [tv, state_spec]
  if want_states:
    out_shape.append(jax.ShapeDtypeStruct((B, H, N, Dk, Dv), F32))
    out_specs.append(pl.BlockSpec((sq, sq, sq, Dk, Dv), lambda bi, h, n: (bi, h, n, 0, 0)))
  kernel = functools.partial(_fwd_kernel, want_states=want_states, cdt=cdt)
  o, *states = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(B, H, N),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      scratch_shapes=[pltpu.VMEM((Dk, Dv), F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="dplr_fwd",
  )(*args)
  return (o.reshape(B, H, N, C, Dv), *states)


def backward(q_in, w, p, a_out, decay, do, dsf, *, compute_dtype="float32", interpret=False):
  """State-cotangent kernel (chunks last to first).

  Args: ``q_in, w, p, a_out, decay`` as :func:`forward`; ``do`` ``[B, H, N, C, Dv]`` (the
  cotangent of ``o``); ``dsf`` ``[B, H, Dk, Dv]`` (the cotangent of the final state).
  Returns ``(dh, ds0)``: ``dh [B, H, N, Dk, Dv]`` fp32, the cotangent of the state leaving
  every chunk; ``ds0 [B, H, Dk, Dv]`` fp32, the cotangent of the initial state.
  """
  B, H, N, C, Dk = q_in.shape
  Dv = do.shape[-1]
  cdt = jnp.dtype(compute_dtype)
  sq = pl.squeezed
  tk = _tok_spec(C, Dk, N, True)
  state_spec = pl.BlockSpec((sq, sq, Dk, Dv), lambda bi, h, n: (bi, h, 0, 0))
  in_specs = [tk, tk, _tok_spec(C, C, N, True), tk, _decay_spec(Dk, N, True),
              _tok_spec(C, Dv, N, True), state_spec]
  args = [_flat(q_in, cdt), _flat(w, cdt), _flat(p, cdt), _flat(a_out, cdt),
          _decay_col(decay), _flat(do, cdt), dsf.astype(F32)]
  dh, ds0 = pl.pallas_call(
      functools.partial(_bwd_kernel, cdt=cdt),
      out_shape=(jax.ShapeDtypeStruct((B, H, N, Dk, Dv), F32),
                 jax.ShapeDtypeStruct((B, H, Dk, Dv), F32)),
      grid=(B, H, N),
      in_specs=in_specs,
      out_specs=(pl.BlockSpec((sq, sq, sq, Dk, Dv),
                              lambda bi, h, n: (bi, h, N - 1 - n, 0, 0)), state_spec),
      scratch_shapes=[pltpu.VMEM((Dk, Dv), F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="dplr_bwd",
  )(*args)
  return dh, ds0
