"""Context-parallel primitives: the context mesh, halos, the affine state hand-off.

Everything here runs either at trace time on global arrays (:func:`sequence_mesh`,
:func:`sequence_context`, :func:`with_history`) or inside a ``shard_map`` over the
``sequence`` axis (:func:`halo`, :func:`exclusive_affine_prefix`). The math is in the
package docstring (``layers/context_parallel/__init__.py``) and docs/context-parallel.md.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "sequence"
TIME = P(None, AXIS)  # [B, T, ...] split on T
# The mesh axes that split the batch (lcm.sharding's logical "batch" rule reads this).
BATCH_AXES = ("data", "fsdp")
HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["AXIS", "TIME", "BATCH_AXES", "HIGHEST", "sequence_mesh", "sequence_context",
           "shard_map", "batch_axes",
           "varying", "halo", "exclusive_affine_prefix", "with_history"]


def sequence_mesh(length: int | None = None):
  """The context's abstract mesh when it splits sequences: it has a ``sequence`` axis of
  more than one device that is not already manual (inside a ``shard_map`` over it), and
  that divides ``length`` when given. Else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or AXIS not in mesh.axis_names:
    return None
  n = mesh.shape[AXIS]
  if n == 1 or AXIS in mesh.manual_axes:
    return None
  if length is not None and length % n:
    return None
  return mesh


def sequence_context(mesh):
  """Context manager that makes ``mesh`` (a ``jax.sharding.Mesh``) the context mesh the
  mixers read; enter it inside the traced function (the jit cache then needs no key)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def shard_map(fn, mesh, in_specs, out_specs, check_vma=True, all_axes=False):
  """``jax.shard_map`` manual over the ``sequence`` axis only (the other mesh axes stay
  automatic), or over every mesh axis with ``all_axes`` (where the body calls a Pallas
  kernel: Mosaic calls cannot be partitioned automatically, so no axis may stay auto)."""
  names = frozenset(mesh.axis_names) if all_axes else frozenset({AXIS})
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names=names, check_vma=check_vma)


def batch_axes(mesh, batch: int):
  """The mesh axes of :data:`BATCH_AXES` (those of more than one device) that split a batch
  of ``batch`` rows, as a PartitionSpec entry (None: the batch is not split)."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  return axes if axes and batch % size == 0 else None


# ----------------------------------------------------------------------------------
# Primitives: called inside a shard_map over ``axis_name``.
# ----------------------------------------------------------------------------------


def varying(x: jax.Array, axis_name: str) -> jax.Array:
  """x typed as varying over ``axis_name`` (what collectives and scan carries ask for)."""
  if axis_name in jax.typeof(x).manual_axis_type.varying:
    return x
  return jax.lax.pcast(x, axis_name, to="varying")


