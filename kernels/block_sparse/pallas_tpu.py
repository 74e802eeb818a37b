"""Pallas Mosaic-TPU kernels for block-sparse flash attention (forward, dq, dk/dv).

The sparsity follows splash attention: the index lists are *scalar-prefetched* into SMEM
(``pltpu.PrefetchScalarGridSpec``) and read by the BlockSpec index maps, so each grid step
DMAs exactly the key/value block it needs.

  * forward: grid ``(B, H, nq, M)`` with ``M = max_blocks`` (the longest list); step
    ``(b, h, i, j)`` visits key block ``block_indices[b, h, i, j]``; the running max ``m``,
    sum ``l`` and the fp32 accumulator live in VMEM scratch across the sequential ``j``
    axis (FlashAttention, Dao et al. 2022). Steps with ``j >= count`` do no work, and since
    the wrapper pads every list with its last valid block, their index map returns the
    block already resident, so Pallas' pipeline issues no new copy.
  * dq: the same grid and lists, accumulating ``dq_i += scale * ds k`` with
    ``ds = p * (do v^T - delta)`` and ``p = exp(s - lse)`` recomputed from the saved
    log-sum-exp.
  * dk/dv: grid ``(B, H, nk, Mt)`` over the *transposed* lists (for key block j, the query
    blocks that visit it), accumulating ``dv_j += p^T do`` and ``dk_j += scale * ds^T q``
    per query head; the wrapper sums the heads of each GQA group.

Masks are applied inside every visited block from token positions: ``s <= t`` (causal) and
``t - s < window``; an invisible score never reaches an ``exp`` (see ``reference.py``).

Layout: q, k, v, o, do and the gradients are read as ``(bs, D)`` blocks of one head from the
free view ``[B, T, H*D]`` when D is a multiple of 128, else from a ``[B, H, T, D]``
transposed copy (Mosaic's (8, 128) block rule); lse and delta as ``(bs, 1)`` columns of
``[B, H, T, 1]``. MXU operands stay in the input dtype (bf16 stays bf16) with fp32
accumulation; fp32 inputs use ``Precision.HIGHEST``.

SMEM holds the flattened lists: ``4 * B * H * nq * M`` bytes for the forward and dq passes
(and ``4 * B * H * nk * Mt`` for dk/dv), e.g. 512 KiB for full causal lists at T = 32k,
block 128, H = 2; long dense-ish lists with many heads may need the batch or heads split
across calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.block_sparse.reference import MASK_VALUE

F32 = jnp.float32


def _dot(a, b, cdt, trans_a=False, trans_b=False):
  """``a @ b`` (optionally transposed operands) with fp32 accumulation; a transposed
  ``a`` is transposed before the cast (a 32-bit transpose, no packed-bf16 relayout)."""
  if trans_a:
    a = a.T
  a = a.astype(cdt)
  b = b.astype(cdt)
  prec = lax.Precision.HIGHEST if cdt == F32 else None
  return lax.dot_general(a, b, (((1,), (1,) if trans_b else (0,)), ((), ())),
                         precision=prec, preferred_element_type=F32)


def _mask(qi, kj, bs, causal, window):
  """Token mask of query block ``qi`` against key block ``kj`` (traced ints), or None."""
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
  """``p = exp(scale * q k^T - lse)`` with invisible entries exactly 0."""
  s = _dot(q, k, cdt, trans_b=True) * scale
  if mask is None:
    return jnp.exp(s - lse)
  return jnp.where(mask, jnp.exp(jnp.where(mask, s, MASK_VALUE) - lse), 0.0)


# ----------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------


def _fwd_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
                *, bs, H, nq, M, causal, window, scale, cdt):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = (b * H + h) * nq + i

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, F32)
    l_sc[...] = jnp.zeros(l_sc.shape, F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

  @pl.when(j < cnt_ref[row])
  def _step():
    kj = idx_ref[row * M + j]
    mask = _mask(i, kj, bs, causal, window)
    s = _dot(q_ref[...], k_ref[...], cdt, trans_b=True) * scale  # (bs, bs)
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m_prev - m_new)
    m_sc[...] = m_new
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = alpha * acc_sc[...] + _dot(p, v_ref[...], cdt)

  @pl.when(j == M - 1)
  def _final():
    l = l_sc[...]
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(l_safe), 0.0)


def _dq_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, acc_sc,
               *, bs, H, nq, M, causal, window, scale, cdt):
  b, h, i, j = (pl.program_id(a) for a in range(4))
  row = (b * H + h) * nq + i

  @pl.when(j == 0)
  def _init():
    acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

  @pl.when(j < cnt_ref[row])
  def _step():
    kj = idx_ref[row * M + j]
    k = k_ref[...]
    p = _probs(q_ref[...], k, lse_ref[...], _mask(i, kj, bs, causal, window), scale, cdt)
    dp = _dot(do_ref[...], v_ref[...], cdt, trans_b=True)
    ds = p * (dp - dl_ref[...]) * scale
    acc_sc[...] += _dot(ds, k, cdt)

  @pl.when(j == M - 1)
  def _final():
    dq_ref[...] = acc_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, cnt_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, bs, H, nk, M, causal, window, scale, cdt):
  b, h, kj, j = (pl.program_id(a) for a in range(4))
  row = (b * H + h) * nk + kj

  @pl.when(j == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

  @pl.when(j < cnt_ref[row])
  def _step():
    qi = idx_ref[row * M + j]
    q = q_ref[...]
    do = do_ref[...]
    p = _probs(q, k_ref[...], lse_ref[...], _mask(qi, kj, bs, causal, window), scale, cdt)
    dv_sc[...] += _dot(p, do, cdt, trans_a=True)
    dp = _dot(do, v_ref[...], cdt, trans_b=True)
    ds = p * (dp - dl_ref[...]) * scale
    dk_sc[...] += _dot(ds, q, cdt, trans_a=True)

  @pl.when(j == M - 1)
  def _final():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------
# Layout and calls.
# ----------------------------------------------------------------------------------


def _lane_dense(d):
  return d % 128 == 0


def _to_layout(x):
  B, T, h, d = x.shape
  return x.reshape(B, T, h * d) if _lane_dense(d) else jnp.transpose(x, (0, 2, 1, 3))


def _from_layout(x, h):
  if x.ndim == 3:
    B, T, hd = x.shape
    return x.reshape(B, T, h, hd // h)
  return jnp.transpose(x, (0, 2, 1, 3))


def _layout_shape(B, T, h, d):
  return (B, T, h * d) if _lane_dense(d) else (B, h, T, d)


def _tok_spec(bs, d, pick):
  """``(bs, d)`` block of one head; ``pick(grid ids, refs) -> (b, head, block)``."""
  sq = pl.squeezed
  if _lane_dense(d):
    def index(*a):
      b, hh, n = pick(*a)
      return b, n, hh
    return pl.BlockSpec((sq, bs, d), index)

  def index4(*a):
    b, hh, n = pick(*a)
    return b, hh, n, 0
  return pl.BlockSpec((sq, sq, bs, d), index4)


def _col_spec(bs, pick):
  def index(*a):
    b, hh, n = pick(*a)
    return b, hh, n, 0
  return pl.BlockSpec((pl.squeezed, pl.squeezed, bs, 1), index)


def _params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _picks(G, row_len, rows, M):
  """Index-map helpers for a grid ``(B, H, rows, M)`` whose lists are flattened in SMEM:
  ``own`` = the grid row's block (head h), ``other`` = the listed block (key/value head
  ``h // G`` if ``kv``)."""

  def own(b, h, n, j, idx_ref, cnt_ref):
    return b, h, n

  def listed(kv):
    def pick(b, h, n, j, idx_ref, cnt_ref):
      blk = idx_ref[((b * row_len + h) * rows + n) * M + j]
      return b, (lax.div(h, G) if kv else h), blk
    return pick

  def own_kv(b, h, n, j, idx_ref, cnt_ref):
    return b, lax.div(h, G), n

  return own, listed, own_kv


