"""Pallas Triton (GPU) kernels for the chunked (gated) delta rule.

As on TPU, the WY / UT preparation (``W = T diag(gamma) K``, ``U = T V``,
``T = (I + A)^{-1} diag(beta)``; Yang et al. 2024, "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length"; gated: Yang et al., "Gated Delta Networks") runs
before the kernel in XLA, in parallel over chunks
(:func:`kernels.delta_rule.reference.prepare_chunks`). GPU grid programs run in parallel,
so unlike the TPU kernel the chunk loop is *inside* the program: grid ``(B, H, Dv / BV)``,
and each program walks its sequence chunk by chunk with ``lax.fori_loop``, carrying its
fp32 ``[Dk, BV]`` slice of the state. Value columns are independent in every step
(``u = U - W S``, ``o``, ``S'`` and, backwards, ``du`` and ``dS`` act column-wise on the
value axis), so Dv is split across programs. Per chunk::

    u  = U - W S
    o  = (Q * exp(b)) S + [(Q K^T) * exp(b_i - b_j)]_{j<=i} u
    S' = exp(b_C) S + (K * exp(b_C - b))^T u

and the backward kernel runs the chunks last to first with the state cotangent::

    du = [scores]^T dO + (K * exp(b_C - b)) dS',   dS = exp(b_C) dS' + (Q * exp(b))^T dO - W^T du

``b_i - b_j`` and ``b_C - b_j`` are segment sums of exactly the log decays in between (an
fp32 ``tl.dot`` of a triangular ones matrix with the masked decays, and a suffix sum), not
differences of cumulative sums; every exponent is masked (causality, reset segments) to
``-inf`` before ``exp``.

Triton constraints respected here: every loaded or computed tile has power-of-two sides
(Dk and Dv are zero-padded to a power of two >= 16 by :func:`forward`; C is a power of two
>= 16), no value slicing (chunk rows are loaded from refs with ``pl.ds``), ``tl.dot``
operands at least 16 wide.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.common import pad_last, pow2, suffix_sum

F32 = jnp.float32
NEG_INF = float("-inf")


def _dot(a, b, cdt, trans_a=False, trans_b=False):
  a = a.astype(cdt)
  b = b.astype(cdt)
  ca = (0,) if trans_a else (1,)
  cb = (1,) if trans_b else (0,)
  prec = lax.Precision.HIGHEST if cdt == F32 else None
  return lax.dot_general(a, b, ((ca, cb), ((), ())), precision=prec,
                         preferred_element_type=F32)


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _chunk(q_ref, k_ref, w_ref, g_ref, b_ref, r_ref, seg_ref, n, C, cdt):
  """Load chunk ``n`` and build ``(scores, q_in, k_out, decay, w)``."""
  t0 = n * C
  q = q_ref[pl.ds(t0, C), :]
  k = k_ref[pl.ds(t0, C), :]
  w = w_ref[pl.ds(t0, C), :]
  gc = g_ref[pl.ds(t0, C)][:, None]
  e_in = b_ref[pl.ds(t0, C)][:, None]  # prefix sums b_i
  e_end = r_ref[pl.ds(t0, C)][:, None]  # suffix sums b_C - b_j (exact terms)
  rows, cols = _iota((C, C), 0), _iota((C, C), 1)
  mask = rows >= cols
  # Pair decays as segment sums sum_{j<m<=i} g_m (exact terms, not b_i - b_j).
  segsum = _dot(mask.astype(F32), jnp.where(rows > cols, gc, 0.0), F32)
  decay = jnp.exp(b_ref[t0 + C - 1]) * jnp.ones((1, 1), F32)
  if seg_ref is not None:
    svec = seg_ref[pl.ds(t0, C)]
    scol, srow = svec[:, None], svec[None, :]
    slast = seg_ref[t0 + C - 1]
    mask = mask & (scol == srow)
    e_in = jnp.where(scol == 0, e_in, NEG_INF)  # the entering state reaches token i
    e_end = jnp.where(scol == slast, e_end, NEG_INF)  # token j reaches the chunk end
    decay = jnp.where(slast == 0, decay, 0.0)  # no reset inside the chunk
  expo = jnp.where(rows == cols, 0.0, jnp.where(mask, segsum, NEG_INF))
  scores = _dot(q, k, cdt, trans_b=True) * jnp.exp(expo)
  q_in = q.astype(F32) * jnp.exp(e_in)
  k_out = k.astype(F32) * jnp.exp(e_end)
  return scores, q_in, k_out, decay, w


def _fwd_kernel(*refs, C, N, has_seg, want_states, cdt):
  it = iter(refs)
  q_ref, k_ref, w_ref, u_ref, g_ref, b_ref, r_ref = (next(it) for _ in range(7))
  seg_ref = next(it) if has_seg else None
  s0_ref = next(it)
  o_ref, sf_ref = next(it), next(it)
  h_ref = next(it) if want_states else None

  def body(n, s):
    if want_states:
      h_ref[n] = s
    scores, q_in, k_out, decay, w = _chunk(q_ref, k_ref, w_ref, g_ref, b_ref, r_ref, seg_ref, n,
                                                     C, cdt)
    t0 = n * C
    vn = u_ref[pl.ds(t0, C), :].astype(F32) - _dot(w, s, cdt)  # u = U - W S
    o = _dot(q_in, s, cdt) + _dot(scores, vn, cdt)
    o_ref[pl.ds(t0, C), :] = o.astype(o_ref.dtype)
    return decay * s + _dot(k_out, vn, cdt, trans_a=True)

  sf_ref[...] = lax.fori_loop(0, N, body, s0_ref[...].astype(F32))


def _bwd_kernel(*refs, C, N, has_seg, cdt):
  it = iter(refs)
  q_ref, k_ref, w_ref, do_ref, g_ref, b_ref, r_ref = (next(it) for _ in range(7))
  seg_ref = next(it) if has_seg else None
  dsf_ref = next(it)
  dh_ref, ds0_ref = next(it), next(it)

  def body(i, ds):  # ds: cotangent of the state leaving chunk n
    n = N - 1 - i
    dh_ref[n] = ds
    scores, q_in, k_out, decay, w = _chunk(q_ref, k_ref, w_ref, g_ref, b_ref, r_ref, seg_ref, n,
                                                     C, cdt)
    do = do_ref[pl.ds(n * C, C), :]
    dvn = _dot(scores, do, cdt, trans_a=True) + _dot(k_out, ds, cdt)
    return (decay * ds + _dot(q_in, do, cdt, trans_a=True)
            - _dot(w, dvn, cdt, trans_a=True))

  ds0_ref[...] = lax.fori_loop(0, N, body, dsf_ref[...].astype(F32))


def _layout(B, H, N, C, Dkp, BV, g, seg):
  sq = pl.squeezed
  Tp = N * C
  k_spec = pl.BlockSpec((sq, sq, Tp, Dkp), lambda bi, h, iv: (bi, h, 0, 0))
  v_spec = pl.BlockSpec((sq, sq, Tp, BV), lambda bi, h, iv: (bi, h, 0, iv))
  extra_specs = [pl.BlockSpec((sq, sq, Tp), lambda bi, h, iv: (bi, h, 0))] * 3
  g = g.astype(F32)  # log decays, within-chunk prefix sums, exclusive suffix sums
  extra = [x.reshape(B, H, Tp) for x in (g, jnp.cumsum(g, axis=-1), suffix_sum(g))]
  if seg is not None:
    extra_specs.append(pl.BlockSpec((sq, Tp), lambda bi, h, iv: (bi, 0)))
    extra.append(seg.astype(jnp.int32).reshape(B, Tp))
  state_spec = pl.BlockSpec((sq, sq, Dkp, BV), lambda bi, h, iv: (bi, h, 0, iv))
  states_spec = pl.BlockSpec((sq, sq, N, Dkp, BV), lambda bi, h, iv: (bi, h, 0, 0, iv))
  return k_spec, v_spec, extra_specs, extra, state_spec, states_spec


def _flat(x, d, cdt):
  B, H, N, C, _ = x.shape
  return pad_last(x.astype(cdt), d).reshape(B, H, N * C, d)


def _pad_state(s, dk, dv):
  return jnp.pad(s.astype(F32), ((0, 0), (0, 0), (0, dk - s.shape[2]), (0, dv - s.shape[3])))


def forward(q, k, w, u, g, seg, s0, *, want_states=False, compute_dtype=None,
            out_dtype=None, interpret=False, block_v=64, num_warps=4):
  """Forward kernel on chunk-major inputs (same contract as ``pallas_tpu.forward``)."""
  B, H, N, C, Dk = q.shape
  Dv = u.shape[-1]
  cdt = jnp.dtype(compute_dtype or q.dtype)
  out_dtype = out_dtype or cdt
  Dkp, Dvp = pow2(Dk), pow2(Dv)
  BV = min(Dvp, block_v)
  k_spec, v_spec, extra_specs, extra, state_spec, states_spec = _layout(
      B, H, N, C, Dkp, BV, g, seg)
  in_specs = [k_spec] * 3 + [v_spec] + extra_specs + [state_spec]
  args = ([_flat(x, Dkp, cdt) for x in (q, k, w)] + [_flat(u, Dvp, cdt)] + extra
          + [_pad_state(s0, Dkp, Dvp)])
  state_shape = jax.ShapeDtypeStruct((B, H, Dkp, Dvp), F32)
  out_shape = [jax.ShapeDtypeStruct((B, H, N * C, Dvp), out_dtype), state_shape]
  out_specs = [v_spec, state_spec]
  if want_states:
    out_shape.append(jax.ShapeDtypeStruct((B, H, N, Dkp, Dvp), F32))
    out_specs.append(states_spec)
  kernel = functools.partial(_fwd_kernel, C=C, N=N, has_seg=seg is not None,
                             want_states=want_states, cdt=cdt)
  o, sf, *hs = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(B, H, Dvp // BV),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="delta_rule_fwd",
  )(*args)
  o = o[..., :Dv].reshape(B, H, N, C, Dv)
  return (o, sf[:, :, :Dk, :Dv], *(x[..., :Dk, :Dv] for x in hs))


def backward(q, k, w, g, seg, do, dsf, *, compute_dtype=None, interpret=False, block_v=64,
             num_warps=4):
  """State-cotangent kernel (same contract as ``pallas_tpu.backward``)."""
  B, H, N, C, Dk = q.shape
  Dv = do.shape[-1]
  cdt = jnp.dtype(compute_dtype or q.dtype)
  Dkp, Dvp = pow2(Dk), pow2(Dv)
  BV = min(Dvp, block_v)
  k_spec, v_spec, extra_specs, extra, state_spec, states_spec = _layout(
      B, H, N, C, Dkp, BV, g, seg)
  in_specs = [k_spec] * 3 + [v_spec] + extra_specs + [state_spec]
  args = ([_flat(x, Dkp, cdt) for x in (q, k, w)] + [_flat(do, Dvp, cdt)] + extra
          + [_pad_state(dsf, Dkp, Dvp)])
  kernel = functools.partial(_bwd_kernel, C=C, N=N, has_seg=seg is not None, cdt=cdt)
  dh, ds0 = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, H, N, Dkp, Dvp), F32),
                 jax.ShapeDtypeStruct((B, H, Dkp, Dvp), F32)),
      grid=(B, H, Dvp // BV),
      in_specs=in_specs,
      out_specs=(states_spec, state_spec),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="delta_rule_bwd",
  )(*args)
  return dh[..., :Dk, :Dv], ds0[:, :, :Dk, :Dv]
