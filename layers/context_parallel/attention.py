"""Context-parallel causal attention: all-gathered K / V for full attention, a halo of
``window - 1`` keys for sliding windows, and :func:`gathered_rows` for attention whose
rows need more than a masked softmax (landmark attention's grouped softmax and top-k
retrieval). The math: the package docstring."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from layers.context_parallel.primitives import (AXIS, TIME, halo, sequence_mesh, shard_map,
                                                varying)

__all__ = ["attention", "gathered_rows"]


def attention(q, k, v, segment_ids, *, window: int | None, attend: Callable,
              scale: float | None = None, dtype=None):
  """Causal attention split over the context mesh's ``sequence`` axis (which must exist:
  check :func:`sequence_mesh` first). q ``[B, T, H, Dh]`` and k, v ``[B, T, Hkv, Dh]`` with
  RoPE applied; segment_ids ``[B, T]`` or None; ``attend(q, k, v, mask)`` the dense
  masked attention of one block of queries (mask ``[B or 1, Lq, Lk]``) -> ``[B, Lq, H,
  Dh]``. A window below ``T - L`` uses a halo and attends band by band (``attend`` is
  vmapped over query blocks). Otherwise, with ``scale`` (plain softmax attention with
  scores ``scale * q.k``, probabilities cast to ``dtype`` before the values), ring
  attention (:func:`_ring`); without it (``attend`` is more than a softmax: MAG / MAL's
  persistent tokens) K / V are all-gathered."""
  t = q.shape[1]
  mesh = sequence_mesh(t)
  if mesh is None:
    raise ValueError(f"context_parallel.attention needs a context mesh whose {AXIS!r} axis "
                     f"divides T={t}; check sequence_mesh(T) first")
  n = mesh.shape[AXIS]
  length = t // n
  use_halo = window is not None and window - 1 < t - length
  # Query band of the windowed form: the largest divisor of L up to max(window, 128).
  band = max(c for c in range(1, min(length, max(window or 1, 128)) + 1) if length % c == 0)

  def masked(q_pos, k_pos, seg, kseg):
    diff = q_pos[:, None] - k_pos[None, :]
    mask = (diff >= 0) & (k_pos[None, :] >= 0)
    if window is not None:
      mask = mask & (diff < window)
    mask = mask[None]
    if seg is not None:
      mask = mask & (seg[:, :, None] == kseg[:, None, :])
    return mask

  def body(ql, kl, vl, seg):
    r = jax.lax.axis_index(AXIS)
    q_pos = r * length + jnp.arange(length)
    if not use_halo and scale is not None:
      return _ring(ql, kl, vl, seg, window=window, scale=scale, dtype=dtype or ql.dtype)
    if not use_halo:
      keys = jax.lax.all_gather(kl, AXIS, axis=1, tiled=True)
      vals = jax.lax.all_gather(vl, AXIS, axis=1, tiled=True)
      kseg = None if seg is None else jax.lax.all_gather(seg, AXIS, axis=1, tiled=True)
      return attend(ql, keys, vals, masked(q_pos, jnp.arange(t), seg, kseg))
    # Sliding window: the shard's keys extended by a halo of window - 1, attended band by
    # band (query blocks of c tokens against their c + window - 1 keys), so the scores are
    # O(L * window), not O(L^2).
    width = window - 1
    ext = lambda x, fill=0: jnp.concatenate([halo(x, width, fill=fill), x], axis=1)
    keys, vals = ext(kl), ext(vl)
    kseg = None if seg is None else ext(seg, -1)
    nb = length // band
    k_idx = (jnp.arange(nb)[:, None] * band + jnp.arange(band + width)[None, :])  # [nb, Kb]
    k_pos = r * length - width + k_idx
    qb = lambda x: x.reshape((x.shape[0], nb, band) + x.shape[2:])

    def one(qj, kj, vj, qpos_j, kpos_j, seg_j, kseg_j):
      return attend(qj, kj, vj, masked(qpos_j, kpos_j, seg_j, kseg_j))
    out = jax.vmap(one, in_axes=(1, 1, 1, 0, 0, None if seg is None else 1,
                                 None if seg is None else 1), out_axes=1)(
        qb(ql), keys[:, k_idx], vals[:, k_idx], q_pos.reshape(nb, band), k_pos,
        None if seg is None else qb(seg), None if seg is None else kseg[:, k_idx])
    return out.reshape((out.shape[0], length) + out.shape[3:])

  seg_spec = None if segment_ids is None else TIME
  return shard_map(body, mesh, (TIME, TIME, TIME, seg_spec), TIME)(
      q, k, v, segment_ids)



def _ring(ql, kl, vl, seg, *, window, scale, dtype):
  """Ring attention for this shard's queries (inside the shard_map over ``sequence``).

  n rounds: in round i this shard holds the K / V (and segment ids) of shard
  ``j = (r - i) mod n`` and passes them on to ``r + 1`` (``ppermute``); blocks in the
  causal future (``j > r``) are skipped (a ``lax.cond``). The softmax is accumulated
  online in fp32 (running max ``m``, normaliser ``l``, unnormalised output ``o``):

      m' = max(m, max_k s),  l' = l e^{m - m'} + sum_k e^{s - m'},
      o' = o e^{m - m'} + sum_k e^{s - m'} v_k,      y = o / l at the end.

  Each round is rematerialised (``jax.checkpoint``), so the backward keeps the round's
  K / V block and the small carries, never an ``[L, T]`` score block: per-device memory
  is O(T / n) for scores and O(T) for the received blocks, where the all-gather held
  ``[L, T]`` scores. GQA: q ``[B, L, H, Dh]`` against ``Hkv`` key heads."""
  n = jax.lax.axis_size(AXIS)
  r = jax.lax.axis_index(AXIS)
  b, length, h, dh = ql.shape
  hkv = kl.shape[2]
  g = h // hkv
  qg = ql.reshape(b, length, hkv, g, dh)
  q_pos = r * length + jnp.arange(length)
  shift = [(i, (i + 1) % n) for i in range(n)]
  neg = jnp.float32(-1e30)

  @jax.checkpoint
  def update(carry, blk):
    o, m, l = carry
    kb, vb, sb, j = blk
    k_pos = j * length + jnp.arange(length)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, kb.astype(qg.dtype),
                   preferred_element_type=jnp.float32) * scale
    diff = q_pos[:, None] - k_pos[None, :]
    mask = (diff >= 0)[None]
    if window is not None:
      mask = mask & (diff < window)[None]
    if sb is not None:
      mask = mask & (seg[:, :, None] == sb[:, None, :])
    mask = mask[:, None, None]  # [B or 1, 1, 1, L, L]
    s = jnp.where(mask, s, neg)
    # The output does not depend on the running max (it cancels): no gradient through it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = l * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(dtype), vb.astype(dtype),
                    preferred_element_type=jnp.float32)
    return o * alpha[..., None] + pv, m_new, l_new

  def round_(i, carry):
    o, m, l, kb, vb, sb = carry
    j = (r - i) % n
    o, m, l = jax.lax.cond(j <= r, lambda c: update(c, (kb, vb, sb, j)), lambda c: c,
                           (o, m, l))
    kb, vb = (jax.lax.ppermute(a, AXIS, shift) for a in (kb, vb))
    sb = None if sb is None else jax.lax.ppermute(sb, AXIS, shift)
    return o, m, l, kb, vb, sb

  o0 = varying(jnp.zeros((b, hkv, g, length, dh), jnp.float32), AXIS)
  m0 = varying(jnp.full((b, hkv, g, length), neg), AXIS)
  l0 = varying(jnp.zeros((b, hkv, g, length), jnp.float32), AXIS)
  o, _, l, *_ = jax.lax.fori_loop(0, n, round_, (o0, m0, l0, kl, vl, seg))
  y = o / jnp.maximum(l, 1e-30)[..., None]  # every query sees itself: l >= 1
  return jnp.moveaxis(y, 3, 1).reshape(b, length, h, dh).astype(dtype)


def gathered_rows(rows: Callable, q, keys, segment_ids):
  """This shard's rows of an attention-like map that needs every key of the row, split over
  the context mesh's ``sequence`` axis (which must divide T: check :func:`sequence_mesh`).

  ``rows(q_local, start, keys, segment_ids) -> [B, L, ...]`` computes output rows
  ``start .. start + L`` from their queries ``q_local`` ``[B, L, ...]`` and the whole
  row's ``keys`` (a tuple of ``[B, T, ...]`` arrays, e.g. un-rotated K and V) and
  ``segment_ids`` ``[B, T]`` (or None); ``start`` is a traced scalar. Each shard
  all-gathers the keys and segment ids over ``sequence`` (their gradients are reduce-
  scattered back), so memory is O(T) per device for the keys plus whatever ``rows`` holds
  for L queries: O(L T) scores for a dense map, against O(T^2) unsplit.
  """
  t = q.shape[1]
  mesh = sequence_mesh(t)
  if mesh is None:
    raise ValueError(f"context_parallel.gathered_rows needs a context mesh whose {AXIS!r} "
                     f"axis divides T={t}; check sequence_mesh(T) first")
  length = t // mesh.shape[AXIS]
  gather = lambda a: jax.lax.all_gather(a, AXIS, axis=1, tiled=True)

  def body(ql, kl, seg):
    start = jax.lax.axis_index(AXIS) * length
    return rows(ql, start, tuple(gather(a) for a in kl), None if seg is None else gather(seg))

  seg_spec = None if segment_ids is None else TIME
  key_specs = tuple(TIME for _ in keys)
  return shard_map(body, mesh, (TIME, key_specs, seg_spec), TIME)(q, tuple(keys), segment_ids)