def forward(q, k, v, idx, cnt, *, bs, causal, window, scale, interpret=False):
  """``(o [B, T, H, D] in q's dtype, lse [B, H, T] fp32)``; ``idx [B, H, nq, M]`` and
  ``cnt [B, H, nq]`` normalised (padding repeats the last valid block)."""
  B, T, H, D = q.shape
  Hkv = k.shape[2]
  G = H // Hkv
  nq, M = idx.shape[2:]
  cdt = q.dtype
  own, listed, _ = _picks(G, H, nq, M)
  kernel = functools.partial(_fwd_kernel, bs=bs, H=H, nq=nq, M=M, causal=causal,
                             window=window, scale=scale, cdt=cdt)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2,
      grid=(B, H, nq, M),
      in_specs=[_tok_spec(bs, D, own), _tok_spec(bs, D, listed(True)),
                _tok_spec(bs, D, listed(True))],
      out_specs=[_tok_spec(bs, D, own), _col_spec(bs, own)],
      scratch_shapes=[pltpu.VMEM((bs, 1), F32), pltpu.VMEM((bs, 1), F32),
                      pltpu.VMEM((bs, D), F32)],
  )
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=(jax.ShapeDtypeStruct(_layout_shape(B, T, H, D), q.dtype),
                 jax.ShapeDtypeStruct((B, H, T, 1), F32)),
      compiler_params=_params(),
      interpret=interpret,
      name="block_sparse_fwd",
  )(idx.reshape(-1), cnt.reshape(-1), _to_layout(q), _to_layout(k.astype(cdt)),
    _to_layout(v.astype(cdt)))
  return _from_layout(o, H), lse[..., 0]


