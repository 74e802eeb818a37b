"""Context-parallel recurrences: each shard runs the ordinary kernel from a zero state,
an exclusive prefix over shards gives its incoming state, and a correction adds that
state's contribution (the math: the package docstring and docs/context-parallel.md).

Four kernels, four entry points with the kernels' own signatures (drop-ins):
``linear_recurrence`` (``kernels.chunked_scan``), ``delta_rule`` (``kernels.delta_rule``),
``dplr`` (``kernels.dplr``) and ``diagonal_recurrence`` (``kernels.diag_scan``). Each runs the plain kernel without a
sequence mesh and its ``*_shard`` function inside a ``shard_map`` over ``sequence`` with
one.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels import chunked_scan, delta_rule as delta_rule_kernel, diag_scan
from kernels import dplr as dplr_kernel
from layers.context_parallel.primitives import (AXIS, HIGHEST, TIME, batch_axes,
                                                exclusive_affine_prefix, sequence_mesh,
                                                shard_map, varying)

__all__ = ["recurrence_shard", "linear_recurrence", "delta_rule_shard", "delta_rule",
           "dplr_shard", "dplr", "diagonal_shard", "diagonal_recurrence", "handoff_shard", "sequential"]


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
  zero = varying(jnp.zeros((bsz, heads, q.shape[-1], v.shape[-1]), f32), axis_name)
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
    corr = jnp.einsum("blgk,bgjkv->blgjv", q32, s_g, precision=HIGHEST)
    corr = corr * w.reshape(bsz, length, groups, rep)[..., None]
    corr = corr.reshape(bsz, length, heads, -1)
  else:  # one weight per key channel
    qh = jnp.repeat(q32, heads // groups, axis=2) if groups != heads else q32
    corr = jnp.einsum("blhk,bhkv->blhv", qh * w, s_in, precision=HIGHEST)
  o = (o_loc.astype(f32) + corr).astype(o_loc.dtype)
  return o, s_total


def linear_recurrence(q, k, v, log_decay=None, *, initial_state=None, reset=None,
                      chunk_size: int = 64, impl: str = "auto", interpret=False):
  """``kernels.chunked_scan.linear_recurrence`` (same arguments and results), split over
  the context mesh's ``sequence`` axis when there is one (:func:`recurrence_shard`)."""
  scan = functools.partial(chunked_scan.linear_recurrence, chunk_size=chunk_size, impl=impl,
                           interpret=interpret)
  args = {"q": q, "k": k, "v": v, "log_decay": log_decay, "reset": reset,
          "initial_state": initial_state}
  return _split(
      lambda a: scan(a["q"], a["k"], a["v"], a.get("log_decay"),
                     initial_state=a.get("initial_state"), reset=a.get("reset")),
      args,
      lambda a: recurrence_shard(a["q"], a["k"], a["v"], a.get("log_decay"),
                                 reset=a.get("reset"), initial_state=a.get("initial_state"),
                                 scan=scan))


def _split(kernel_call, args: dict, body, *, per_row=("initial_state",), whole=()):
  """Run ``body(args)`` in a shard_map manual over every mesh axis (the kernels may be
  Pallas calls): arrays ``[B, T, ...]`` split on B over the batch axes and on T over
  ``sequence``; ``per_row`` ones (``[B, ...]``, e.g. the initial state) on B only;
  ``whole`` ones not at all. ``body`` returns ``(out [B, L, ...], final state equal on
  every shard of the sequence)``. Other axes (``tensor``) are replicated inside: inputs
  split over heads are gathered on entry. Without a sequence mesh that divides T,
  ``kernel_call(args)`` instead."""
  first = args["q" if "q" in args else "b"]
  mesh = sequence_mesh(first.shape[1])
  args = {n: x for n, x in args.items() if x is not None}
  if mesh is None:
    return kernel_call(args)
  bax = batch_axes(mesh, first.shape[0])
  timed, row = P(bax, AXIS), P(bax)
  specs = {n: (row if n in per_row else P() if n in whole else timed) for n in args}

  def wrapped(a):
    o, s_total = body(a)
    return o, s_total[None]  # equal on every shard; typed varying, so one per shard

  o, s_total = shard_map(wrapped, mesh, (specs,), (timed, P(AXIS, bax)), check_vma=False,
                         all_axes=True)(args)
  return o, s_total[-1]


