"""Context (sequence) parallelism: one long sequence split over the ``sequence`` mesh axis.

With a mesh whose ``sequence`` axis has n > 1 devices, token ``t`` of a length-T row lives
on shard ``r = t // L`` (``L = T / n``). Per-token work (projections, norms, MLPs) needs no
communication; what crosses shard boundaries is what a mixer carries along time, and this
module supplies it:

* **Halo** (:func:`halo`): the last ``w`` tokens of the previous shards, by ``ppermute``
  (``ceil(w / L)`` hops; ``fill`` before the sequence start). Short causal convolutions
  need ``w = K - 1`` (:func:`with_history`), sliding-window attention ``w = window - 1``.

* **Affine state hand-off** (:func:`exclusive_affine_prefix`). A recurrence over a shard
  maps its incoming state to its outgoing one by ``S -> A_r S + B_r``. All shards
  all-gather the small ``(A_j, B_j)`` and each forms its incoming state

      S_in(r) = sum_{j<r} (prod_{j<m<r} A_m) B_j + (prod_{m<r} A_m) S_0

  For a diagonal ``A`` (a decay per head or per key channel) the products are taken in log
  space: ``log prod_{j<m<r} A_m`` is the sum of exactly the ``log A_m`` in between, masked
  before ``exp`` (``-inf`` = a reset inside the shard). A dense ``A`` (``[Dk, Dk]``, the
  delta-rule family) is composed in shard order, n small matmuls. Cost: each device
  receives ``n - 1`` states (``n`` state-sized buffers in memory), independent of T.

* **Linear recurrence** (:func:`linear_recurrence`, a drop-in for
  ``kernels.chunked_scan.linear_recurrence``: ``S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T``,
  ``o_t = S_t^T q_t``). Each shard (1) runs the kernel from a zero state: outputs ``o^loc``
  and final state ``B_r``; (2) ``A_r = exp(sum of the shard's log decays)``, 0 when a
  document starts inside the shard; (3) the prefix gives ``S_in(r)``; (4) adds S_in's
  contribution to the outputs,

      o_t += S_in^T (q_t * exp(c_t)),   c_t = sum_{s <= t in the shard} g_s,

  for the tokens before the shard's first document start (zero from there on). The
  correction costs one ``[L, Dk] x [Dk, Dv]`` matmul per head and shard, i.e. one chunk's
  state contribution, instead of a second pass of the kernel from ``S_in`` (2x the scan).
  A document that starts exactly on a shard boundary has ``reset`` at the shard's first
  token, so ``A_r = 0`` and the correction is zero: nothing leaks. The full sequence's
  final state is the inclusive prefix over all shards, computed on every shard from the
  gathered values (``initial_state`` enters as ``S_0``), so chunked prefill works too.
  With bf16 inputs the kernel's bf16 ``o^loc`` is rounded once before the fp32 correction
  is added (at most one extra bf16 rounding). This shard_map runs with ``check_vma=False``:
  the Pallas kernels declare no varying-axes type on their outputs (``check_vma=True``
  rejects them); its one replicated input, ``initial_state``, still gets its gradient
  summed over the shards by the transpose (tested with the TPU kernel interpreted).

* **Attention** (:func:`attention`). Full causal attention all-gathers K and V (and the
  segment ids) over ``sequence``: each device holds ``[B, T, Hkv, Dh]`` K and V and a
  ``[B, H, L, T]`` score block, so memory is O(T) per device for K/V and O(L T) for the
  scores; ring attention (K/V blocks passed around with an online softmax, O(L) K/V
  memory) is the follow-up. The mask uses global positions (``r L + i``) and segment ids.
  Sliding-window attention with ``window - 1 < T - L`` takes a halo of ``window - 1``
  keys and values instead: ``[B, H, L, L + window - 1]`` scores, ``ceil((window-1)/L)``
  ppermute hops.

How a mixer learns the mesh. The trainer enters ``jax.sharding.use_abstract_mesh`` with
its mesh inside the traced step when ``mesh.sequence > 1`` (:func:`sequence_context`). The
entry points here (:func:`linear_recurrence`, :func:`with_history`, :func:`attention`) read
the context mesh with :func:`sequence_mesh` at trace time and, when its ``sequence`` axis
has more than one device and divides the length, run their body in ``jax.shard_map`` over
that axis alone (the other mesh axes stay automatic, so data / fsdp / tensor sharding is
unchanged); otherwise they run the plain single-device code. So the mixer contract does
not change (``mixer(x, segment_ids)`` on global ``[B, T, D]`` arrays), a mixer needs no
mesh argument or new method, the context is part of the traced function (no jit cache can
serve a trace made without it), and with ``mesh.sequence = 1`` nothing is traced
differently. (The alternative, the LM wrapping each mixer call in a ``shard_map``, would
hand every mixer local arrays and make each one responsible for its own collectives,
RoPE offsets and document starts, and put all parameters inside the manual region.)
Parameters never enter a ``shard_map`` except ShortConv's taps (passed replicated; their
gradient is summed over the shards by ``shard_map``'s transpose). A mixer that is not
wired stays exact: XLA's partitioner gathers what its scan needs (correct, not parallel).
A length that the axis does not divide (``step`` with a few tokens) takes the plain path.
``layers`` never imports ``lcm``: the axis name :data:`AXIS` lives here and
``lcm.sharding`` imports it.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import chunked_scan

AXIS = "sequence"

_HI = jax.lax.Precision.HIGHEST

__all__ = ["AXIS", "sequence_mesh", "sequence_context", "halo", "exclusive_affine_prefix",
           "recurrence_shard", "linear_recurrence", "with_history", "attention"]


# ----------------------------------------------------------------------------------
# The context mesh
# ----------------------------------------------------------------------------------


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


def _shard_map(fn, mesh, in_specs, out_specs, check_vma=True):
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       axis_names=frozenset({AXIS}), check_vma=check_vma)


_TIME = P(None, AXIS)  # [B, T, ...] split on T


# ----------------------------------------------------------------------------------
# Primitives: called inside a shard_map over ``axis_name``.
# ----------------------------------------------------------------------------------


def _varying(x: jax.Array, axis_name: str) -> jax.Array:
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
    ``S_total`` the state after the last shard (the same on every shard). float32.
  """
  f32 = jnp.float32
  b = b.astype(f32)
  n = jax.lax.axis_size(axis_name)
  r = jax.lax.axis_index(axis_name)
  a_all = jax.lax.all_gather(_varying(a.astype(f32), axis_name), axis_name)  # [n, ...]
  b_all = jax.lax.all_gather(_varying(b, axis_name), axis_name)  # [n, ...]
  s0 = jnp.zeros_like(b) if initial is None else initial.astype(f32)
  if dense:
    states = []
    s = s0
    for j in range(n):  # states[j] = state entering shard j
      states.append(s)
      s = jnp.einsum("...ij,...jk->...ik", a_all[j], s, precision=_HI) + b_all[j]
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