def backward(q, k, v, o, lse, do, idx, cnt, idx_t, cnt_t, *, bs, causal, window, scale,
             interpret=False):
  """``(dq [B, T, H, D], dk, dv [B, T, H, D] per query head)``, all fp32."""
  B, T, H, D = q.shape
  Hkv = k.shape[2]
  G = H // Hkv
  nq, M = idx.shape[2:]
  nk, Mt = idx_t.shape[2:]
  cdt = q.dtype
  delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)  # [B, T, H]
  delta = jnp.transpose(delta, (0, 2, 1))[..., None]  # [B, H, T, 1]
  lse = lse[..., None]
  qd, kd, vd, dod = (_to_layout(x.astype(cdt)) for x in (q, k, v, do))
  static = dict(bs=bs, H=H, causal=causal, window=window, scale=scale, cdt=cdt)

  # dq over the forward lists.
  own, listed, _ = _picks(G, H, nq, M)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, nq=nq, M=M, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, H, nq, M),
          in_specs=[_tok_spec(bs, D, own), _tok_spec(bs, D, listed(True)),
                    _tok_spec(bs, D, listed(True)), _tok_spec(bs, D, own),
                    _col_spec(bs, own), _col_spec(bs, own)],
          out_specs=_tok_spec(bs, D, own),
          scratch_shapes=[pltpu.VMEM((bs, D), F32)],
      ),
      out_shape=jax.ShapeDtypeStruct(_layout_shape(B, T, H, D), F32),
      compiler_params=_params(),
      interpret=interpret,
      name="block_sparse_dq",
  )(idx.reshape(-1), cnt.reshape(-1), qd, kd, vd, dod, lse, delta)

  # dk, dv (per query head) over the transposed lists.
  own_t, listed_t, own_kv = _picks(G, H, nk, Mt)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, nk=nk, M=Mt, **static),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(B, H, nk, Mt),
          in_specs=[_tok_spec(bs, D, listed_t(False)), _tok_spec(bs, D, own_kv),
                    _tok_spec(bs, D, own_kv), _tok_spec(bs, D, listed_t(False)),
                    _col_spec(bs, listed_t(False)), _col_spec(bs, listed_t(False))],
          out_specs=[_tok_spec(bs, D, own_t), _tok_spec(bs, D, own_t)],
          scratch_shapes=[pltpu.VMEM((bs, D), F32), pltpu.VMEM((bs, D), F32)],
      ),
      out_shape=(jax.ShapeDtypeStruct(_layout_shape(B, T, H, D), F32),) * 2,
      compiler_params=_params(),
      interpret=interpret,
      name="block_sparse_dkv",
  )(idx_t.reshape(-1), cnt_t.reshape(-1), qd, kd, vd, dod, lse, delta)
  return _from_layout(dq, H), _from_layout(dk, H), _from_layout(dv, H)