def delta_rule_shard(q, k, v, beta, log_decay=None, *, reset=None, initial_state=None,
                     kernel: Callable, axis_name: str = AXIS):
  """One shard of :func:`delta_rule` (inside a shard_map over ``axis_name``).

  The delta rule ``S_t = M_t S_{t-1} + beta_t k_t v_t^T`` with ``M_t = (I - beta_t k_t
  k_t^T) a_t`` acts on each column of ``S`` separately, so one kernel pass over the shard
  with the values widened to ``[v_t | 0]`` (``Dv + Dk`` columns) from the state ``[0 | I]``
  gives everything the hand-off needs:

  * the first ``Dv`` columns: the local outputs ``o^loc`` and final state ``B_r`` (from a
    zero state);
  * the last ``Dk`` columns: the state ``A_{<=t} = M_t ... M_{start}`` (the product of the
    shard's transitions so far, zeroed at a document start like any state), so the final
    state there is the shard's dense transition ``A_r`` and the outputs are
    ``u_t = A_{<=t}^T q_t``.

  The dense prefix (:func:`exclusive_affine_prefix`, ``dense=True``) gives ``S_in`` and the
  correction is exact: ``S_t = A_{<=t} S_in + S^loc_t``, so ``o_t = o^loc_t + S_in^T u_t``
  (one ``[L, Dk] x [Dk, Dv]`` matmul per head). Cost: one pass with ``Dv + Dk`` value
  columns (the state work about doubles for ``Dk = Dv``; the WY / UT preparation, which
  depends only on k, beta and the gates, is shared), no second pass; ``u`` is in q's dtype
  (one extra rounding for bf16 inputs). Returns ``(o [B, L, H, Dv], final state of the
  whole sequence [B, H, Dk, Dv])``.
  """
  return _widened_shard(
      lambda v_ext, s0: kernel(q, k, v_ext, beta, log_decay, initial_state=s0, reset=reset),
      q, v, initial_state, axis_name)


def _widened_shard(run: Callable, q, v, initial_state, axis_name: str):
  """The hand-off shared by the recurrences whose update acts on each state column
  separately (:func:`delta_rule_shard`, :func:`dplr_shard`): ``run(v_ext, s0)`` is the
  kernel on this shard with the values ``v_ext = [v | 0]`` from the state ``s0 = [0 | I]``."""
  f32 = jnp.float32
  bsz, length, heads, dk = q.shape
  dv = v.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(dk, dtype=f32), (bsz, heads, dk, dk))
  s0 = varying(jnp.concatenate([jnp.zeros((bsz, heads, dk, dv), f32), eye], -1), axis_name)
  v_ext = jnp.concatenate([v, jnp.zeros((bsz, length, heads, dk), v.dtype)], -1)
  o_ext, s_ext = run(v_ext, s0)
  s_in, s_total = exclusive_affine_prefix(s_ext[..., dv:], s_ext[..., :dv], axis_name,
                                          dense=True, initial=initial_state)
  corr = jnp.einsum("blhk,bhkv->blhv", o_ext[..., dv:].astype(f32), s_in, precision=HIGHEST)
  return (o_ext[..., :dv].astype(f32) + corr).astype(o_ext.dtype), s_total


def delta_rule(q, k, v, beta, log_decay=None, *, initial_state=None, reset=None,
               chunk_size: int = 64, impl: str = "auto", interpret=False):
  """``kernels.delta_rule.delta_rule`` (same arguments and results), split over the context
  mesh's ``sequence`` axis when there is one (:func:`delta_rule_shard`)."""
  kernel = functools.partial(delta_rule_kernel.delta_rule, chunk_size=chunk_size, impl=impl,
                             interpret=interpret)
  args = {"q": q, "k": k, "v": v, "beta": beta, "log_decay": log_decay, "reset": reset,
          "initial_state": initial_state}
  return _split(
      lambda a: kernel(a["q"], a["k"], a["v"], a["beta"], a.get("log_decay"),
                       initial_state=a.get("initial_state"), reset=a.get("reset")),
      args,
      lambda a: delta_rule_shard(a["q"], a["k"], a["v"], a["beta"], a.get("log_decay"),
                                 reset=a.get("reset"), initial_state=a.get("initial_state"),
                                 kernel=kernel))