def halo(x: jax.Array, width: int, axis_name: str = AXIS, *, axis: int = 1,
         fill=0) -> jax.Array:
  """The last ``width`` entries along ``axis`` before this shard's first one: taken from
  the previous shards in order (``ceil(width / L)`` ``ppermute`` hops for a shard of L
  entries), ``fill`` for positions before the start of the sequence (all of shard 0's)."""
  length = x.shape[axis]
  shape = list(x.shape)
  shape[axis] = width
  if width == 0:
    return jnp.zeros(shape, x.dtype)
  n = jax.lax.axis_size(axis_name)
  r = jax.lax.axis_index(axis_name)
  hops = min(-(-width // length), n - 1)
  parts = []
  if width > hops * length:  # reaches before any shard: only fill
    shape[axis] = width - hops * length
    parts.append(jnp.full(shape, fill, x.dtype))
  for h in range(hops, 0, -1):
    got = jax.lax.ppermute(x, axis_name, [(i, i + h) for i in range(n - h)])
    parts.append(jnp.where(r >= h, got, jnp.asarray(fill, x.dtype)))
  cat = jnp.concatenate(parts, axis=axis)
  return jax.lax.slice_in_dim(cat, cat.shape[axis] - width, cat.shape[axis], axis=axis)


def exclusive_affine_prefix(a: jax.Array, b: jax.Array, axis_name: str = AXIS, *,
                            dense: bool = False, initial: jax.Array | None = None):
  """Incoming state of this shard and the state after all shards, for the per-shard
  transitions ``S -> A_r S + B_r`` (``S_0 = initial`` or zeros before shard 0).

  Args:
    a: this shard's ``A``. ``dense=False``: the natural log of a diagonal ``A`` acting on
      the leading axes of ``b`` (e.g. ``[B, H]`` per head or ``[B, H, Dk]`` per key
      channel for ``b`` ``[B, H, Dk, Dv]``; trailing axes broadcast); ``-inf`` zeroes the
      state (a reset inside the shard). ``dense=True``: a matrix ``[..., Dk, Dk]`` applied
      as ``A @ S``.
    b: this shard's ``B`` (its final state from a zero initial state).
    initial: ``S_0``, the same shape as ``b``, equal on every shard (or None).

  Returns:
    ``(S_in, S_total)``: ``S_in`` this shard's incoming state (varies over the axis),
    ``S_total`` the state after the last shard (the same on every shard). float32, or
    complex64 when ``a`` or ``b`` is complex (S4D's modes).
  """
  f32 = (jnp.complex64 if jnp.iscomplexobj(a) or jnp.iscomplexobj(b) else jnp.float32)
  b = b.astype(f32)
  n = jax.lax.axis_size(axis_name)
  r = jax.lax.axis_index(axis_name)
  a_all = jax.lax.all_gather(varying(a.astype(f32), axis_name), axis_name)  # [n, ...]
  b_all = jax.lax.all_gather(varying(b, axis_name), axis_name)  # [n, ...]
  s0 = jnp.zeros_like(b) if initial is None else initial.astype(f32)
  if dense:
    states = []
    s = s0
    for j in range(n):  # states[j] = state entering shard j
      states.append(s)
      s = jnp.einsum("...ij,...jk->...ik", a_all[j], s, precision=HIGHEST) + b_all[j]
    s_in = jnp.take(jnp.stack(states), r, axis=0)
    return s_in, s
  extra = (None,) * (b.ndim - a.ndim)
  idx = jnp.arange(n)

  def weights(lo, hi):
    """exp(sum_{lo < m < hi} log A_m) for each j (lo = j), zero unless lo < hi."""
    inside = (idx[None, :] > lo[:, None]) & (idx[None, :] < hi)  # [n_j, n_m]
    inside = inside.reshape(inside.shape + (1,) * a.ndim)
    seg = jnp.sum(jnp.where(inside, a_all[None], 0.0), axis=1)  # [n_j, ...]
    valid = (lo < hi).reshape((n,) + (1,) * a.ndim)
    return jnp.where(valid, jnp.exp(jnp.where(valid, seg, 0.0)), 0.0)[(Ellipsis,) + extra]

  w_in = weights(idx, r)  # shards j < r, decayed through j+1 .. r-1
  w_tot = weights(idx, n)
  # S_0 enters as a shard "j = -1": decayed through shards 0 .. r-1.
  w0_in = weights(jnp.full((n,), -1), r)[0]
  w0_tot = weights(jnp.full((n,), -1), n)[0]
  s_in = jnp.sum(w_in * b_all, axis=0) + w0_in * s0
  s_tot = jnp.sum(w_tot * b_all, axis=0) + w0_tot * s0
  return s_in, s_tot



def with_history(fn: Callable, x: jax.Array, segment_ids: jax.Array | None, width: int,
                 *consts):
  """``fn(xp, sp, segment_ids, *consts) -> [B, T, ...]`` where ``xp`` is x ``[B, T, ...]``
  with the ``width`` previous tokens prepended (zeros before the sequence start) and
  ``sp`` the same for the segment ids (-1 before the start; None without segment ids).
  With a sequence mesh, each shard gets the previous tokens as a :func:`halo` and ``fn``
  runs per shard (``consts``, e.g. convolution taps, replicated)."""
  pad_x = lambda a: jnp.pad(a, ((0, 0), (width, 0)) + ((0, 0),) * (a.ndim - 2))
  mesh = sequence_mesh(x.shape[1])
  if mesh is None:
    sp = (None if segment_ids is None else
          jnp.pad(segment_ids, ((0, 0), (width, 0)), constant_values=-1))
    return fn(pad_x(x), sp, segment_ids, *consts)

  def body(xl, seg, *cs):
    xp = jnp.concatenate([halo(xl, width), xl], axis=1)
    sp = None if seg is None else jnp.concatenate([halo(seg, width, fill=-1), seg], axis=1)
    return fn(xp, sp, seg, *cs)

  seg_spec = None if segment_ids is None else TIME
  return shard_map(body, mesh, (TIME, seg_spec) + (P(),) * len(consts), TIME)(
      x, segment_ids, *consts)

