"""Pure-jnp forms of block-sparse attention: the dense masked ground truth, the gathered
(XLA) form with its hand-written backward, and the index-list helpers.

The op, per batch row ``b`` and query head ``h`` (key/value head ``h // (H / Hkv)``)::

    o_t = sum_s p_ts v_s,    p_ts = softmax_s(scale * q_t . k_s)   over the visible keys s

Key s is visible to query t when the key block ``s // bs`` is one of the first
``block_counts[b, h, t // bs]`` entries of ``block_indices[b, h, t // bs]`` and, at token
level, ``s <= t`` (``causal``) and ``t - s < window`` (``window``). A query that sees no key
gets ``o_t = 0`` (not NaN) and contributes no gradient.

Index lists follow splash attention (Pallas TPU ``splash_attention``): one compact,
ascending list of key blocks per (batch row, head, query block); entries beyond the
row's count are padding. The helpers build them for the causal, sliding-window and
landmark top-k patterns.

Softmax bookkeeping: scores of invisible keys never enter an ``exp``; they are replaced by
``MASK_VALUE`` (a large negative *finite* number) for the running max and their
probabilities are set to exactly 0 with a ``where``, so an all-invisible row has max
``MASK_VALUE``, sum 0, output 0 and no ``inf - inf`` anywhere (forward or backward).
The log-sum-exp saved for the backward pass is 0 for such rows (any finite value works:
every probability of the row is masked to 0 again there).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_HI = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------
# Validation and list normalisation.
# ----------------------------------------------------------------------------------


def check_inputs(q, k, v, block_indices, block_counts, block_size, window):
  """Raise a ValueError naming the argument that is wrong; return ``(nq, max_blocks)``."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B,T,H,D]; got shape {q.shape}.")
  B, T, H, D = q.shape
  if k.ndim != 4 or k.shape[:2] != (B, T) or k.shape[3] != D:
    raise ValueError(f"k must be [B,T,Hkv,D] with B,T,D={(B, T, D)}; got {k.shape}.")
  if v.shape != k.shape:
    raise ValueError(f"v must have k's shape {k.shape}; got {v.shape}.")
  Hkv = k.shape[2]
  if Hkv < 1 or H % Hkv:
    raise ValueError(f"the number of query heads H={H} must be a multiple of the number "
                     f"of key/value heads Hkv={Hkv}.")
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int; got {block_size!r}.")
  if T % block_size:
    raise ValueError(f"the sequence length T={T} must be a multiple of block_size="
                     f"{block_size}: pad the inputs (and give padded query blocks 0 "
                     f"blocks) or pick a block size that divides T.")
  nq = T // block_size
  if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
    raise ValueError(f"window must be None or a positive int; got {window!r}.")
  if block_indices.ndim != 4 or block_indices.shape[2] != nq:
    raise ValueError(f"block_indices must be [B,H,nq,max_blocks] with nq=T/block_size="
                     f"{nq} (B and H may be 1 to broadcast); got {block_indices.shape}.")
  if block_counts.shape != block_indices.shape[:3]:
    raise ValueError(f"block_counts must be [B,H,nq]={block_indices.shape[:3]} (the "
                     f"leading shape of block_indices); got {block_counts.shape}.")
  for name, a in (("block_indices", block_indices), ("block_counts", block_counts)):
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array; got {a.dtype}.")
    if any(s not in (1, full) for s, full in zip(a.shape[:2], (B, H))):
      raise ValueError(f"{name} must have leading dims (B, H)={(B, H)} or 1 to "
                       f"broadcast; got {a.shape}.")
  if block_indices.shape[3] < 1:
    raise ValueError("block_indices needs max_blocks >= 1 (use one padded entry and "
                     "count 0 for rows that see nothing).")
  return nq, block_indices.shape[3]


def normalize_lists(block_indices, block_counts, B, H, nk):
  """Broadcast the lists to ``[B, H, nq, M]`` / ``[B, H, nq]`` int32, clamp counts to
  ``[0, M]`` and replace every padding entry by the row's last valid block (block 0 for an
  empty row), clipped to ``[0, nk)``: a kernel step past the count then maps to the block
  already loaded (no new DMA) and every entry is a legal block index."""
  nq, M = block_indices.shape[2:]
  idx = jnp.broadcast_to(block_indices.astype(jnp.int32), (B, H, nq, M))
  cnt = jnp.clip(jnp.broadcast_to(block_counts.astype(jnp.int32), (B, H, nq)), 0, M)
  slot = jnp.arange(M, dtype=jnp.int32)
  last = jnp.take_along_axis(idx, jnp.maximum(cnt - 1, 0)[..., None], axis=-1)
  last = jnp.where(cnt[..., None] > 0, last, 0)
  idx = jnp.where(slot < cnt[..., None], idx, last)
  return jnp.clip(idx, 0, nk - 1), cnt


