"""Context-parallel causal attention: all-gathered K / V for full attention, a halo of
``window - 1`` keys for sliding windows (the math: the package docstring)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from layers.context_parallel.primitives import AXIS, TIME, halo, sequence_mesh, shard_map

__all__ = ["attention"]


def attention(q, k, v, segment_ids, *, window: int | None, attend: Callable):
  """Causal attention split over the context mesh's ``sequence`` axis (which must exist:
  check :func:`sequence_mesh` first). q ``[B, T, H, Dh]`` and k, v ``[B, T, Hkv, Dh]`` with
  RoPE applied; segment_ids ``[B, T]`` or None; ``attend(q, k, v, mask)`` the dense
  masked attention of one block of queries (mask ``[B or 1, Lq, Lk]``) -> ``[B, Lq, H,
  Dh]``. Full attention all-gathers K / V; a window below ``T - L`` uses a halo and
  attends band by band (``attend`` is vmapped over query blocks)."""
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

