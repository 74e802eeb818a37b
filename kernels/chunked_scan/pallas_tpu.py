"""Pallas Mosaic-TPU kernel for the chunked gated linear recurrence.

Grid ``(B, H, num_chunks)``: batch and heads are ``"parallel"``, the chunk axis is
``"arbitrary"`` (sequential), and the fp32 ``[Dk, Dv]`` state lives in VMEM scratch across
it (the chunkwise form of Yang et al. 2023, GLA; "state passing" of Dao & Gu 2024, SSD).
Per chunk of C tokens:

  * no decay / one decay per head (Katharopoulos et al. 2020; RetNet, Sun et al. 2023;
    SSD): ``o = ((q k^T) * exp(mask(D))) v + (q * exp(b)) S`` with ``b`` the within-chunk
    cumulative log decay and ``D_ij = sum_{j<m<=i} g_m`` the pair decays, masked to
    ``-inf`` before ``exp``;
  * one decay per channel (GLA): sub-chunks of L = 16 rows; pairs in earlier sub-chunks
    factor through the reference point at the sub-chunk start (both exponents <= 0, so one
    MXU matmul per sub-chunk), pairs inside a sub-chunk use exact element-wise decays, one
    key column at a time (VPU).

Every decay exponent between two tokens of a chunk is a sum of exactly the log decays in
between (an fp32 matmul of a triangular ones mask with the masked decays, or the suffix
sums ``r`` prepared outside), never a difference of cumulative sums, which loses
``eps * |b|`` after a saturated gate (see ``kernels.common``).

``decay_on="value"`` is the same recurrence with the per-channel decay on the value side
(``S_t = S_{t-1} diag(exp(g_t)) + k_t v_t^T``); the backward pass (``__init__.py``) needs it.
``strict=True`` leaves out the i = j term of every token (used for dq / dk in the backward).

Layout: q, k, v, o and per-channel decays are read as ``(C, D)`` blocks of one head, from
the free view ``[B, T, H*D]`` when D is a multiple of 128, else from a ``[B, H, T, D]``
transposed copy (Mosaic's (8, 128) block rule); per-head decays come as columns ``(C, 1)``
and reset counts as a column ``(C, 1)`` and a row ``(1, C)`` so that no in-kernel transpose
is needed. MXU operands are in the input dtype
(bf16 stays bf16) with fp32 accumulation; fp32 inputs use ``Precision.HIGHEST``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import group_heads

F32 = jnp.float32
NEG_INF = float("-inf")
SUB = 16  # sub-chunk length for per-channel decays


def _dot(a, b, cdt, trans_a=False, trans_b=False):
  """``a @ b`` (optionally transposed operands) with fp32 accumulation."""
  a = a.astype(cdt)
  b = b.astype(cdt)
  if trans_a:
    a = a.T
  ca = (1,)
  cb = (1,) if trans_b else (0,)
  prec = lax.Precision.HIGHEST if cdt == F32 else None
  return lax.dot_general(a, b, ((ca, cb), ((), ())), precision=prec,
                         preferred_element_type=F32)


def _loop(n, body, init, unroll):
  """``for j in range(n): carry = body(j, carry)``: a Python loop (static j, unrolled) for
  hardware, a ``fori_loop`` in interpret mode (much faster to compile on CPU)."""
  if unroll:
    for j in range(n):
      init = body(j, init)
    return init
  return lax.fori_loop(0, n, body, init)


def _pick_row(x, i):
  """Row ``i`` (static) of a 2-D value as a ``(1, n)`` value (masked sublane reduce)."""
  rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.sum(jnp.where(rows == i, x, 0.0), axis=0, keepdims=True)


def _pick_col(x, j):
  """Column ``j`` (static) of a 2-D value as an ``(m, 1)`` value."""
  cols = lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.sum(jnp.where(cols == j, x, 0.0), axis=1, keepdims=True)


def _kernel(*refs, kind, decay_on, strict, C, has_seg, has_s0, want_excl, cdt, unroll):
  it = iter(refs)
  q_ref, k_ref, v_ref = next(it), next(it), next(it)
  if kind == "scalar":
    gcol_ref, bcol_ref, rcol_ref = next(it), next(it), next(it)
  elif kind == "channel":
    g_ref, b_ref, r_ref = next(it), next(it), next(it)
    blc_ref = next(it) if decay_on == "key" else None
  if has_seg:
    scol_ref, srow_ref = next(it), next(it)
  s0_ref = next(it) if has_s0 else None
  o_ref, sf_ref = next(it), next(it)
  excl_ref = next(it) if want_excl else None
  st_ref = next(it)

  n = pl.program_id(2)

  @pl.when(n == 0)
  def _init():
    if has_s0:
      st_ref[...] = s0_ref[...].astype(F32)
    else:
      st_ref[...] = jnp.zeros(st_ref.shape, F32)

  s = st_ref[...]
  rcol = lax.broadcasted_iota(jnp.int32, (C, 1), 0)  # token index as a column
  if has_seg:
    scol = scol_ref[...]  # (C, 1) int32: resets so far in this chunk
    slast = jnp.sum(jnp.where(rcol == C - 1, scol, 0), axis=0, keepdims=True)  # (1, 1)
    first = scol == 0  # sees the carried state
    to_end = scol == slast  # reaches the chunk-end state
    keeps = slast == 0  # no reset inside the chunk
  else:
    first = to_end = keeps = None

  def wh(m, x, other):  # where with an optional mask
    return x if m is None else jnp.where(m, x, other)

  if kind in ("none", "scalar"):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    mask = rows > cols if strict else rows >= cols
    if has_seg:
      mask = mask & (scol == srow_ref[...])
    scores = _dot(q, k, cdt, trans_b=True)
    if kind == "none":
      scores = jnp.where(mask, scores, 0.0)
      q_in = wh(first, q.astype(F32), 0.0)
      k_out = wh(to_end, k.astype(F32), 0.0)
      decay = wh(keeps, jnp.ones((1, 1), F32), 0.0)
    else:
      gc, bc, rc = gcol_ref[...], bcol_ref[...], rcol_ref[...]  # (C, 1) each
      bl = jnp.sum(jnp.where(rcol == C - 1, bc, 0.0), axis=0, keepdims=True)  # (1, 1)
      # pair decays as segment sums sum_{j<m<=i} g_m (exact terms, not b_i - b_j)
      segsum = _dot((rows >= cols).astype(F32), jnp.where(rows > cols, gc, 0.0), F32)
      expo = jnp.where(mask, segsum, NEG_INF)
      if not strict:
        expo = jnp.where(rows == cols, 0.0, expo)
      scores = scores * jnp.exp(expo)
      q_in = q.astype(F32) * jnp.exp(wh(first, bc, NEG_INF))
      k_out = k.astype(F32) * jnp.exp(wh(to_end, rc, NEG_INF))
      decay = wh(keeps, jnp.exp(bl), 0.0)
    o = _dot(scores, v, cdt) + _dot(q_in, s, cdt)
    o_ref[...] = o.astype(o_ref.dtype)
    decay, lhs, rhs = decay, k_out, v
  elif decay_on == "key":
    decay, lhs, rhs = _channel_key_chunk(q_ref, k_ref, v_ref, g_ref, b_ref, r_ref, blc_ref,
                                         o_ref, s, C=C, strict=strict, has_seg=has_seg,
                                         scol_ref=scol_ref if has_seg else None,
                                         srow_ref=srow_ref if has_seg else None,
                                         to_end=to_end, keeps=keeps, cdt=cdt, unroll=unroll)
  else:
    decay, lhs, rhs = _channel_value_chunk(q_ref, k_ref, v_ref, g_ref, b_ref, r_ref, o_ref, s,
                                           C=C, strict=strict, has_seg=has_seg,
                                           scol_ref=scol_ref if has_seg else None,
                                           srow_ref=srow_ref if has_seg else None,
                                           to_end=to_end, keeps=keeps, cdt=cdt,
                                           unroll=unroll)
  # S_new = decay * S + lhs^T rhs; the last row of lhs / rhs is the last token's k v^T.
  s_new = decay * s + _dot(lhs, rhs, cdt, trans_a=True)
  st_ref[...] = s_new

  @pl.when(n == pl.num_programs(2) - 1)
  def _final():
    sf_ref[...] = s_new
    if want_excl:  # final state without the last token's k v^T (exact, for d log_decay)
      not_last = lax.broadcasted_iota(jnp.int32, (C, 1), 0) < C - 1
      excl_ref[...] = decay * s + _dot(jnp.where(not_last, lhs.astype(F32), 0.0), rhs, cdt,
                                       trans_a=True)


def _in_sub_chunk(g_i, L):
  """``sum_{start <= m <= i} g_m`` for the rows i of an (L, D) sub-chunk (exact terms)."""
  rows = lax.broadcasted_iota(jnp.int32, (L, L), 0)
  cols = lax.broadcasted_iota(jnp.int32, (L, L), 1)
  return _dot((rows >= cols).astype(F32), g_i, F32)


def _to_sub_chunk(g, r0, C):
  """``sum_{j < m < r0} g_m`` for every row j < r0 of a (C, D) chunk (exact terms; rows
  j >= r0 are 0 and must be masked)."""
  rows = lax.broadcasted_iota(jnp.int32, (C, C), 0)
  cols = lax.broadcasted_iota(jnp.int32, (C, C), 1)
  return _dot(((cols > rows) & (cols < r0)).astype(F32), g, F32)


def _pair_in_sub_chunk(g_i, jj, L):
  """``sum_{jj < m <= i} g_m`` for the rows i of an (L, D) sub-chunk (0 for i <= jj)."""
  rows_l = lax.broadcasted_iota(jnp.int32, (L, 1), 0)
  return _in_sub_chunk(jnp.where(rows_l > jj, g_i, 0.0), L)


def _sub_masks(I, C, L, strict, has_seg, scol_ref, srow_ref):
  """Masks for rows ``I*L .. I*L+L`` against all C columns: (earlier sub-chunks & same
  document, causal-in-sub-chunk & same document) plus the row block's reset counts."""
  r0 = I * L
  rows = lax.broadcasted_iota(jnp.int32, (L, C), 0) + r0
  cols = lax.broadcasted_iota(jnp.int32, (L, C), 1)
  same = None
  scol_i = None
  if has_seg:
    scol_i = scol_ref[pl.ds(r0, L), :]  # (L, 1)
    same = scol_i == srow_ref[...]
  before = cols < r0
  return before if same is None else (before & same), same, scol_i