def dplr_shard(q, k, v, a, b, log_decay, *, reset=None, initial_state=None,
               kernel: Callable, axis_name: str = AXIS):
  """One shard of :func:`dplr`: ``S_t = (diag(e^{g_t}) + a_t b_t^T) S_{t-1} + k_t v_t^T``
  acts on each state column separately, like the delta rule, so the same single widened
  pass (:func:`delta_rule_shard`) gives the local outputs, the shard's dense transition
  and ``u_t = A_{<=t}^T q_t``; the dense prefix and ``o_t += S_in^T u_t`` are exact."""
  return _widened_shard(
      lambda v_ext, s0: kernel(q, k, v_ext, a, b, log_decay, initial_state=s0, reset=reset),
      q, v, initial_state, axis_name)


def dplr(q, k, v, a, b, log_decay, *, initial_state=None, reset=None, chunk_size: int = 64,
         impl: str = "auto", interpret=False):
  """``kernels.dplr.dplr_recurrence`` (same arguments and results), split over the context
  mesh's ``sequence`` axis when there is one (:func:`dplr_shard`)."""
  kernel = functools.partial(dplr_kernel.dplr_recurrence, chunk_size=chunk_size, impl=impl,
                             interpret=interpret)
  args = {"q": q, "k": k, "v": v, "a": a, "b": b, "log_decay": log_decay, "reset": reset,
          "initial_state": initial_state}
  names = ("q", "k", "v", "a", "b", "log_decay")
  return _split(
      lambda x: kernel(*(x[n] for n in names), initial_state=x.get("initial_state"),
                       reset=x.get("reset")),
      args,
      lambda x: dplr_shard(*(x[n] for n in names), reset=x.get("reset"),
                           initial_state=x.get("initial_state"), kernel=kernel))


def diagonal_shard(log_a, b, *, reset=None, initial_state=None, kernel: Callable,
                   axis_name: str = AXIS):
  """One shard of :func:`diagonal_recurrence` (inside a shard_map over ``axis_name``).

  ``h_t = exp(log_a_t) h_{t-1} + b_t`` per channel: the local pass from zero gives
  ``h^loc`` and ``B_r``; ``log A_r`` is the sum of the shard's ``log_a`` per channel
  (``-inf`` when a document starts in the shard); the prefix gives ``h_in``; the
  correction is ``h_t += exp(c_t) h_in`` with ``c_t`` the sum of exactly the shard's
  ``log_a`` up to t, for the tokens before the shard's first document start. Real or
  complex (S4D) inputs. Cost: a ``[B, L, ...channels]`` cumulative sum and one
  multiply-add, the size of ``h``. Returns ``(h [B, L, ...], final state of the whole
  sequence)``.
  """
  sdt = jnp.complex64 if jnp.iscomplexobj(log_a) or jnp.iscomplexobj(b) else jnp.float32
  bsz = b.shape[0]
  zero = varying(jnp.zeros((bsz,) + b.shape[2:], sdt), axis_name)
  h_loc, b_loc = kernel(log_a, b, initial_state=zero, reset=reset)
  c = jnp.cumsum(jnp.broadcast_to(log_a, b.shape).astype(sdt), axis=1)
  total = c[:, -1]
  w = jnp.exp(c)
  if reset is not None:
    lead = (1,) * (b.ndim - 2)
    cut = jnp.any(reset, axis=1).reshape((bsz,) + lead)
    total = jnp.where(cut, jnp.asarray(-jnp.inf, sdt), total)
    alive = (jnp.cumsum(reset.astype(jnp.int32), axis=1) == 0).reshape(reset.shape + lead)
    w = jnp.where(alive, jnp.exp(jnp.where(alive, c, 0)), 0)
  h_in, h_total = exclusive_affine_prefix(total, b_loc, axis_name, initial=initial_state)
  h = (h_loc.astype(sdt) + w * h_in[:, None]).astype(h_loc.dtype)
  return h, h_total


