"""Pallas Triton (GPU) kernels for block-sparse flash attention (forward, dq, dk/dv).

GPU grid programs run in parallel, so unlike the TPU kernels the walk over a row's blocks is
*inside* the program: grid ``(B, H, nq)``, and program ``(b, h, i)`` loops
``for j < block_counts[b, h, i]`` (a loop with a data-dependent trip count, so slots past
the count cost nothing), loading key block ``block_indices[b, h, i, j]`` from the whole
key/value sequence of its head and carrying the running max, sum and fp32 accumulator in
registers (FlashAttention, Dao et al. 2022).

  * dq: the same grid and loop, ``dq_i += scale * ds k`` with ``ds = p * (do v^T - delta)``
    and ``p = exp(s - lse)`` recomputed from the saved log-sum-exp.
  * dk/dv: grid ``(B, H, nk)`` over the transposed lists (the query blocks that visit key
    block j), ``dv_j += p^T do``, ``dk_j += scale * ds^T q`` per query head; the wrapper
    sums the heads of each GQA group.

Masks are applied inside every visited block from token positions (``s <= t`` causal,
``t - s < window``); invisible scores never reach an ``exp`` (see ``reference.py``).
Triton constraints respected here: head dims are zero-padded to a power of two >= 16, the
block size is a power of two >= 16 (``tl.dot`` operands), list rows are padded to a power
of two, no value slicing (blocks are loaded from refs with ``pl.ds``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.common import pad_last, pow2
from kernels.block_sparse.reference import MASK_VALUE

F32 = jnp.float32


def _dot(a, b, cdt, trans_a=False, trans_b=False):
  a = a.astype(cdt)
  b = b.astype(cdt)
  ca = (0,) if trans_a else (1,)
  cb = (1,) if trans_b else (0,)
  prec = lax.Precision.HIGHEST if cdt == F32 else None
  return lax.dot_general(a, b, ((ca, cb), ((), ())), precision=prec,
                         preferred_element_type=F32)


def _mask(qi, kj, bs, causal, window):
  if not causal and window is None:
    return None
  q_pos = qi * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 0)
  k_pos = kj * bs + lax.broadcasted_iota(jnp.int32, (bs, bs), 1)
  m = None
  if causal:
    m = q_pos >= k_pos
  if window is not None:
    w = (q_pos - k_pos) < window
    m = w if m is None else m & w
  return m


def _probs(q, k, lse, mask, scale, cdt):
  """``p = exp(scale * q k^T - lse)`` (lse a ``(bs, 1)`` column), invisible entries 0."""
  s = _dot(q, k, cdt, trans_b=True) * scale
  if mask is None:
    return jnp.exp(s - lse)
  return jnp.where(mask, jnp.exp(jnp.where(mask, s, MASK_VALUE) - lse), 0.0)


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, bs, causal, window,
                scale, cdt):
  i = pl.program_id(2)
  q = q_ref[...]
  Dp = q.shape[-1]

  def body(j, carry):
    m, l, acc = carry
    kj = idx_ref[j]
    k = k_ref[pl.ds(kj * bs, bs), :]
    v = v_ref[pl.ds(kj * bs, bs), :]
    s = _dot(q, k, cdt, trans_b=True) * scale
    mask = _mask(i, kj, bs, causal, window)
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m - m_new)
    return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + _dot(p, v, cdt)

  init = (jnp.full((bs,), MASK_VALUE, F32), jnp.zeros((bs,), F32), jnp.zeros((bs, Dp), F32))
  m, l, acc = lax.fori_loop(0, cnt_ref[0], body, init)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), 0.0)


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *, bs,
               causal, window, scale, cdt):
  i = pl.program_id(2)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...][:, None]
  dl = dl_ref[...][:, None]

  def body(j, acc):
    kj = idx_ref[j]
    k = k_ref[pl.ds(kj * bs, bs), :]
    v = v_ref[pl.ds(kj * bs, bs), :]
    p = _probs(q, k, lse, _mask(i, kj, bs, causal, window), scale, cdt)
    ds = p * (_dot(do, v, cdt, trans_b=True) - dl) * scale
    return acc + _dot(ds, k, cdt)

  acc = lax.fori_loop(0, cnt_ref[0], body, jnp.zeros(q.shape, F32))
  dq_ref[...] = acc.astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref,
                *, bs, causal, window, scale, cdt):
  kj = pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]

  def body(t, carry):
    dk, dv = carry
    qi = idx_ref[t]
    q = q_ref[pl.ds(qi * bs, bs), :]
    do = do_ref[pl.ds(qi * bs, bs), :]
    lse = lse_ref[pl.ds(qi * bs, bs)][:, None]
    dl = dl_ref[pl.ds(qi * bs, bs)][:, None]
    p = _probs(q, k, lse, _mask(qi, kj, bs, causal, window), scale, cdt)
    dv = dv + _dot(p, do, cdt, trans_a=True)
    ds = p * (_dot(do, v, cdt, trans_b=True) - dl) * scale
    return dk + _dot(ds, q, cdt, trans_a=True), dv

  zeros = jnp.zeros(k.shape, F32)
  dk, dv = lax.fori_loop(0, cnt_ref[0], body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------
# Calls.
# ----------------------------------------------------------------------------------


def _pad_rows(idx):
  """Pad the list axis to a power of two (repeating the last entry; never read)."""
  M = idx.shape[-1]
  Mp = 1 << (M - 1).bit_length()
  if Mp == M:
    return idx
  return jnp.concatenate([idx, jnp.repeat(idx[..., -1:], Mp - M, axis=-1)], axis=-1)


def _list_specs(Mp):
  sq = pl.squeezed
  return [pl.BlockSpec((sq, sq, sq, Mp), lambda b, h, n: (b, h, n, 0)),
          pl.BlockSpec((sq, sq, 1), lambda b, h, n: (b, h, n))]


def _blk(bs, Dp, kv=False, G=1):
  """``(bs, Dp)`` block n of head h (or its key/value head) of ``[B, T, h, Dp]``."""
  sq = pl.squeezed
  if kv:
    return pl.BlockSpec((sq, bs, sq, Dp), lambda b, h, n: (b, n, lax.div(h, G), 0))
  return pl.BlockSpec((sq, bs, sq, Dp), lambda b, h, n: (b, n, h, 0))


def _seq(T, Dp, kv=False, G=1):
  """The whole sequence of head h (or its key/value head) of ``[B, T, h, Dp]``."""
  sq = pl.squeezed
  if kv:
    return pl.BlockSpec((sq, T, sq, Dp), lambda b, h, n: (b, 0, lax.div(h, G), 0))
  return pl.BlockSpec((sq, T, sq, Dp), lambda b, h, n: (b, 0, h, 0))


def _params(num_warps, bs, Dp):
  """4 warps for small tiles; 8 from a 128-row block or a 128-wide head (the fp32
  accumulators and the (bs, bs) scores would spill registers with 4)."""
  if num_warps is None:
    num_warps = 8 if max(bs, Dp) >= 128 else 4
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def forward(q, k, v, idx, cnt, *, bs, causal, window, scale, interpret=False, num_warps=None):
  """``(o [B, T, H, D] in q's dtype, lse [B, H, T] fp32)`` (same contract as
  ``pallas_tpu.forward``)."""
  B, T, H, D = q.shape
  G = H // k.shape[2]
  cdt = q.dtype
  Dp = pow2(D)
  qp, kp, vp = (pad_last(x.astype(cdt), Dp) for x in (q, k, v))
  idx = _pad_rows(idx)
  kernel = functools.partial(_fwd_kernel, bs=bs, causal=causal, window=window, scale=scale,
                             cdt=cdt)
  sq = pl.squeezed
  o, lse = pl.pallas_call(
      kernel,
      grid=(B, H, T // bs),
      in_specs=_list_specs(idx.shape[-1]) + [_blk(bs, Dp), _seq(T, Dp, True, G),
                                             _seq(T, Dp, True, G)],
      out_specs=[_blk(bs, Dp), pl.BlockSpec((sq, sq, bs), lambda b, h, n: (b, h, n))],
      out_shape=(jax.ShapeDtypeStruct((B, T, H, Dp), q.dtype),
                 jax.ShapeDtypeStruct((B, H, T), F32)),
      compiler_params=_params(num_warps, bs, Dp),
      interpret=interpret,
      name="block_sparse_fwd",
  )(idx, cnt, qp, kp, vp)
  return o[..., :D], lse


def backward(q, k, v, o, lse, do, idx, cnt, idx_t, cnt_t, *, bs, causal, window, scale,
             interpret=False, num_warps=None):
  """``(dq [B, T, H, D], dk, dv [B, T, H, D] per query head)``, all fp32."""
  B, T, H, D = q.shape
  G = H // k.shape[2]
  cdt = q.dtype
  Dp = pow2(D)
  delta = jnp.transpose(jnp.sum(do.astype(F32) * o.astype(F32), axis=-1), (0, 2, 1))
  qp, kp, vp, dop = (pad_last(x.astype(cdt), Dp) for x in (q, k, v, do))
  static = dict(bs=bs, causal=causal, window=window, scale=scale, cdt=cdt)
  sq = pl.squeezed
  row = pl.BlockSpec((sq, sq, bs), lambda b, h, n: (b, h, n))
  whole_row = pl.BlockSpec((sq, sq, T), lambda b, h, n: (b, h, 0))

  idx = _pad_rows(idx)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **static),
      grid=(B, H, T // bs),
      in_specs=_list_specs(idx.shape[-1]) + [_blk(bs, Dp), _seq(T, Dp, True, G),
                                             _seq(T, Dp, True, G), _blk(bs, Dp), row, row],
      out_specs=_blk(bs, Dp),
      out_shape=jax.ShapeDtypeStruct((B, T, H, Dp), F32),
      compiler_params=_params(num_warps, bs, Dp),
      interpret=interpret,
      name="block_sparse_dq",
  )(idx, cnt, qp, kp, vp, dop, lse, delta)

  idx_t = _pad_rows(idx_t)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **static),
      grid=(B, H, T // bs),
      in_specs=_list_specs(idx_t.shape[-1]) + [_seq(T, Dp), _blk(bs, Dp, True, G),
                                               _blk(bs, Dp, True, G), _seq(T, Dp),
                                               whole_row, whole_row],
      out_specs=[_blk(bs, Dp), _blk(bs, Dp)],
      out_shape=(jax.ShapeDtypeStruct((B, T, H, Dp), F32),) * 2,
      compiler_params=_params(num_warps, bs, Dp),
      interpret=interpret,
      name="block_sparse_dkv",
  )(idx_t, cnt_t, qp, kp, vp, dop, lse, delta)
  return dq[..., :D], dk[..., :D], dv[..., :D]
