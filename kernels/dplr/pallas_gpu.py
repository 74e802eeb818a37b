"""Pallas Triton (GPU) kernels for the state part of the chunked DPLR recurrence.

The recurrence (:mod:`kernels.dplr`), per batch row and head, ``S_t``: ``[Dk, Dv]``::

    S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T,        o_t = S_t^T q_t

As on TPU (:mod:`kernels.dplr.pallas_tpu`), everything state-free (segment-sum decays, the
UT transform of the rank-one removals, intra-chunk outputs, reset masks) is prepared
before the kernel by XLA (:func:`kernels.dplr.prepare_all`), and the kernels compute
exactly :func:`reference.apply` chunk after chunk. Per chunk, with entering state ``S``::

    rem = W S + U                                   (removal values S^T b, [C, Dv])
    o   = Q_in S + P rem + O_v
    S'  = decay[:, None] * S + A_out^T rem + K_out^T V

and the backward kernel runs the chunks last to first with the state cotangent::

    drem = P^T dO + A_out dS',      dS = decay[:, None] * dS' + Q_in^T dO + W^T drem

writing ``dS'`` (the cotangent of the state leaving every chunk) and the initial state's
cotangent; the rest of the gradient is the VJP of :func:`reference.apply` at the saved
states, parallel over chunks, in XLA.

GPU grid programs run in parallel, so unlike the TPU kernel the chunk loop is *inside* the
program: grid ``(B, H, Dv / BV)``, each program walking its sequence chunk by chunk with
``lax.fori_loop`` and carrying its fp32 ``[Dk, BV]`` slice of the state. Value columns are
independent in every step -- ``rem``, ``o`` and ``S'`` (and backwards ``drem`` and ``dS``)
act column-wise on the value axis, and the decay scales whole key rows -- so Dv is split
across programs; the key-side operands (``Q_in, W, P, A_out, K_out``) are read whole by
every program.

Layout and Triton constraints: every loaded or computed tile has power-of-two sides (Dk
and Dv are zero-padded by :func:`forward` / :func:`backward` to a power of two >= 16, C is
a power of two >= 16; zero padding is inert: padded key rows have zero decay and zero
``A_out`` / ``K_out`` columns, padded value columns zero ``U, O_v, V`` and initial state),
no value slicing (chunk rows are loaded from refs with ``pl.ds`` in the ``[B, H, N*C, D]``
views), ``tl.dot`` operands at least 16 wide. ``decay`` ``[B, H, N, Dk]`` is flattened to
``[B, H, N*Dk]`` and loaded as a ``Dk`` vector per chunk, broadcast over the state's
columns as ``[:, None]``. MXU operands are in the compute dtype with fp32 accumulation
(fp32 at ``Precision.HIGHEST``); ``U``, ``O_v``, the decay and the state stay fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.common import pad_last, pow2

F32 = jnp.float32


def _dot(a, b, cdt, trans_a=False):
  """``a @ b`` (or ``a^T @ b``) with operands in ``cdt`` and fp32 accumulation."""
  a = a.astype(cdt)
  b = b.astype(cdt)
  ca = (0,) if trans_a else (1,)
  prec = lax.Precision.HIGHEST if cdt == F32 else None
  return lax.dot_general(a, b, ((ca, (0,)), ((), ())), precision=prec,
                         preferred_element_type=F32)


def _fwd_kernel(q_ref, w_ref, u_ref, p_ref, ov_ref, a_ref, k_ref, v_ref, d_ref, s0_ref,
                o_ref, sf_ref, *rest, C, N, Dk, want_states, cdt):
  h_ref = rest[0] if want_states else None

  def body(n, s):
    if want_states:
      h_ref[n] = s
    rows = pl.ds(n * C, C)
    rem = _dot(w_ref[rows, :], s, cdt) + u_ref[rows, :].astype(F32)  # W S + U
    o = (_dot(q_ref[rows, :], s, cdt) + _dot(p_ref[rows, :], rem, cdt)
         + ov_ref[rows, :].astype(F32))
    o_ref[rows, :] = o.astype(o_ref.dtype)
    decay = d_ref[pl.ds(n * Dk, Dk)][:, None]
    return (decay * s + _dot(a_ref[rows, :], rem, cdt, trans_a=True)
            + _dot(k_ref[rows, :], v_ref[rows, :], cdt, trans_a=True))

  sf_ref[...] = lax.fori_loop(0, N, body, s0_ref[...].astype(F32))


def _bwd_kernel(q_ref, w_ref, p_ref, a_ref, d_ref, do_ref, dsf_ref, dh_ref, ds0_ref, *, C, N,
                Dk, cdt):
  def body(i, ds):  # ds: cotangent of the state leaving chunk n
    n = N - 1 - i
    dh_ref[n] = ds
    rows = pl.ds(n * C, C)
    do = do_ref[rows, :]
    drem = _dot(p_ref[rows, :], do, cdt, trans_a=True) + _dot(a_ref[rows, :], ds, cdt)
    decay = d_ref[pl.ds(n * Dk, Dk)][:, None]
    return (decay * ds + _dot(q_ref[rows, :], do, cdt, trans_a=True)
            + _dot(w_ref[rows, :], drem, cdt, trans_a=True))

  ds0_ref[...] = lax.fori_loop(0, N, body, dsf_ref[...].astype(F32))


class _Layout:
  """Block specs of one grid ``(B, H, Dvp / BV)``: whole sequences per program, key-side
  arrays whole, value-side arrays and states in ``BV`` column blocks."""

  def __init__(self, N, C, Dkp, BV):
    sq = pl.squeezed
    Tp = N * C
    self.key = pl.BlockSpec((sq, sq, Tp, Dkp), lambda bi, h, iv: (bi, h, 0, 0))
    self.pair = pl.BlockSpec((sq, sq, Tp, C), lambda bi, h, iv: (bi, h, 0, 0))
    self.val = pl.BlockSpec((sq, sq, Tp, BV), lambda bi, h, iv: (bi, h, 0, iv))
    self.decay = pl.BlockSpec((sq, sq, N * Dkp), lambda bi, h, iv: (bi, h, 0))
    self.state = pl.BlockSpec((sq, sq, Dkp, BV), lambda bi, h, iv: (bi, h, 0, iv))
    self.states = pl.BlockSpec((sq, sq, N, Dkp, BV), lambda bi, h, iv: (bi, h, 0, 0, iv))


def _flat(x, d, dtype):
  B, H, N, C, _ = x.shape
  return pad_last(x.astype(dtype), d).reshape(B, H, N * C, d)


def _flat_decay(decay, dkp):
  B, H, N, _ = decay.shape
  return pad_last(decay.astype(F32), dkp).reshape(B, H, N * dkp)


def _pad_state(s, dk, dv):
  return jnp.pad(s.astype(F32), ((0, 0), (0, 0), (0, dk - s.shape[2]), (0, dv - s.shape[3])))


def forward(q_in, w, u, p, o_v, a_out, k_out, v, decay, s0, *, want_states=False,
            compute_dtype="float32", interpret=False, block_v=64, num_warps=4):
  """Forward kernel on prepared chunk-major inputs (same contract as
  ``pallas_tpu.forward``; C must be a power of two >= 16)."""
  B, H, N, C, Dk = q_in.shape
  Dv = v.shape[-1]
  cdt = jnp.dtype(compute_dtype)
  Dkp, Dvp = pow2(Dk), pow2(Dv)
  BV = min(Dvp, block_v)
  lay = _Layout(N, C, Dkp, BV)
  in_specs = [lay.key, lay.key, lay.val, lay.pair, lay.val, lay.key, lay.key, lay.val,
              lay.decay, lay.state]
  args = [_flat(q_in, Dkp, cdt), _flat(w, Dkp, cdt), _flat(u, Dvp, F32), _flat(p, C, cdt),
          _flat(o_v, Dvp, F32), _flat(a_out, Dkp, cdt), _flat(k_out, Dkp, cdt),
          _flat(v, Dvp, cdt), _flat_decay(decay, Dkp), _pad_state(s0, Dkp, Dvp)]
  out_shape = [jax.ShapeDtypeStruct((B, H, N * C, Dvp), cdt),
               jax.ShapeDtypeStruct((B, H, Dkp, Dvp), F32)]
  out_specs = [lay.val, lay.state]
  if want_states:
    out_shape.append(jax.ShapeDtypeStruct((B, H, N, Dkp, Dvp), F32))
    out_specs.append(lay.states)
  kernel = functools.partial(_fwd_kernel, C=C, N=N, Dk=Dkp, want_states=want_states,
                             cdt=cdt)
  o, sf, *hs = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(B, H, Dvp // BV),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="dplr_fwd",
  )(*args)
  o = o[..., :Dv].reshape(B, H, N, C, Dv)
  return (o, sf[:, :, :Dk, :Dv], *(x[..., :Dk, :Dv] for x in hs))


def backward(q_in, w, p, a_out, decay, do, dsf, *, compute_dtype="float32", interpret=False,
             block_v=64, num_warps=4):
  """State-cotangent kernel (same contract as ``pallas_tpu.backward``)."""
  B, H, N, C, Dk = q_in.shape
  Dv = do.shape[-1]
  cdt = jnp.dtype(compute_dtype)
  Dkp, Dvp = pow2(Dk), pow2(Dv)
  BV = min(Dvp, block_v)
  lay = _Layout(N, C, Dkp, BV)
  in_specs = [lay.key, lay.key, lay.pair, lay.key, lay.decay, lay.val, lay.state]
  args = [_flat(q_in, Dkp, cdt), _flat(w, Dkp, cdt), _flat(p, C, cdt), _flat(a_out, Dkp, cdt),
          _flat_decay(decay, Dkp), _flat(do, Dvp, cdt), _pad_state(dsf, Dkp, Dvp)]
  kernel = functools.partial(_bwd_kernel, C=C, N=N, Dk=Dkp, cdt=cdt)
  dh, ds0 = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, H, N, Dkp, Dvp), F32),
                 jax.ShapeDtypeStruct((B, H, Dkp, Dvp), F32)),
      grid=(B, H, Dvp // BV),
      in_specs=in_specs,
      out_specs=(lay.states, lay.state),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="dplr_bwd",
  )(*args)
  return dh[..., :Dk, :Dv], ds0[:, :, :Dk, :Dv]