def diagonal_recurrence(log_a, b, *, initial_state=None, reset=None, chunk_size: int = 128,
                        impl: str = "auto", interpret=False):
  """``kernels.diag_scan.diagonal_recurrence`` (same arguments and results), split over the
  context mesh's ``sequence`` axis when there is one (:func:`diagonal_shard`). A
  ``log_a`` without a time axis (S4D's ``dt A``) is passed to every shard whole."""
  kernel = functools.partial(diag_scan.diagonal_recurrence, chunk_size=chunk_size,
                             impl=impl, interpret=interpret)
  log_a = jnp.asarray(log_a)
  timed = log_a.ndim == b.ndim and log_a.shape[1] != 1
  if not timed and log_a.ndim >= b.ndim - 1:  # it may align with T: make it explicit
    log_a = jnp.broadcast_to(log_a, b.shape)
    timed = True
  args = {"b": b, "log_a": log_a, "reset": reset, "initial_state": initial_state}
  return _split(
      lambda a: kernel(a["log_a"], a["b"], initial_state=a.get("initial_state"),
                       reset=a.get("reset")),
      args,
      lambda a: diagonal_shard(a["log_a"], a["b"], reset=a.get("reset"),
                               initial_state=a.get("initial_state"), kernel=kernel),
      whole=() if timed else ("log_a",))


def handoff_shard(fn: Callable, xs, state, *consts, axis_name: str = AXIS):
  """One shard of :func:`sequential` (inside a shard_map over ``axis_name``) for ``fn(xs,
  state, *consts) -> (out, new state)``.

  1. The incoming states, in order: n rounds of a ``fori_loop`` (``fn`` compiled once); in
     round i only shard i runs ``fn`` for its new state (a ``lax.cond`` on the shard index;
     the others wait) and a ``ppermute`` to the next shard hands it on (every shard sends,
     only i + 1 keeps it: the permutation must be static).
  2. The outputs: every shard runs ``fn`` from its incoming state, all at once.

  Memory: the loop's rounds are rematerialised (``jax.checkpoint``), so the backward keeps
  n states per device, not n rounds of residuals (each round's taken branch is a whole
  shard's pass: measured 2.9x the unsplit layer's memory at n = 8, T = 64k without it),
  and no output crosses the loop. Compute: the state pass runs shard after shard (one
  shard's pass per device, but in sequence), the output pass in parallel; the backward
  recomputes the state pass. Returns ``(out, state)``: this shard's outputs and final state
  (the last shard's is the whole sequence's)."""
  n = jax.lax.axis_size(axis_name)
  r = jax.lax.axis_index(axis_name)
  state = jax.tree.map(lambda s: varying(s, axis_name), state)
  shift = [(j, j + 1) for j in range(n - 1)]

  @jax.checkpoint
  def advance(state):
    return fn(xs, state, *consts)[1]

  def round_(i, carry):
    state_in, state = carry
    state_in = jax.tree.map(lambda a, b: jnp.where(r == i, b, a), state_in, state)
    state = jax.lax.cond(r == i, advance, lambda s: s, state)
    sent = jax.lax.ppermute(state, axis_name, shift)
    state = jax.tree.map(lambda got, own: jnp.where(r == i + 1, got, own), sent, state)
    return state_in, state

  state_in, _ = jax.lax.fori_loop(0, n, round_, (state, state))
  return fn(xs, state_in, *consts)


def sequential(fn: Callable, xs: dict, state, *consts):
  """``fn(xs, state, *consts) -> (out, new state)`` for a recurrence that is not affine in
  its state (the Titans memory: an MLP trained online), where the only exact split is a
  hand-off in order: with a sequence mesh, shard r starts from shard r - 1's final state
  (:func:`handoff_shard`), so the shards run one after another: no speed-up over one
  device, but each device holds only its ``T / n`` tokens' activations (the point of the
  split for these layers). ``xs`` ``[B, T, ...]`` arrays (split on T), ``state`` and
  ``consts`` replicated pytrees; ``out`` ``[B, T, ...]`` arrays. Without a sequence mesh
  that divides T: ``fn(xs, state, *consts)``."""
  mesh = sequence_mesh(jax.tree.leaves(xs)[0].shape[1])
  if mesh is None:
    return fn(xs, state, *consts)
  rep = jax.tree.map(lambda _: P(), (state,) + consts)
  split = jax.tree.map(lambda _: TIME, xs)

  def body(xs, state, *consts):
    out, final = handoff_shard(fn, xs, state, *consts)
    return out, jax.tree.map(lambda s: s[None], final)

  out_shape = jax.eval_shape(fn, xs, state, *consts)[0]
  out_specs = (jax.tree.map(lambda _: TIME, out_shape), jax.tree.map(lambda _: P(AXIS), state))
  out, final = shard_map(body, mesh, (split,) + rep, out_specs, check_vma=False)(
      xs, *((state,) + consts))
  return out, jax.tree.map(lambda s: s[-1], final)