def recurrence_shard(q, k, v, log_decay=None, *, reset=None, initial_state=None,
                     scan: Callable, axis_name: str = AXIS):
  """One shard of :func:`linear_recurrence` (inside a shard_map over ``axis_name``).

  q, k ``[B, L, G, Dk]`` (G divides H), v ``[B, L, H, Dv]``, log_decay None /
  ``[B, L, H]`` / ``[B, L, H, Dk]``, reset ``[B, L]`` (this shard's tokens),
  initial_state ``[B, H, Dk, Dv]`` (equal on every shard) or None; ``scan(q, k, v,
  log_decay, initial_state=, reset=)`` the single-device kernel. Returns
  ``(o [B, L, H, Dv], final state of the whole sequence)``.
  """
  f32 = jnp.float32
  bsz, length, groups, _ = q.shape
  heads = v.shape[2]
  # A zero state that varies over the axis (a scan's carry must, once the tokens do).
  zero = _varying(jnp.zeros((bsz, heads, q.shape[-1], v.shape[-1]), f32), axis_name)
  o_loc, b_loc = scan(q, k, v, log_decay, initial_state=zero, reset=reset)
  if log_decay is None:
    g = None
    total = jnp.zeros((bsz, heads), f32)
  else:
    g = log_decay.astype(f32)
    total = jnp.sum(g, axis=1)  # [B, H] or [B, H, Dk]
  alive = None  # [B, L]: no document start in this shard at or before the token
  if reset is not None:
    cut = jnp.any(reset, axis=1).reshape((bsz,) + (1,) * (total.ndim - 1))
    total = jnp.where(cut, -jnp.inf, total)
    alive = jnp.cumsum(reset.astype(jnp.int32), axis=1) == 0
  s_in, s_total = exclusive_affine_prefix(total, b_loc, axis_name, initial=initial_state)
  # o_t += S_in^T (q_t * exp(c_t)) before the shard's first document start.
  if g is None:
    w = jnp.ones((bsz, length, heads), f32)
    if alive is not None:
      w = jnp.where(alive[..., None], w, 0.0)
  else:
    c = jnp.cumsum(g, axis=1)  # sum of exactly the gates from the shard start to t
    if alive is not None:
      a = alive.reshape(alive.shape + (1,) * (c.ndim - 2))
      c = jnp.where(a, c, 0.0)
      w = jnp.where(a, jnp.exp(c), 0.0)
    else:
      w = jnp.exp(c)
  q32 = q.astype(f32)
  if w.ndim == 3:  # one weight per head: grouped q k stays grouped
    rep = heads // groups
    s_g = s_in.reshape((bsz, groups, rep) + s_in.shape[2:])
    corr = jnp.einsum("blgk,bgjkv->blgjv", q32, s_g, precision=_HI)
    corr = corr * w.reshape(bsz, length, groups, rep)[..., None]
    corr = corr.reshape(bsz, length, heads, -1)
  else:  # one weight per key channel
    qh = jnp.repeat(q32, heads // groups, axis=2) if groups != heads else q32
    corr = jnp.einsum("blhk,bhkv->blhv", qh * w, s_in, precision=_HI)
  o = (o_loc.astype(f32) + corr).astype(o_loc.dtype)
  return o, s_total


# ----------------------------------------------------------------------------------
# Entry points: global arrays in, the plain code without a sequence mesh.
# ----------------------------------------------------------------------------------


def linear_recurrence(q, k, v, log_decay=None, *, initial_state=None, reset=None,
                      chunk_size: int = 64, impl: str = "auto", interpret=False):
  """``kernels.chunked_scan.linear_recurrence`` (same arguments and results), split over
  the context mesh's ``sequence`` axis when there is one (:func:`recurrence_shard`)."""
  scan = functools.partial(chunked_scan.linear_recurrence, chunk_size=chunk_size, impl=impl,
                           interpret=interpret)
  mesh = sequence_mesh(q.shape[1])
  if mesh is None:
    return scan(q, k, v, log_decay, initial_state=initial_state, reset=reset)
  args = {"q": q, "k": k, "v": v, "log_decay": log_decay, "reset": reset,
          "initial_state": initial_state}
  args = {n: x for n, x in args.items() if x is not None}
  specs = {n: (P() if n == "initial_state" else _TIME) for n in args}

  def body(a):
    o, s_total = recurrence_shard(a["q"], a["k"], a["v"], a.get("log_decay"),
                                  reset=a.get("reset"), initial_state=a.get("initial_state"),
                                  scan=scan)
    return o, s_total[None]  # equal on every shard; typed varying, so one per shard

  o, s_total = _shard_map(body, mesh, (specs,), (_TIME, P(AXIS)),
                          check_vma=False)(args)
  return o, s_total[-1]


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

  seg_spec = None if segment_ids is None else _TIME
  return _shard_map(body, mesh, (_TIME, seg_spec) + (P(),) * len(consts), _TIME)(
      x, segment_ids, *consts)


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

  seg_spec = None if segment_ids is None else _TIME
  return _shard_map(body, mesh, (_TIME, _TIME, _TIME, seg_spec), _TIME)(
      q, k, v, segment_ids)