def block_mask(idx, cnt, nk):
  """``[B, H, nq, nk]`` bool: key block j is listed (within the count) for query block i."""
  B, H, nq, M = idx.shape
  valid = (jnp.arange(M) < cnt[..., None]).astype(jnp.int8)
  grid = jnp.ix_(jnp.arange(B), jnp.arange(H), jnp.arange(nq), jnp.arange(M))
  bm = jnp.zeros((B, H, nq, nk), jnp.int8).at[grid[0], grid[1], grid[2], idx].max(valid)
  return bm > 0


def token_mask(q_pos, k_pos, causal, window):
  """Token-level visibility of key positions ``k_pos`` to query positions ``q_pos``
  (broadcasting), or None when there is no token-level mask."""
  m = None
  if causal:
    m = q_pos >= k_pos
  if window is not None:
    w = (q_pos - k_pos) < window
    m = w if m is None else m & w
  return m


def transpose_lists(idx, cnt, nk, max_visitors=None):
  """For every key block, the query blocks that visit it: ``(idx_t [B, H, nk, Mt],
  cnt_t [B, H, nk])`` in the same compact, ascending, last-valid-padded form (the lists
  of the dk/dv pass). ``Mt`` is ``max_visitors`` or ``nq`` (always enough)."""
  nq = idx.shape[2]
  bm = jnp.swapaxes(block_mask(idx, cnt, nk), -1, -2)  # [B,H,nk,nq]
  Mt = nq if max_visitors is None else max(1, min(int(max_visitors), nq))
  cnt_t = jnp.sum(bm, axis=-1, dtype=jnp.int32)
  order = jnp.argsort(jnp.logical_not(bm), axis=-1, stable=True)[..., :Mt]
  return normalize_lists(order.astype(jnp.int32), jnp.minimum(cnt_t, Mt), *bm.shape[:2], nq)


def concrete_bounds(block_indices, block_counts, B, H, nk):
  """``(longest list, longest transposed list)`` when the lists are concrete (not traced,
  e.g. from the helpers), else ``(None, None)``: lets the kernels' grids shrink to the
  rows that exist (the forward's ``max_blocks`` may be larger than any count)."""
  try:
    idx = np.asarray(block_indices)
    cnt = np.asarray(block_counts)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None, None
  nq, M = idx.shape[2:]
  idx = np.clip(np.broadcast_to(idx, (B, H, nq, M)), 0, nk - 1)
  cnt = np.clip(np.broadcast_to(cnt, (B, H, nq)), 0, M)
  valid = np.arange(M) < cnt[..., None]
  bm = np.zeros((B, H, nq, nk), bool)
  b_i, h_i, q_i, s_i = np.nonzero(valid)
  bm[b_i, h_i, q_i, idx[b_i, h_i, q_i, s_i]] = True
  return max(1, int(cnt.max())), max(1, int(bm.sum(axis=2).max()))


# ----------------------------------------------------------------------------------
# Ground truth: dense masked attention.
# ----------------------------------------------------------------------------------


