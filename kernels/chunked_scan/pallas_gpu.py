"""Pallas Triton (GPU) kernel for the chunked gated linear recurrence.

GPU grid programs run in parallel, so unlike the TPU kernel the chunk loop is *inside*
the program: grid ``(B, H, Dv / BV)``, and each program walks its sequence chunk by chunk
with ``lax.fori_loop``, carrying its fp32 ``[Dk, BV]`` slice of the state in registers
(value columns are independent, so Dv is split across programs). The per-chunk math is the
chunkwise form of Yang et al. 2023 (GLA) / Dao & Gu 2024 (SSD state passing):

  * no decay / one decay per head (Katharopoulos et al. 2020; RetNet, Sun et al. 2023):
    ``o = ((q k^T) * exp(mask(D))) v + (q * exp(b)) S`` with ``D_ij = sum_{j<m<=i} g_m``,
    masked before ``exp``;
  * one decay per channel (GLA): sub-chunks of 16 rows; pairs in earlier sub-chunks factor
    through the reference point at the sub-chunk start (both exponents <= 0; one
    ``tl.dot``), pairs inside a sub-chunk use exact element-wise decays, one key row at a
    time.

As in ``pallas_tpu.py``, every decay exponent between two tokens of a chunk is a sum of
exactly the log decays in between (fp32 ``tl.dot`` of a triangular ones mask with the
masked decays, or the suffix sums prepared outside), never a difference of cumulative sums.

Triton constraints respected here: every loaded or computed tile has power-of-two sides
(Dk and Dv are zero-padded to a power of two >= 16 by :func:`forward`), no value slicing
(rows are loaded from refs instead), ``tl.dot`` operands at least 16 wide.
``decay_on="value"``, ``strict`` and ``want_excl`` mean the same as in ``pallas_tpu.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.common import group_heads, pad_last, pow2

F32 = jnp.float32
NEG_INF = float("-inf")
SUB = 16


def _dot(a, b, cdt, trans_a=False, trans_b=False):
  a = a.astype(cdt)
  b = b.astype(cdt)
  ca = (0,) if trans_a else (1,)
  cb = (1,) if trans_b else (0,)
  prec = lax.Precision.HIGHEST if cdt == F32 else None
  return lax.dot_general(a, b, ((ca, cb), ((), ())), precision=prec,
                         preferred_element_type=F32)


def _loop(n, body, init, unroll):
  """``for j in range(n): carry = body(j, carry)``: unrolled in Python, or a ``fori_loop``
  (an ``scf.for`` that Triton may unroll itself; also much faster to compile on CPU)."""
  if unroll:
    for j in range(n):
      init = body(j, init)
    return init
  return lax.fori_loop(0, n, body, init)


def _iota(shape, dim):
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _in_sub_chunk(g_i, L):
  """``sum_{start <= m <= i} g_m`` for the rows i of an (L, D) sub-chunk (exact terms)."""
  return _dot((_iota((L, L), 0) >= _iota((L, L), 1)).astype(F32), g_i, F32)


def _to_sub_chunk(g, r0, C):
  """``sum_{j < m < r0} g_m`` for every row j < r0 of a (C, D) chunk (exact terms; rows
  j >= r0 are 0 and must be masked)."""
  rows, cols = _iota((C, C), 0), _iota((C, C), 1)
  return _dot(((cols > rows) & (cols < r0)).astype(F32), g, F32)


def _pair_in_sub_chunk(g_i, jj, L):
  """``sum_{jj < m <= i} g_m`` for the rows i of an (L, D) sub-chunk (0 for i <= jj)."""
  return _in_sub_chunk(jnp.where(_iota((L, 1), 0) > jj, g_i, 0.0), L)


def _kernel(*refs, kind, decay_on, strict, C, N, has_seg, has_s0, want_excl, cdt, unroll):
  it = iter(refs)
  q_ref, k_ref, v_ref = next(it), next(it), next(it)
  g_ref, b_ref, r_ref = (next(it), next(it), next(it)) if kind != "none" else (None,) * 3
  seg_ref = next(it) if has_seg else None
  s0_ref = next(it) if has_s0 else None
  o_ref, sf_ref = next(it), next(it)
  excl_ref = next(it) if want_excl else None
  Dk = q_ref.shape[-1]
  BV = v_ref.shape[-1]
  L = SUB if C % SUB == 0 else C

  def seg_parts(t0):
    if not has_seg:
      return None, None, None, None
    svec = seg_ref[pl.ds(t0, C)]
    slast = seg_ref[t0 + C - 1]
    return svec[:, None], svec[None, :], svec[:, None] == slast, slast == 0

  def chunk(n, s):
    """Write this chunk's outputs; return (decay, lhs, rhs): S_new = decay*S + lhs^T rhs."""
    t0 = n * C
    scol, srow, to_end, keeps = seg_parts(t0)
    rows_c = _iota((C, 1), 0)

    if kind in ("none", "scalar"):
      q = q_ref[pl.ds(t0, C), :]
      k = k_ref[pl.ds(t0, C), :]
      v = v_ref[pl.ds(t0, C), :]
      rows, cols = _iota((C, C), 0), _iota((C, C), 1)
      mask = rows > cols if strict else rows >= cols
      if has_seg:
        mask = mask & (scol == srow)
      scores = _dot(q, k, cdt, trans_b=True)
      if kind == "none":
        scores = jnp.where(mask, scores, 0.0)
        q_in = q.astype(F32)
        k_out = k.astype(F32)
        decay = jnp.ones((1, 1), F32)
        if has_seg:
          q_in = jnp.where(scol == 0, q_in, 0.0)
          k_out = jnp.where(to_end, k_out, 0.0)
      else:
        gc = g_ref[pl.ds(t0, C)][:, None]
        bc = b_ref[pl.ds(t0, C)][:, None]  # prefix sums: decay from the chunk start
        rc = r_ref[pl.ds(t0, C)][:, None]  # suffix sums: decay to the chunk end
        bl = b_ref[t0 + C - 1]
        # pair decays as segment sums sum_{j<m<=i} g_m (exact terms, not b_i - b_j)
        segsum = _dot((rows >= cols).astype(F32), jnp.where(rows > cols, gc, 0.0), F32)
        expo = jnp.where(mask, segsum, NEG_INF)
        if not strict:
          expo = jnp.where(rows == cols, 0.0, expo)
        scores = scores * jnp.exp(expo)
        e_in = bc if not has_seg else jnp.where(scol == 0, bc, NEG_INF)
        e_end = rc if not has_seg else jnp.where(to_end, rc, NEG_INF)
        q_in = q.astype(F32) * jnp.exp(e_in)
        k_out = k.astype(F32) * jnp.exp(e_end)
        decay = jnp.exp(bl) * jnp.ones((1, 1), F32)
      if has_seg:
        decay = jnp.where(keeps, decay, 0.0)
      o = _dot(scores, v, cdt) + _dot(q_in, s, cdt)
      o_ref[pl.ds(t0, C), :] = o.astype(o_ref.dtype)
      return decay, k_out, v
    k = k_ref[pl.ds(t0, C), :]
    v = v_ref[pl.ds(t0, C), :]
    g = g_ref[pl.ds(t0, C), :]
    b_last = b_ref[t0 + C - 1, :]  # (D,)
    for I in range(C // L):
      r0 = I * L
      q_i = q_ref[pl.ds(t0 + r0, L), :]
      b_i = b_ref[pl.ds(t0 + r0, L), :]
      g_i = g_ref[pl.ds(t0 + r0, L), :]
      rows_l = _iota((L, 1), 0)
      cols = _iota((L, C), 1)
      same = None
      first_i = None
      if has_seg:
        scol_i = seg_ref[pl.ds(t0 + r0, L)][:, None]
        same = scol_i == srow
        first_i = scol_i == 0
      e_in = b_i if first_i is None else jnp.where(first_i, b_i, NEG_INF)
      if decay_on == "key":
        q_i = q_i.astype(F32)
        o_i = _dot(q_i * jnp.exp(e_in), s, cdt)
        a = jnp.zeros((L, C), F32)
        if I > 0:  # earlier sub-chunks through the reference point at the sub-chunk start
          k_t = k.astype(F32) * jnp.exp(jnp.where(rows_c < r0, _to_sub_chunk(g, r0, C),
                                                  NEG_INF))
          a = _dot(q_i * jnp.exp(_in_sub_chunk(g_i, L)), k_t, cdt, trans_b=True)
          a = jnp.where(cols < r0, a, 0.0)

        def diag(jj, a, q_i=q_i, g_i=g_i, r0=r0):
          k_j = k_ref[t0 + r0 + jj, :][None, :].astype(F32)
          causal = rows_l > jj if strict else rows_l >= jj
          expo = jnp.where(causal, _pair_in_sub_chunk(g_i, jj, L), NEG_INF)
          if not strict:
            expo = jnp.where(rows_l == jj, 0.0, expo)
          col = jnp.sum(q_i * k_j * jnp.exp(expo), axis=1, keepdims=True)
          return a + jnp.where(cols == r0 + jj, col, 0.0)

        a = _loop(L, diag, a, unroll)
        if same is not None:
          a = jnp.where(same, a, 0.0)
        o_i = o_i + _dot(a, v, cdt)
      else:
        m = _dot(q_i, k, cdt, trans_b=True)  # (L, C)
        if same is not None:
          m = jnp.where(same, m, 0.0)
        o_i = jnp.exp(e_in) * _dot(q_i, s, cdt)
        if I > 0:  # earlier sub-chunks through the reference point at the sub-chunk start
          v_t = v.astype(F32) * jnp.exp(jnp.where(rows_c < r0, _to_sub_chunk(g, r0, C),
                                                  NEG_INF))
          o_i = o_i + jnp.exp(_in_sub_chunk(g_i, L)) * _dot(jnp.where(cols < r0, m, 0.0),
                                                             v_t, cdt)

        def diag(jj, o_i, m=m, g_i=g_i, r0=r0):
          m_j = jnp.sum(jnp.where(cols == r0 + jj, m, 0.0), axis=1, keepdims=True)
          v_j = v_ref[t0 + r0 + jj, :][None, :].astype(F32)
          causal = rows_l > jj if strict else rows_l >= jj
          expo = jnp.where(causal, _pair_in_sub_chunk(g_i, jj, L), NEG_INF)
          if not strict:
            expo = jnp.where(rows_l == jj, 0.0, expo)
          return o_i + m_j * v_j * jnp.exp(expo)

        o_i = _loop(L, diag, o_i, unroll)
      o_ref[pl.ds(t0 + r0, L), :] = o_i.astype(o_ref.dtype)
    e_end = r_ref[pl.ds(t0, C), :]  # decay to the chunk end (exact suffix sums)
    if has_seg:
      e_end = jnp.where(to_end, e_end, NEG_INF)
    if decay_on == "key":
      decay = jnp.exp(b_last)[:, None]  # (Dk, 1): rows of S
      lhs, rhs = k.astype(F32) * jnp.exp(e_end), v
    else:
      decay = jnp.exp(b_last)[None, :]  # (1, BV): columns of S
      lhs, rhs = k, v.astype(F32) * jnp.exp(e_end)
    if has_seg:
      decay = jnp.where(keeps, decay, 0.0)
    return decay, lhs, rhs

  def body(n, s):
    decay, lhs, rhs = chunk(n, s)
    return decay * s + _dot(lhs, rhs, cdt, trans_a=True)

  s = s0_ref[...].astype(F32) if has_s0 else jnp.zeros((Dk, BV), F32)
  if want_excl:
    s = lax.fori_loop(0, N - 1, body, s)
    decay, lhs, rhs = chunk(N - 1, s)
    not_last = _iota((C, 1), 0) < C - 1
    excl = decay * s + _dot(jnp.where(not_last, lhs.astype(F32), 0.0), rhs, cdt,
                            trans_a=True)
    sf_ref[...] = excl + _dot(jnp.where(not_last, 0.0, lhs.astype(F32)), rhs, cdt,
                              trans_a=True)
    excl_ref[...] = excl
  else:
    sf_ref[...] = lax.fori_loop(0, N, body, s)


def forward(q, k, v, decays, seg, s0, *, chunk, decay_on="key", strict=False, out_dtype=None,
            want_excl=False, interpret=False, block_v=64, num_warps=4):
  """Run the kernel on prepared inputs (same contract as ``pallas_tpu.forward``)."""
  B, Tp, _, Dk = q.shape
  H = group_heads(q, k, v)
  Dv = v.shape[-1]
  C = chunk
  N = Tp // C
  g, b, r = (None, None, None) if decays is None else decays
  kind = "none" if b is None else ("scalar" if b.ndim == 3 else "channel")
  cdt = q.dtype
  out_dtype = out_dtype or q.dtype
  # Zero-pad head dims to powers of two (padded key rows / value columns stay zero).
  Dkp, Dvp = pow2(Dk), pow2(Dv)
  q, k = pad_last(q, Dkp), pad_last(k.astype(cdt), Dkp)
  v = pad_last(v.astype(cdt), Dvp)
  if kind == "channel":
    g, b, r = (pad_last(x, Dkp if decay_on == "key" else Dvp) for x in (g, b, r))
  if s0 is not None:
    s0 = jnp.pad(s0.astype(F32), ((0, 0), (0, 0), (0, Dkp - Dk), (0, Dvp - Dv)))
  BV = min(Dvp, block_v)
  nv = Dvp // BV
  sq = pl.squeezed
  # A grouped input (H / r heads) serves head h from its head h // r.
  hd = lambda r: (lambda h: h) if r == 1 else (lambda h: lax.div(h, r))  # grid ids >= 0
  qk_spec = lambda r=1: pl.BlockSpec((sq, Tp, sq, Dkp),
                                     lambda bi, h, iv: (bi, 0, hd(r)(h), 0))
  v_spec = lambda r=1: pl.BlockSpec((sq, Tp, sq, BV), lambda bi, h, iv: (bi, 0, hd(r)(h), iv))
  in_specs = [qk_spec(H // q.shape[2]), qk_spec(H // k.shape[2]), v_spec(H // v.shape[2])]
  args = [q, k, v]
  if kind == "scalar":
    in_specs += [pl.BlockSpec((sq, Tp, sq), lambda bi, h, iv: (bi, 0, h))] * 3
    args += [x.astype(F32) for x in (g, b, r)]
  elif kind == "channel":
    in_specs += [qk_spec() if decay_on == "key" else v_spec()] * 3
    args += [x.astype(F32) for x in (g, b, r)]
  has_seg = seg is not None
  if has_seg:
    in_specs.append(pl.BlockSpec((sq, Tp), lambda bi, h, iv: (bi, 0)))
    args.append(seg.astype(jnp.int32))
  state_spec = pl.BlockSpec((sq, sq, Dkp, BV), lambda bi, h, iv: (bi, h, 0, iv))
  has_s0 = s0 is not None
  if has_s0:
    in_specs.append(state_spec)
    args.append(s0)
  state_shape = jax.ShapeDtypeStruct((B, H, Dkp, Dvp), F32)
  out_shape = [jax.ShapeDtypeStruct((B, Tp, H, Dvp), out_dtype), state_shape]
  out_specs = [v_spec(), state_spec]
  if want_excl:
    out_shape.append(state_shape)
    out_specs.append(state_spec)
  kernel = functools.partial(_kernel, kind=kind, decay_on=decay_on, strict=strict, C=C, N=N,
                             has_seg=has_seg, has_s0=has_s0, want_excl=want_excl, cdt=cdt,
                             unroll=False)
  o, *states = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(B, H, nv),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=f"chunked_scan_{kind}_{decay_on}{'_strict' if strict else ''}",
  )(*args)
  o = o[..., :Dv]
  states = [st[:, :, :Dk, :Dv] for st in states]
  return (o, *states)