def _channel_key_chunk(q_ref, k_ref, v_ref, g_ref, b_ref, r_ref, blc_ref, o_ref, s, *, C,
                       strict, has_seg, scol_ref, srow_ref, to_end, keeps, cdt, unroll):
  """Per-key-channel decays (GLA): ``A_ij = sum_d q_i[d] k_j[d] exp(sum_{j<m<=i} g_m[d])``."""
  L = SUB if C % SUB == 0 else C
  k = k_ref[...]
  v = v_ref[...]
  g = g_ref[...].astype(F32)  # (C, Dk)
  kf = k.astype(F32)
  rows_c = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
  for I in range(C // L):
    r0 = I * L
    q_i = q_ref[pl.ds(r0, L), :].astype(F32)
    k_i = k_ref[pl.ds(r0, L), :].astype(F32)
    b_i = b_ref[pl.ds(r0, L), :].astype(F32)
    g_i = g_ref[pl.ds(r0, L), :].astype(F32)
    off_mask, same, scol_i = _sub_masks(I, C, L, strict, has_seg, scol_ref, srow_ref)
    # carried state
    e_in = b_i if scol_i is None else jnp.where(scol_i == 0, b_i, NEG_INF)
    o_i = _dot(q_i * jnp.exp(e_in), s, cdt)
    if I > 0:  # earlier sub-chunks through the reference point at the sub-chunk start
      q_t = q_i * jnp.exp(_in_sub_chunk(g_i, L))
      k_t = kf * jnp.exp(jnp.where(rows_c < r0, _to_sub_chunk(g, r0, C), NEG_INF))
      a = jnp.where(off_mask, _dot(q_t, k_t, cdt, trans_b=True), 0.0)  # (L, C)
    else:
      a = jnp.zeros((L, C), F32)
    # inside the sub-chunk: exact element-wise decays, one key column at a time
    rows_l = lax.broadcasted_iota(jnp.int32, (L, 1), 0)
    cols = lax.broadcasted_iota(jnp.int32, (L, C), 1)

    def diag(jj, a, q_i=q_i, k_i=k_i, g_i=g_i, r0=r0):
      k_j = _pick_row(k_i, jj)
      causal = rows_l > jj if strict else rows_l >= jj
      expo = jnp.where(causal, _pair_in_sub_chunk(g_i, jj, L), NEG_INF)
      if not strict:
        expo = jnp.where(rows_l == jj, 0.0, expo)
      col = jnp.sum(q_i * k_j * jnp.exp(expo), axis=1, keepdims=True)  # (L, 1)
      return a + jnp.where(cols == r0 + jj, col, 0.0)

    a = _loop(L, diag, a, unroll)
    if same is not None:
      a = jnp.where(same, a, 0.0)
    o_i = o_i + _dot(a, v, cdt)
    o_ref[pl.ds(r0, L), :] = o_i.astype(o_ref.dtype)
  e_end = r_ref[...].astype(F32)  # (C, Dk) decay to the chunk end (exact suffix sums)
  if to_end is not None:
    e_end = jnp.where(to_end, e_end, NEG_INF)
  k_out = kf * jnp.exp(e_end)
  decay = jnp.exp(blc_ref[...].astype(F32))  # (Dk, 1)
  if keeps is not None:
    decay = jnp.where(keeps, decay, 0.0)
  return decay, k_out, v


def _channel_value_chunk(q_ref, k_ref, v_ref, g_ref, b_ref, r_ref, o_ref, s, *, C, strict,
                         has_seg, scol_ref, srow_ref, to_end, keeps, cdt, unroll):
  """Per-value-channel decays:
  ``o_i[e] = sum_j (q_i . k_j) v_j[e] exp(sum_{j<m<=i} g_m[e])``."""
  L = SUB if C % SUB == 0 else C
  k = k_ref[...]
  v = v_ref[...]
  g = g_ref[...].astype(F32)  # (C, Dv)
  vf = v.astype(F32)
  rows_c = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
  for I in range(C // L):
    r0 = I * L
    q_i = q_ref[pl.ds(r0, L), :]
    v_i = v_ref[pl.ds(r0, L), :].astype(F32)
    b_i = b_ref[pl.ds(r0, L), :].astype(F32)
    g_i = g_ref[pl.ds(r0, L), :].astype(F32)
    off_mask, same, scol_i = _sub_masks(I, C, L, strict, has_seg, scol_ref, srow_ref)
    m = _dot(q_i, k, cdt, trans_b=True)  # (L, C) plain scores q_i . k_j
    if same is not None:
      m = jnp.where(same, m, 0.0)
    e_in = b_i if scol_i is None else jnp.where(scol_i == 0, b_i, NEG_INF)
    o_i = jnp.exp(e_in) * _dot(q_i, s, cdt)
    if I > 0:  # earlier sub-chunks through the reference point at the sub-chunk start
      v_t = vf * jnp.exp(jnp.where(rows_c < r0, _to_sub_chunk(g, r0, C), NEG_INF))
      o_i = o_i + jnp.exp(_in_sub_chunk(g_i, L)) * _dot(jnp.where(off_mask, m, 0.0), v_t,
                                                         cdt)
    rows_l = lax.broadcasted_iota(jnp.int32, (L, 1), 0)

    def diag(jj, o_i, m=m, v_i=v_i, g_i=g_i, r0=r0):
      m_j = _pick_col(m, r0 + jj)  # (L, 1)
      v_j = _pick_row(v_i, jj)
      causal = rows_l > jj if strict else rows_l >= jj
      expo = jnp.where(causal, _pair_in_sub_chunk(g_i, jj, L), NEG_INF)
      if not strict:
        expo = jnp.where(rows_l == jj, 0.0, expo)
      return o_i + m_j * v_j * jnp.exp(expo)

    o_i = _loop(L, diag, o_i, unroll)
    o_ref[pl.ds(r0, L), :] = o_i.astype(o_ref.dtype)
  e_end = r_ref[...].astype(F32)  # (C, Dv) decay to the chunk end (exact suffix sums)
  if to_end is not None:
    e_end = jnp.where(to_end, e_end, NEG_INF)
  v_out = vf * jnp.exp(e_end)
  decay = jnp.exp(_pick_row(b_ref[...].astype(F32), C - 1))  # (1, Dv)
  if keeps is not None:
    decay = jnp.where(keeps, decay, 0.0)
  return decay, k, v_out


# Token-major tensors [B, T, H, D]. Mosaic blocks need their last two dims to be multiples
# of (8, 128) or whole, so a (C, D) block of one head is taken from the free view
# [B, T, H*D] when D % 128 == 0, and otherwise from a transposed copy [B, H, T, D].


def _lane_dense(d):
  return d % 128 == 0


def _tok_layout_shape(B, T, H, d):
  return (B, T, H * d) if _lane_dense(d) else (B, H, T, d)


def _to_tok_layout(x):
  B, T, H, d = x.shape
  return x.reshape(B, T, H * d) if _lane_dense(d) else jnp.transpose(x, (0, 2, 1, 3))


def _from_tok_layout(x, B, T, H, d):
  return x.reshape(B, T, H, d) if _lane_dense(d) else jnp.transpose(x, (0, 2, 1, 3))


def _tok_spec(C, d, r=1):
  """Chunk ``n`` of head ``h``; an input with ``H / r`` heads (grouped) serves head ``h``
  from its head ``h // r``."""
  sq = pl.squeezed
  hd = (lambda h: h) if r == 1 else (lambda h: lax.div(h, r))  # grid ids are >= 0
  if _lane_dense(d):
    return pl.BlockSpec((sq, C, d), lambda bi, h, n: (bi, n, hd(h)))
  return pl.BlockSpec((sq, sq, C, d), lambda bi, h, n: (bi, hd(h), n, 0))


def forward(q, k, v, decays, seg, s0, *, chunk, decay_on="key", strict=False, out_dtype=None,
            want_excl=False, interpret=False):
  """Run the kernel on prepared inputs.

  Args:
    q, k: ``[B, Tp, H, Dk]``; v: ``[B, Tp, H, Dv]``; ``Tp`` a multiple of ``chunk``. Any
      of the three may be grouped (fewer heads, dividing H = the most heads of the three):
      head ``h`` reads its head ``h // (H / heads)``, without a repeated copy in memory.
    decays: ``None`` or ``(g, b, r)``, each ``[B, Tp, H]`` or ``[B, Tp, H, D]`` fp32 (D = Dk
      for ``decay_on="key"``, Dv for ``"value"``): per-token log decays, their within-chunk
      inclusive prefix sums and exclusive suffix sums (sums of exactly those terms).
    seg: ``None`` or ``[B, Tp]`` int32 within-chunk reset counts.
    s0: ``None`` or ``[B, H, Dk, Dv]``.
    want_excl: also return the final state without the last token's ``k v^T``.
  Returns:
    ``o [B, Tp, H, Dv]`` (``out_dtype``), ``S_final [B, H, Dk, Dv]`` fp32 (and, with
    ``want_excl``, ``S_final - k_T v_T^T`` computed without cancellation).
  """
  B, Tp, _, Dk = q.shape
  H = group_heads(q, k, v)
  Dv = v.shape[-1]
  C = chunk
  N = Tp // C
  g, b, r = (None, None, None) if decays is None else decays
  kind = "none" if b is None else ("scalar" if b.ndim == 3 else "channel")
  cdt = q.dtype
  k = k.astype(cdt)
  v = v.astype(cdt)
  out_dtype = out_dtype or q.dtype
  sq = pl.squeezed

  in_specs = [_tok_spec(C, x.shape[-1], H // x.shape[2]) for x in (q, k, v)]
  args = [_to_tok_layout(x) for x in (q, k, v)]
  if kind == "scalar":
    col_spec = pl.BlockSpec((sq, sq, C, 1), lambda bi, h, n: (bi, h, n, 0))
    in_specs += [col_spec] * 3
    args += [jnp.transpose(x, (0, 2, 1))[..., None] for x in (g, b, r)]  # [B, H, Tp, 1]
  elif kind == "channel":
    d = b.shape[-1]
    in_specs += [_tok_spec(C, d)] * 3
    args += [_to_tok_layout(x) for x in (g, b, r)]
    if decay_on == "key":
      blc = jnp.transpose(b.reshape(B, N, C, H, d)[:, :, -1], (0, 2, 1, 3))[..., None]
      in_specs.append(pl.BlockSpec((sq, sq, sq, d, 1), lambda bi, h, n: (bi, h, n, 0, 0)))
      args.append(blc)  # [B, H, N, Dk, 1] chunk-end cumulative decay as a column
  has_seg = seg is not None
  if has_seg:
    seg = seg.astype(jnp.int32)
    in_specs += [pl.BlockSpec((sq, C, 1), lambda bi, h, n: (bi, n, 0)),
                 pl.BlockSpec((sq, sq, 1, C), lambda bi, h, n: (bi, n, 0, 0))]
    args += [seg[..., None], seg.reshape(B, N, 1, C)]
  has_s0 = s0 is not None
  state_spec = pl.BlockSpec((sq, sq, Dk, Dv), lambda bi, h, n: (bi, h, 0, 0))
  if has_s0:
    in_specs.append(state_spec)
    args.append(s0.astype(F32))
  kernel = functools.partial(_kernel, kind=kind, decay_on=decay_on, strict=strict, C=C,
                             has_seg=has_seg, has_s0=has_s0, want_excl=want_excl, cdt=cdt,
                             unroll=not interpret)
  state_shape = jax.ShapeDtypeStruct((B, H, Dk, Dv), F32)
  out_shape = [jax.ShapeDtypeStruct(_tok_layout_shape(B, Tp, H, Dv), out_dtype), state_shape]
  out_specs = [_tok_spec(C, Dv), state_spec]
  if want_excl:
    out_shape.append(state_shape)
    out_specs.append(state_spec)
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
      name=f"chunked_scan_{kind}_{decay_on}{'_strict' if strict else ''}",
  )(*args)
  return (_from_tok_layout(o, B, Tp, H, Dv), *states)
