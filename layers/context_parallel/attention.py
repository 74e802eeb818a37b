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
  Dh]``. Full attention all-gathers K / V; a window below ``T - L`` uses halos."""
  t = q.shape[1]
  mesh = sequence_mesh(t)
  if mesh is None:
    raise ValueError(f"context_parallel.attention needs a context mesh whose {AXIS!r} axis "
                     f"divides T={t}; check sequence_mesh(T) first")
  n = mesh.shape[AXIS]
  length = t // n
  use_halo = window is not None and window - 1 < t - length

  def body(ql, kl, vl, seg):
    r = jax.lax.axis_index(AXIS)
    q_pos = r * length + jnp.arange(length)
    if use_halo:
      width = window - 1
      keys = jnp.concatenate([halo(kl, width), kl], axis=1)
      vals = jnp.concatenate([halo(vl, width), vl], axis=1)
      k_pos = r * length - width + jnp.arange(width + length)
      kseg = None if seg is None else jnp.concatenate([halo(seg, width, fill=-1), seg], 1)
    else:
      keys = jax.lax.all_gather(kl, AXIS, axis=1, tiled=True)
      vals = jax.lax.all_gather(vl, AXIS, axis=1, tiled=True)
      k_pos = jnp.arange(t)
      kseg = None if seg is None else jax.lax.all_gather(seg, AXIS, axis=1, tiled=True)
    diff = q_pos[:, None] - k_pos[None, :]
    mask = (diff >= 0) & (k_pos[None, :] >= 0)
    if window is not None:
      mask = mask & (diff < window)
    mask = mask[None]
    if seg is not None:
      mask = mask & (seg[:, :, None] == kseg[:, None, :])
    return attend(ql, keys, vals, mask)

  seg_spec = None if segment_ids is None else TIME
  return shard_map(body, mesh, (TIME, TIME, TIME, seg_spec), TIME)(
      q, k, v, segment_ids)

