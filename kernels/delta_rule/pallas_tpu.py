"""Pallas Mosaic-TPU kernels for the chunked (gated) delta rule.

The WY / UT preparation (``W = T diag(gamma) K``, ``U = T V`` with
``T = (I + A)^{-1} diag(beta)``; Yang et al. 2024, "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length"; gated: Yang et al., "Gated Delta Networks") has no
dependence on the state, so it is computed before the kernel, for all chunks in parallel,
by XLA (:func:`kernels.delta_rule.reference.prepare_chunks`: forward substitution for
``(I + A)^{-1}`` batched over chunks, then matmuls).
The kernels do the sequential part.

Forward, grid ``(B, H, num_chunks)``: batch and heads ``"parallel"``, the chunk axis
``"arbitrary"`` (sequential) with the fp32 ``[Dk, Dv]`` state in VMEM scratch. Per chunk::

    u  = U - W S                                    (new values, [C, Dv])
    o  = (Q * exp(b)) S + [(Q K^T) * exp(b_i - b_j)]_{j<=i} u
    S' = exp(b_C) S + (K * exp(b_C - b))^T u

with ``b`` the within-chunk cumulative log decay. ``b_i - b_j`` and ``b_C - b_j`` are
computed as segment sums of exactly the log decays in between (an fp32 matmul of a
triangular ones matrix with the masked decays, and a suffix sum), not as differences of
cumulative sums, which lose ``eps * |b|`` after a saturated gate; every exponent is masked
(causality, reset segments) to ``-inf`` before ``exp``. Optionally the state entering every chunk is written
out (``want_states``) for the backward pass.

Backward (:func:`backward`), same grid with the chunks visited last to first and the
state cotangent ``dS`` in VMEM scratch::

    du  = [scores]^T dO + (K * exp(b_C - b)) dS'
    dS  = exp(b_C) dS' + (Q * exp(b))^T dO - W^T du

It writes ``dS'`` (the cotangent of the state *leaving* every chunk) and ``dS`` of the
first chunk (the initial state's gradient); everything else of the gradient is parallel
over chunks and computed by XLA from the saved chunk states (see ``__init__.py``).

Layout: chunk-major ``[B, H, N, C, D]`` inputs are read through the free view
``[B, H, N*C, D]`` as ``(C, D)`` blocks (Mosaic's (8, 128) rule: C a multiple of 8, D
whole); log decays (and their prefix / suffix sums) come as ``(C, 1)`` columns, reset
counts as a column and a row ``(1, C)``, so no in-kernel transpose of a vector is needed. MXU operands are in the input dtype (bf16
stays bf16) with fp32 accumulation; fp32 inputs use ``Precision.HIGHEST``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import suffix_sum

F32 = jnp.float32
NEG_INF = float("-inf")


def _dot(a, b, cdt, trans_a=False, trans_b=False):
  """``a @ b`` (optionally transposed operands) with fp32 accumulation."""
  a = a.astype(cdt)
  b = b.astype(cdt)
  if trans_a:
    a = a.T
  cb = (1,) if trans_b else (0,)
  prec = lax.Precision.HIGHEST if cdt == F32 else None
  return lax.dot_general(a, b, (((1,), cb), ((), ())), precision=prec,
                         preferred_element_type=F32)


def _chunk_terms(q, k, gc, bc, rc, scol, srow, C, cdt):
  """Per-chunk factors: ``scores`` (C, C), ``q_in`` (C, Dk), ``k_out`` (C, Dk), ``decay``
  (1, 1); see the module docstring. ``gc, bc, rc`` (C, 1): log decays, their inclusive
  prefix sums and their exclusive suffix sums; ``scol`` / ``srow`` None without resets."""
  rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  mask = rows >= cols
  # Pair decays as segment sums sum_{j<m<=i} g_m (exact terms, not b_i - b_j): an fp32
  # matmul of the lower-triangular ones with the column-masked decays.
  segsum = _dot(mask.astype(F32), jnp.where(rows > cols, gc, 0.0), F32)
  e_in, e_end = bc, rc
  decay = jnp.exp(jnp.sum(gc, axis=0, keepdims=True))  # (1, 1)
  if scol is not None:
    rcol = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    mask = mask & (scol == srow)
    slast = jnp.sum(jnp.where(rcol == C - 1, scol, 0), axis=0, keepdims=True)  # (1, 1)
    e_in = jnp.where(scol == 0, e_in, NEG_INF)  # the entering state reaches token i
    e_end = jnp.where(scol == slast, e_end, NEG_INF)  # token j reaches the chunk end
    decay = jnp.where(slast == 0, decay, 0.0)  # no reset inside the chunk
  expo = jnp.where(rows == cols, 0.0, jnp.where(mask, segsum, NEG_INF))
  scores = _dot(q, k, cdt, trans_b=True) * jnp.exp(expo)
  q_in = q.astype(F32) * jnp.exp(e_in)
  k_out = k.astype(F32) * jnp.exp(e_end)
  return scores, q_in, k_out, decay


def _fwd_kernel(*refs, C, has_seg, want_states, cdt):
  it = iter(refs)
  q_ref, k_ref, w_ref, u_ref, g_ref, b_ref, r_ref = (next(it) for _ in range(7))
  scol_ref, srow_ref = (next(it), next(it)) if has_seg else (None, None)
  s0_ref = next(it)
  o_ref, sf_ref = next(it), next(it)
  h_ref = next(it) if want_states else None
  st_ref = next(it)
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _init():
    st_ref[...] = s0_ref[...].astype(F32)

  s = st_ref[...]
  if want_states:
    h_ref[...] = s
  q, k = q_ref[...], k_ref[...]
  scores, q_in, k_out, decay = _chunk_terms(
      q, k, g_ref[...], b_ref[...], r_ref[...], scol_ref[...] if has_seg else None,
      srow_ref[...] if has_seg else None, C, cdt)
  vn = u_ref[...].astype(F32) - _dot(w_ref[...], s, cdt)  # new values u = U - W S
  o = _dot(q_in, s, cdt) + _dot(scores, vn, cdt)
  o_ref[...] = o.astype(o_ref.dtype)
  s_new = decay * s + _dot(k_out, vn, cdt, trans_a=True)
  st_ref[...] = s_new

  @pl.when(n == pl.num_programs(2) - 1)
  def _final():
    sf_ref[...] = s_new


def _bwd_kernel(*refs, C, has_seg, cdt):
  it = iter(refs)
  q_ref, k_ref, w_ref, do_ref, g_ref, b_ref, r_ref = (next(it) for _ in range(7))
  scol_ref, srow_ref = (next(it), next(it)) if has_seg else (None, None)
  dsf_ref = next(it)
  dh_ref, ds0_ref = next(it), next(it)
  st_ref = next(it)
  n = pl.program_id(2)  # step n handles chunk N - 1 - n

  @pl.when(n == 0)
  def _init():
    st_ref[...] = dsf_ref[...].astype(F32)

  ds = st_ref[...]  # cotangent of the state leaving this chunk
  dh_ref[...] = ds
  do = do_ref[...]
  scores, q_in, k_out, decay = _chunk_terms(
      q_ref[...], k_ref[...], g_ref[...], b_ref[...], r_ref[...],
      scol_ref[...] if has_seg else None, srow_ref[...] if has_seg else None, C, cdt)
  dvn = _dot(scores, do, cdt, trans_a=True) + _dot(k_out, ds, cdt)
  ds_new = (decay * ds + _dot(q_in, do, cdt, trans_a=True)
            - _dot(w_ref[...], dvn, cdt, trans_a=True))
  st_ref[...] = ds_new

  @pl.when(n == pl.num_programs(2) - 1)
  def _final():
    ds0_ref[...] = ds_new


def _common_specs(B, H, N, C, g, seg, rev):
  """Block specs and arguments for the decays and reset counts (chunk ``c(n)``): the log
  decays g, their within-chunk prefix sums and exclusive suffix sums, as (C, 1) columns."""
  sq = pl.squeezed
  c = (lambda n: N - 1 - n) if rev else (lambda n: n)
  g = g.astype(F32)
  specs = [pl.BlockSpec((sq, sq, C, 1), lambda bi, h, n: (bi, h, c(n), 0))] * 3
  args = [x.reshape(B, H, N * C, 1) for x in (g, jnp.cumsum(g, axis=-1), suffix_sum(g))]
  if seg is not None:
    seg = seg.astype(jnp.int32)
    specs += [pl.BlockSpec((sq, C, 1), lambda bi, h, n: (bi, c(n), 0)),
              pl.BlockSpec((sq, sq, 1, C), lambda bi, h, n: (bi, c(n), 0, 0))]
    args += [seg.reshape(B, N * C, 1), seg.reshape(B, N, 1, C)]
  return specs, args


def _tok_spec(C, d, N, rev):
  c = (lambda n: N - 1 - n) if rev else (lambda n: n)
  return pl.BlockSpec((pl.squeezed, pl.squeezed, C, d), lambda bi, h, n: (bi, h, c(n), 0))


def _flat(x):
  B, H, N, C, d = x.shape
  return x.reshape(B, H, N * C, d)


def forward(q, k, w, u, g, seg, s0, *, want_states=False, compute_dtype=None, out_dtype=None,
            interpret=False):
  """Forward kernel on chunk-major inputs.

  Args:
    q, k, w: ``[B, H, N, C, Dk]``; u: ``[B, H, N, C, Dv]`` (W, U from the UT transform).
    g: ``[B, H, N, C]`` fp32 per-token log decays (zeros without gating).
    seg: ``None`` or ``[B, N, C]`` int32 within-chunk reset counts.
    s0: ``[B, H, Dk, Dv]`` initial state.
    compute_dtype: dtype of the MXU operands (default q's; bf16 callers pass bf16 even
      though the prepared q, k, W, U are fp32).
  Returns:
    ``o [B, H, N, C, Dv]`` (``out_dtype``, default q's), ``S_final [B, H, Dk, Dv]`` fp32,
    and with ``want_states`` the states entering every chunk ``[B, H, N, Dk, Dv]`` fp32.
  """
  B, H, N, C, Dk = q.shape
  Dv = u.shape[-1]
  cdt = jnp.dtype(compute_dtype or q.dtype)
  out_dtype = out_dtype or cdt
  sq = pl.squeezed
  in_specs = [_tok_spec(C, Dk, N, False)] * 3 + [_tok_spec(C, Dv, N, False)]
  args = [_flat(x.astype(cdt)) for x in (q, k, w, u)]
  specs, extra = _common_specs(B, H, N, C, g, seg, False)
  in_specs += specs
  args += extra
  state_spec = pl.BlockSpec((sq, sq, Dk, Dv), lambda bi, h, n: (bi, h, 0, 0))
  in_specs.append(state_spec)
  args.append(s0.astype(F32))
  state_shape = jax.ShapeDtypeStruct((B, H, Dk, Dv), F32)
  out_shape = [jax.ShapeDtypeStruct((B, H, N * C, Dv), out_dtype), state_shape]
  out_specs = [_tok_spec(C, Dv, N, False), state_spec]
  if want_states:
    out_shape.append(jax.ShapeDtypeStruct((B, H, N, Dk, Dv), F32))
    out_specs.append(pl.BlockSpec((sq, sq, sq, Dk, Dv), lambda bi, h, n: (bi, h, n, 0, 0)))
  kernel = functools.partial(_fwd_kernel, C=C, has_seg=seg is not None,
                             want_states=want_states, cdt=cdt)
  o, *states = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(B, H, N),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      scratch_shapes=[pltpu.VMEM((Dk, Dv), F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="delta_rule_fwd",
  )(*args)
  return (o.reshape(B, H, N, C, Dv), *states)


def backward(q, k, w, g, seg, do, dsf, *, compute_dtype=None, interpret=False):
  """State-cotangent kernel (chunks last to first).

  Args: as :func:`forward`, plus ``do`` ``[B, H, N, C, Dv]`` (cotangent of o) and ``dsf``
  ``[B, H, Dk, Dv]`` (cotangent of the final state).
  Returns ``(dh, ds0)``: ``dh [B, H, N, Dk, Dv]`` fp32, the cotangent of the state leaving
  every chunk; ``ds0 [B, H, Dk, Dv]`` fp32, the cotangent of the initial state.
  """
  B, H, N, C, Dk = q.shape
  Dv = do.shape[-1]
  cdt = jnp.dtype(compute_dtype or q.dtype)
  sq = pl.squeezed
  in_specs = [_tok_spec(C, Dk, N, True)] * 3 + [_tok_spec(C, Dv, N, True)]
  args = [_flat(x.astype(cdt)) for x in (q, k, w, do)]
  specs, extra = _common_specs(B, H, N, C, g, seg, True)
  in_specs += specs
  args += extra
  state_spec = pl.BlockSpec((sq, sq, Dk, Dv), lambda bi, h, n: (bi, h, 0, 0))
  in_specs.append(state_spec)
  args.append(dsf.astype(F32))
  kernel = functools.partial(_bwd_kernel, C=C, has_seg=seg is not None, cdt=cdt)
  dh, ds0 = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, H, N, Dk, Dv), F32),
                 jax.ShapeDtypeStruct((B, H, Dk, Dv), F32)),
      grid=(B, H, N),
      in_specs=in_specs,
      out_specs=(pl.BlockSpec((sq, sq, sq, Dk, Dv),
                              lambda bi, h, n: (bi, h, N - 1 - n, 0, 0)), state_spec),
      scratch_shapes=[pltpu.VMEM((Dk, Dv), F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="delta_rule_bwd",
  )(*args)
  return dh, ds0