def _repeat_kv(x, H):
  """``[B, T, Hkv, D]`` -> ``[B, T, H, D]`` (each key/value head serves H/Hkv query heads)."""
  return jnp.repeat(x, H // x.shape[2], axis=2)


def block_sparse_reference(q, k, v, block_indices, block_counts, *, block_size, causal=True,
                           scale=None, window=None):
  """Dense attention under the token mask built from the index lists (fp32 math, HIGHEST
  precision); differentiable by ordinary autodiff. ``o`` in q's dtype."""
  B, T, H, D = q.shape
  bs = block_size
  nk = T // bs
  scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
  idx, cnt = normalize_lists(block_indices, block_counts, B, H, nk)
  bm = block_mask(idx, cnt, nk)  # [B,H,nq,nk]
  tm = jnp.repeat(jnp.repeat(bm, bs, axis=2), bs, axis=3)  # [B,H,T,T]
  pos = jnp.arange(T)
  extra = token_mask(pos[:, None], pos[None, :], causal, window)
  if extra is not None:
    tm = tm & extra
  qf, kf, vf = q.astype(F32), _repeat_kv(k, H).astype(F32), _repeat_kv(v, H).astype(F32)
  s = jnp.einsum("bthd,bshd->bhts", qf, kf, precision=_HI) * scale
  s = jnp.where(tm, s, MASK_VALUE)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(tm, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l > 0, l, 1.0)
  o = jnp.einsum("bhts,bshd->bthd", p, vf, precision=_HI)
  return o.astype(q.dtype)


# ----------------------------------------------------------------------------------
# XLA form: gather the listed blocks, one softmax over them; backward from the saved lse.
# ----------------------------------------------------------------------------------


def _gather_index(idx, H, Hkv):
  """Advanced index into ``[B, Hkv, nk, ...]`` giving ``[B, H, nq, M, ...]``: the listed key
  blocks of each query block (query head h reads key/value head h // (H / Hkv))."""
  B = idx.shape[0]
  b_i = jnp.arange(B)[:, None, None, None]
  h_i = (jnp.arange(H) // (H // Hkv))[None, :, None, None]
  return b_i, h_i, idx


def _blocks(x, bs):
  """``[B, T, Hkv, D]`` -> ``[B, Hkv, nk, bs, D]``."""
  B, T, Hkv, D = x.shape
  return jnp.transpose(x.reshape(B, T // bs, bs, Hkv, D), (0, 3, 1, 2, 4))


def _gathered_mask(idx, cnt, bs, causal, window):
  """``[B, H, nq, bs, M, bs]`` visibility of gathered key tokens to query tokens."""
  nq, M = idx.shape[2:]
  valid = (jnp.arange(M) < cnt[..., None])[:, :, :, None, :, None]
  q_pos = (jnp.arange(nq)[:, None] * bs + jnp.arange(bs))[None, None, :, :, None, None]
  k_pos = (idx[..., None] * bs + jnp.arange(bs))[:, :, :, None, :, :]
  extra = token_mask(q_pos, k_pos, causal, window)
  return valid if extra is None else valid & extra


def _gathered_probs(q, k, idx, cnt, bs, causal, window, scale):
  """Scaled scores and mask over the gathered keys: ``s, mask [B, H, nq, bs, M, bs]``."""
  B, T, H, D = q.shape
  qb = jnp.transpose(q.reshape(B, T // bs, bs, H, D), (0, 3, 1, 2, 4))  # [B,H,nq,bs,D]
  gi = _gather_index(idx, H, k.shape[2])
  kg = _blocks(k, bs)[gi]  # [B,H,nq,M,bs,D]
  s = jnp.einsum("bhiad,bhimcd->bhiamc", qb.astype(F32), kg.astype(F32), precision=_HI)
  return s * scale, _gathered_mask(idx, cnt, bs, causal, window), qb, gi


def gathered_forward(q, k, v, idx, cnt, *, bs, causal, window, scale):
  """Returns ``(o [B, T, H, D] in q's dtype, lse [B, H, nq, bs] fp32)``; ``idx, cnt`` as
  from :func:`normalize_lists`. Memory O(B H T M bs)."""
  B, T, H, D = q.shape
  s, mask, _, gi = _gathered_probs(q, k, idx, cnt, bs, causal, window, scale)
  s = jnp.where(mask, s, MASK_VALUE)
  m = jnp.max(s, axis=(-2, -1), keepdims=True)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=(-2, -1), keepdims=True)
  l_safe = jnp.where(l > 0, l, 1.0)
  vg = _blocks(v, bs)[gi]
  o = jnp.einsum("bhiamc,bhimcd->bhiad", p / l_safe, vg.astype(F32), precision=_HI)
  lse = jnp.where(l > 0, m + jnp.log(l_safe), 0.0)[..., 0, 0]  # [B,H,nq,bs]
  o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(B, T, H, D)
  return o.astype(q.dtype), lse


def gathered_backward(q, k, v, o, lse, do, idx, cnt, *, bs, causal, window, scale):
  """``(dq, dk, dv)`` from the saved log-sum-exp (flash-attention backward): recompute
  ``p``, then ``ds = p * (do . v - delta)`` with ``delta = rowsum(do * o)``; dk and dv are
  scatter-added from the gathered blocks (summing over the query heads of a group)."""
  B, T, H, D = q.shape
  Hkv = k.shape[2]
  nk = T // bs
  s, mask, qb, gi = _gathered_probs(q, k, idx, cnt, bs, causal, window, scale)
  p = jnp.where(mask, jnp.exp(s - lse[..., None, None]), 0.0)  # [B,H,nq,bs,M,bs]
  to_blocks = lambda x: jnp.transpose(x.reshape(B, nk, bs, H, D), (0, 3, 1, 2, 4))
  dob = to_blocks(do.astype(F32))
  delta = jnp.sum(dob * to_blocks(o.astype(F32)), axis=-1)  # [B,H,nq,bs]
  kg = _blocks(k, bs)[gi].astype(F32)
  vg = _blocks(v, bs)[gi].astype(F32)
  dp = jnp.einsum("bhiad,bhimcd->bhiamc", dob, vg, precision=_HI)
  ds = p * (dp - delta[..., None, None]) * scale
  dqb = jnp.einsum("bhiamc,bhimcd->bhiad", ds, kg, precision=_HI)
  dkg = jnp.einsum("bhiamc,bhiad->bhimcd", ds, qb.astype(F32), precision=_HI)
  dvg = jnp.einsum("bhiamc,bhiad->bhimcd", p, dob, precision=_HI)
  zeros = jnp.zeros((B, Hkv, nk, bs, D), F32)
  dk = zeros.at[gi].add(dkg)
  dv = zeros.at[gi].add(dvg)
  from_blocks = lambda x, h: jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(B, T, h, D)
  return (from_blocks(dqb, H).astype(q.dtype), from_blocks(dk, Hkv).astype(k.dtype),
          from_blocks(dv, Hkv).astype(v.dtype))


# ----------------------------------------------------------------------------------
# Index-list helpers.
# ----------------------------------------------------------------------------------


def _pack(rows):
  """Python lists of key blocks per query block -> ``([1, 1, nq, M], [1, 1, nq])`` int32,
  padding repeating each row's last entry."""
  M = max(1, max(len(r) for r in rows))
  idx = np.zeros((len(rows), M), np.int32)
  cnt = np.zeros((len(rows),), np.int32)
  for i, r in enumerate(rows):
    cnt[i] = len(r)
    if r:
      idx[i, :len(r)] = r
      idx[i, len(r):] = r[-1]
  return jnp.asarray(idx[None, None]), jnp.asarray(cnt[None, None])


def _check_blocks(T, block_size):
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int; got {block_size!r}.")
  if not isinstance(T, (int, np.integer)) or T < 1 or T % block_size:
    raise ValueError(f"T={T!r} must be a positive multiple of block_size={block_size}.")
  return T // block_size


def causal_blocks(T, block_size):
  """Every key block up to and including the diagonal: ``(block_indices [1, 1, nq, nq],
  block_counts [1, 1, nq])`` (broadcast over batch and heads by the op). With
  ``causal=True`` this is plain causal attention."""
  nq = _check_blocks(T, block_size)
  return _pack([list(range(i + 1)) for i in range(nq)])


def sliding_window_blocks(T, block_size, window):
  """The key blocks that intersect the window ``0 <= t - s < window`` of any query t of
  the block: ``(block_indices [1, 1, nq, M], block_counts [1, 1, nq])`` with
  ``M = ceil((window - 1) / block_size) + 1`` at most. Pass the same ``window`` to the op
  for the exact token-level mask."""
  nq = _check_blocks(T, block_size)
  if not isinstance(window, (int, np.integer)) or window < 1:
    raise ValueError(f"window must be a positive int; got {window!r}.")
  bs = block_size
  return _pack([list(range(max(0, i * bs - window + 1) // bs, i + 1)) for i in range(nq)])


@functools.partial(jax.jit, static_argnames=("k", "block_size", "include_local"))
def topk_blocks(scores, k, block_size, *, include_local=True):
  """Landmark retrieval lists: for query block i, the ``k`` past key blocks (j < i) with
  the highest ``scores[b, h, i, j]`` (fewer when fewer exist), plus block i itself when
  ``include_local``, sorted ascending.

  Args:
    scores: ``[B, H, nq, nk]`` block scores (e.g. landmark logits); entries for j >= i are
      ignored.
    k: number of past blocks to retrieve (``>= 0``).
    block_size: the block size the lists are meant for (validated; the lists themselves
      are in blocks).
  Returns:
    ``(block_indices [B, H, nq, k + include_local], block_counts [B, H, nq])`` int32.
  """
  if scores.ndim != 4:
    raise ValueError(f"scores must be [B,H,nq,nk]; got {scores.shape}.")
  if not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f"k must be a non-negative int; got {k!r}.")
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int; got {block_size!r}.")
  B, H, nq, nk = scores.shape
  if nk < nq:
    raise ValueError(f"scores needs nk >= nq (one score per key block); got {scores.shape}.")
  rows = jnp.arange(nq)[:, None]
  cand = []
  if k > 0:
    kk = min(k, nk)
    past = jnp.arange(nk)[None, :] < rows  # [nq, nk]
    masked = jnp.where(past, scores.astype(F32), -jnp.inf)
    _, top = lax.top_k(masked, kk)  # [B,H,nq,kk], distinct
    ok = top < rows  # only past blocks count (ties at -inf may pick others)
    cand.append(jnp.where(ok, top, nk))
    if kk < k:
      cand.append(jnp.full((B, H, nq, k - kk), nk, jnp.int32))
  if include_local:
    cand.append(jnp.broadcast_to(rows.astype(jnp.int32)[None, None], (B, H, nq, 1)))
  if not cand:
    return (jnp.zeros((B, H, nq, 1), jnp.int32), jnp.zeros((B, H, nq), jnp.int32))
  lists = jnp.sort(jnp.concatenate([c.astype(jnp.int32) for c in cand], axis=-1), axis=-1)
  cnt = jnp.sum(lists < nk, axis=-1, dtype=jnp.int32)
  idx, cnt = normalize_lists(lists, cnt, B, H, nk)
  return idx, cnt
