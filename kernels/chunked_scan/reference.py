"""Pure-jnp forms of the gated linear recurrence: the per-token ground truth and the
chunked (XLA) form.

The recurrence, per batch row ``b`` and head ``h``::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        S_t: [Dk, Dv]
    o_t = S_t^T q_t

with ``S_{-1} = initial_state`` (zeros by default) and, where ``reset[t]`` is True,
``S_{t-1}`` replaced by zeros before token ``t`` is added (a document starts at ``t``).
``g`` is absent (plain linear attention, Katharopoulos et al. 2020), one value per head
(RetNet, Sun et al. 2023; Mamba2 / SSD, Dao & Gu 2024) or one value per key channel
(GLA, Yang et al. 2023).

The chunked form follows the chunkwise-parallel algorithm of Yang et al. 2023 (GLA,
Sec. 3) / Dao & Gu 2024 (SSD, "state passing"): inside a chunk of C tokens the output is
an attention-like masked matmul; across chunks a [Dk, Dv] state is carried by a scan.
Decays stay in log space: the exponent of a decay between two tokens of a chunk is a sum of
exactly the log decays in between (``kernels.common.segment_sum`` / ``suffix_sum``), not
a difference ``b_i - b_j`` of cumulative sums, which loses ``eps * |b|`` after a saturated
gate; every exponent is masked to ``-inf`` *before* ``exp`` wherever the pair is not causal
or crosses a reset, so no ``inf * 0`` appears in the forward or backward pass. For
per-key-channel decays the intra-chunk scores are built from sub-chunks of ``L`` tokens
(Yang et al. 2023, "secondary-level chunking"): pairs in different sub-chunks factor
through a reference point between them (both factors ``<= 1``), pairs inside a sub-chunk
use the exact element-wise decay.

Resets are folded in as masks, not as ``-inf`` log decays: with ``seg`` the within-chunk
count of resets, a pair (i, j<=i) interacts only when ``seg_i == seg_j``; the carried
state reaches token i only when ``seg_i == 0``; token j reaches the chunk-end state only
when ``seg_j == seg_last``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels.common import (pad_time, scan_chunks, scan_resets, segment_sum, suffix_sum,
                             unscan_chunks)

_HI = lax.Precision.HIGHEST
NEG_INF = -jnp.inf
PAIR_SUB_CHUNK = 16  # sub-chunk of pair_decays (per-head decays)
CAUSAL_TILE = 64  # per-head decays, chunks of >= 2 such tiles: see tiled_intra_chunk


def decay_kind(v, log_decay, dk) -> str:
  """``"none"``, ``"scalar"`` ([B,T,H]) or ``"channel"`` ([B,T,H,Dk]); validates shapes
  (``H`` is the number of heads of ``v``; ``dk`` the key dimension)."""
  if log_decay is None:
    return "none"
  B, T, H = v.shape[:3]
  if log_decay.shape == (B, T, H):
    return "scalar"
  if log_decay.shape == (B, T, H, dk):
    return "channel"
  raise ValueError(
      f"log_decay must have shape [B,T,H]={(B, T, H)} (one decay per head) or "
      f"[B,T,H,Dk]={(B, T, H, dk)} (one per key channel); got {log_decay.shape}.")


def check_inputs(q, k, v, log_decay=None, initial_state=None, reset=None):
  """Raise a ValueError naming the argument whose shape is wrong.

  ``q`` and ``k`` may have fewer heads ``G`` than ``v``'s ``H`` (grouped, as Mamba2's B/C
  groups or GQA): ``H % G == 0`` and head ``h`` reads group ``h // (H // G)``."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B,T,G,Dk]; got shape {q.shape}.")
  B, T, G, Dk = q.shape
  if k.shape != q.shape:
    raise ValueError(f"k must have q's shape {q.shape}; got {k.shape}.")
  if v.ndim != 4 or v.shape[:2] != (B, T):
    raise ValueError(f"v must be [B,T,H,Dv] with B,T={(B, T)}; got {v.shape}.")
  H, Dv = v.shape[2], v.shape[3]
  if H % G:
    raise ValueError(f"v's heads H={H} must be a multiple of q/k's heads G={G} (head h "
                     f"reads q/k group h // (H // G)); got q {q.shape}, v {v.shape}.")
  kind = decay_kind(v, log_decay, Dk)
  if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
    raise ValueError(
        f"initial_state must be [B,H,Dk,Dv]={(B, H, Dk, Dv)}; got {initial_state.shape}.")
  if reset is not None:
    if reset.shape != (B, T):
      raise ValueError(f"reset must be a [B,T]={(B, T)} bool array; got {reset.shape}.")
  return kind


def expand_groups(x, heads):
  """``[B,T,G,D]`` -> ``[B,T,heads,D]`` (group ``g`` serves heads ``g*R .. g*R+R-1``)."""
  g = x.shape[2]
  return x if g == heads else jnp.repeat(x, heads // g, axis=2)


# ----------------------------------------------------------------------------------
# Ground truth: one token at a time.
# ----------------------------------------------------------------------------------


def linear_recurrence_reference(q, k, v, log_decay=None, initial_state=None, reset=None):
  """Per-token ``lax.scan`` of the recurrence (fp32 state). Returns ``(o, final_state)``."""
  kind = check_inputs(q, k, v, log_decay, initial_state, reset)
  B, T, H, Dv = v.shape
  q, k = expand_groups(q, H), expand_groups(k, H)
  Dk = q.shape[-1]
  f32 = jnp.float32
  s0 = (jnp.zeros((B, H, Dk, Dv), f32) if initial_state is None
        else initial_state.astype(f32))
  tm = lambda x: jnp.swapaxes(x, 0, 1)  # time-major
  xs = {"q": tm(q.astype(f32)), "k": tm(k.astype(f32)), "v": tm(v.astype(f32))}
  if kind != "none":
    xs["g"] = tm(log_decay.astype(f32))
  if reset is not None:
    xs["r"] = tm(reset.astype(bool))

  def step(s, x):
    if kind == "scalar":
      s = s * jnp.exp(x["g"])[:, :, None, None]
    elif kind == "channel":
      s = s * jnp.exp(x["g"])[:, :, :, None]
    if "r" in x:
      s = jnp.where(x["r"][:, None, None, None], 0.0, s)
    s = s + x["k"][..., :, None] * x["v"][..., None, :]
    o = jnp.einsum("bhd,bhde->bhe", x["q"], s, precision=_HI)
    return s, o

  sf, o = lax.scan(step, s0, xs)
  return tm(o).astype(q.dtype), sf


# ----------------------------------------------------------------------------------
# Chunked form (the "xla" implementation).
# ----------------------------------------------------------------------------------


def sub_chunk_size(chunk_size: int) -> int:
  """Sub-chunk length used for per-channel decays (16, or the chunk if not divisible)."""
  return 16 if chunk_size % 16 == 0 else chunk_size


def linear_recurrence_chunked(q, k, v, log_decay=None, initial_state=None, reset=None,
                              chunk_size=64):
  """Chunkwise-parallel form, computed in fp32 with plain jnp / XLA ops.

  A ``jax.checkpoint``-ed ``lax.scan`` over chunks, each step doing one chunk's
  intra-chunk work and state update (:func:`_chunk_scan` for no / per-head decays; the
  same structure with :func:`_channel_scores` for per-key-channel decays). T need not be
  a multiple of ``chunk_size`` (zero-padded at the front).
  Differentiable with ordinary ``jax.grad`` (all masks are applied before ``exp``).
  Grouped q/k (fewer heads than v) are used as they are for no / per-head decays: the
  ``q k^T`` scores are computed once per group, and the per-head decays act on the
  scores, on v (to the chunk end) and on the output (from the chunk start).
  """
  kind = check_inputs(q, k, v, log_decay, initial_state, reset)
  B, T, G, Dk = q.shape
  H, Dv = v.shape[2], v.shape[3]
  C = int(chunk_size)
  if C < 1:
    raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
  f32 = jnp.float32
  out_dtype = q.dtype
  s0 = (jnp.zeros((B, H, Dk, Dv), f32) if initial_state is None
        else initial_state.astype(f32))
  if kind != "channel":
    return _chunk_scan(q, k, v, log_decay, s0, reset, C, kind)

  # Per-key-channel decays (GLA): a checkpointed scan over chunks too (see _chunk_scan),
  # each step the GLA chunk form on one chunk (a singleton chunk axis).
  xs = {"q": scan_chunks(expand_groups(q, H).astype(f32), C),
        "k": scan_chunks(expand_groups(k, H).astype(f32), C),
        "v": scan_chunks(v.astype(f32), C), "g": scan_chunks(log_decay.astype(f32), C)}
  if reset is not None:
    xs["r"] = scan_resets(reset, C)

  @jax.checkpoint
  def step(s, x):  # s [B,H,Dk,Dv]; q, k, g [B,H,1,C,Dk]; v [B,H,1,C,Dv]
    qc, kc, vc, gc = x["q"], x["k"], x["v"], x["g"]
    seg = (jnp.cumsum(x["r"], axis=-1)[:, None, None] if "r" in x
           else jnp.zeros((B, 1, 1, C), jnp.int32))  # [B,1,1,C]
    first = seg == 0  # token sees the carried state
    to_end = seg == seg[..., -1:]  # token reaches the chunk-end state
    keeps = seg[..., -1] == 0  # [B,1,1] no reset inside the chunk
    b = jnp.cumsum(gc, axis=3)  # inclusive prefix sums: decay from the chunk start
    q_in = qc * jnp.exp(jnp.where(first[..., None], b, NEG_INF))
    k_out = kc * jnp.exp(jnp.where(to_end[..., None], suffix_sum(gc, axis=-2), NEG_INF))
    chunk_decay = jnp.where(keeps[..., None], jnp.exp(b[..., -1, :]), 0.0)[..., None]
    scores = _channel_scores(qc, kc, gc, seg, sub_chunk_size(C))
    o = (jnp.einsum("bhncs,bhnse->bhnce", scores, vc, precision=_HI)
         + jnp.einsum("bhncd,bhde->bhnce", q_in, s, precision=_HI))
    u = jnp.einsum("bhncd,bhnce->bhde", k_out, vc, precision=_HI)
    return chunk_decay[:, :, 0] * s + u, o[:, :, 0]

  sf, o = lax.scan(step, s0, xs)  # o: [N,B,H,C,Dv]
  return unscan_chunks(o, T).astype(out_dtype), sf


def _chunk_scan(q, k, v, log_decay, s0, reset, C, kind):
  """The no-decay / per-head-decay chunked form as a ``lax.scan`` over chunks.

  Each step takes one chunk of C tokens and the carried ``[B, G, R, Dk, Dv]`` state and
  does all of that chunk's work: the masked ``q k^T`` scores (once per group of grouped
  q/k) times the per-head pair decays, the intra-chunk output, the carried state's
  contribution, and the state update. The step is ``jax.checkpoint``-ed, so the backward
  recomputes one chunk at a time from the saved chunk-entry states. Compared with
  batching the intra-chunk work over all chunks at once, every ``[H, C, C]`` temporary
  (scores, decays, their cotangents) is built and consumed while it is small enough to
  stay in cache. The chunks are laid out head-major (``[N, B, G, (R,) C, D]``, one
  transpose of each input and of the output) so that every matmul in the step has its
  batch axes leading and every per-step slice and cotangent write is contiguous. Per-head
  decays in chunks of at least two ``CAUSAL_TILE``s build the intra-chunk output from the
  lower causal tiles only (:func:`tiled_intra_chunk`).

  Measured on the 2-core CPU (fwd+bwd, both forms in one process, session 10): B=1,
  T=16384, H=4, D=64, chunk 64, per-head decays 201 -> 96 ms; Mamba2's SSD shape (T=4096,
  H=8, G=1, D=64, chunk 256) 74 -> 49 ms; per-key-channel decays (GLA; the step in
  :func:`linear_recurrence_chunked`), T=16384, H=4, D=64, chunk 64: 941 -> 441 ms. Outputs
  and gradients were bit-identical to the batched form in all three cases (the same sums
  in the same order).
  """
  B, T, G, Dk = q.shape
  H, Dv = v.shape[2], v.shape[3]
  R = H // G
  N = -(-T // C)
  Tp = N * C
  f32 = jnp.float32

  def chunk_major(x, fill=0):  # [B,T,G,...] -> [N,B,G,C,...], front-padded
    x = pad_time(x, Tp, fill)
    x = x.reshape((B, N, C) + x.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

  xs = {"q": chunk_major(q.astype(f32)), "k": chunk_major(k.astype(f32)),
        "v": jnp.moveaxis(chunk_major(v.astype(f32).reshape(B, T, G, R, Dv)), 3, 4)}
  if kind == "scalar":
    xs["g"] = jnp.moveaxis(chunk_major(log_decay.astype(f32).reshape(B, T, G, R)), 3, 4)
  if reset is not None:
    xs["r"] = scan_resets(reset, C)
  causal = jnp.tril(jnp.ones((C, C), bool))
  tiled = kind == "scalar" and C % CAUSAL_TILE == 0 and C >= 2 * CAUSAL_TILE

  @jax.checkpoint
  def step(s, x):  # s: [B,G,R,Dk,Dv]; q, k: [B,G,C,Dk]; v: [B,G,R,C,Dv]; g: [B,G,R,C]
    qn, kn, vn = x["q"], x["k"], x["v"]
    if "r" in x:
      seg = jnp.cumsum(x["r"], axis=-1)[:, None, None]  # [B,1,1,C] resets so far
      mask = causal & (seg[..., :, None] == seg[..., None, :])  # [B,1,1,C,C]
      first = seg == 0  # token sees the carried state
      to_end = seg == seg[..., -1:]  # token reaches the chunk-end state
      keeps = seg[..., -1] == 0  # [B,1,1]: no reset inside the chunk
    else:
      mask = causal
      first = to_end = jnp.ones((1, 1, 1, C), bool)
      keeps = jnp.ones((1, 1, 1), bool)
    if kind == "none":
      scores = jnp.einsum("bgcd,bgsd->bgcs", qn, kn, precision=_HI)[:, :, None]
      a = jnp.where(mask, scores, 0.0)  # [B,G,1,C,C]
      v_out = jnp.where(to_end[..., None], vn, 0.0)
      out_scale = first.astype(f32)
      chunk_decay = keeps.astype(f32)
    else:
      gn = x["g"]
      b = jnp.cumsum(gn, axis=-1)  # inclusive prefix sums: decay from the chunk start
      if not tiled:
        scores = jnp.einsum("bgcd,bgsd->bgcs", qn, kn, precision=_HI)[:, :, None]
        a = scores * pair_decays(gn, mask)  # [B,G,R,C,C]
      v_out = vn * jnp.exp(jnp.where(to_end, suffix_sum(gn), NEG_INF))[..., None]
      out_scale = jnp.exp(jnp.where(first, b, NEG_INF))  # [B,G,R,C]
      chunk_decay = jnp.where(keeps, jnp.exp(b[..., -1]), 0.0)  # [B,G,R]
    if tiled:
      o = tiled_intra_chunk(qn, kn, vn, gn, seg if "r" in x else None, CAUSAL_TILE)
    else:
      o = jnp.einsum("bgrcs,bgrse->bgrce", jnp.broadcast_to(a, (B, G, R, C, C)), vn,
                     precision=_HI)
    o = o + jnp.einsum("bgcd,bgrde->bgrce", qn, s, precision=_HI) * out_scale[..., None]
    u = jnp.einsum("bgcd,bgrce->bgrde", kn, v_out, precision=_HI)
    return chunk_decay[..., None, None] * s + u, o

  sf, o = lax.scan(step, s0.reshape(B, G, R, Dk, Dv), xs)  # o: [N,B,G,R,C,Dv]
  o = jnp.transpose(o, (1, 0, 4, 2, 3, 5)).reshape(B, Tp, H, Dv)[:, Tp - T:]
  return o.astype(q.dtype), sf.reshape(B, H, Dk, Dv)


def tiled_intra_chunk(q, k, v, g, seg, t):
  """The intra-chunk output ``o_i = sum_{j <= i} (q_i . k_j) exp(sum_{j < m <= i} g_m) v_j``
  of one chunk with per-head decays, from its lower-triangular tiles of ``t`` tokens only.

  ``q, k``: ``[B, G, C, Dk]`` (grouped); ``v``: ``[B, G, R, C, Dv]``; ``g``: ``[B, G, R, C]``;
  ``seg``: ``[B, 1, 1, C]`` within-chunk reset counts (inclusive cumsum) or ``None``.
  Returns ``[B, G, R, C, Dv]``.

  Tiles on the diagonal are the masked form on ``t x t`` blocks (``pair_decays`` with
  ``sub = t``, i.e. ``exp`` of the exact segment sums: on a 64-token tile that measured
  10% faster over the whole op than sub-chunks of 16). Row
  tile ``I`` (tokens ``[L, L + t)``, ``L = I t``) sees every earlier token ``j < L``
  through the tile boundary: the decay factors exactly as ``exp(sum_{L <= m <= i} g_m)``
  (a cumsum inside tile ``I``) times ``exp(sum_{j < m < L} g_m)`` (a suffix sum over the
  first ``L`` tokens), each a sum of exactly the gates in between and ``<= 1`` for
  ``g <= 0`` (no difference of cumulative sums, as everywhere in this module); a reset
  between ``j`` and ``i`` lies in one of the two ranges and masks that factor. So the
  ``[t, L]`` block of scores is one matmul shared by the heads of a group, and the decays
  scale ``v`` and the output instead of a ``[R, t, L]`` array: no element-wise pass over
  the chunk's ``[R, C, C]`` decays, and the upper tiles (zero) are never computed. The
  matmul work of the quadratic part drops to ``(T + 1) / (2 T)`` of the full ``C x C`` form
  (``T = C / t`` tiles; 10/16 at ``C = 256``). This is still the chunk-``C`` algorithm (the
  state is carried between chunks of ``C``, and every pair inside a chunk is a score); it
  is how Mamba2's own kernels skip the causal upper blocks of a chunk.

  Measured (session 11, fwd+bwd, B=1, T=4096, H=8, G=1, D=64, chunk 256, one process):
  see docs/performance.md ("What made things faster").
  """
  B, G, C, Dk = q.shape
  R, Dv = v.shape[2], v.shape[4]
  T = C // t
  tri = jnp.tril(jnp.ones((t, t), bool))
  if seg is None:
    mask = tri
  else:
    seg_t = seg.reshape(B, 1, 1, T, t)
    mask = tri & (seg_t[..., :, None] == seg_t[..., None, :])  # [B,1,1,T,t,t]
  gt = g.reshape(B, G, R, T, t)
  scores = jnp.einsum("bgnid,bgnjd->bgnij", q.reshape(B, G, T, t, Dk),
                      k.reshape(B, G, T, t, Dk), precision=_HI)[:, :, None]
  o = jnp.einsum("bgrnij,bgrnje->bgrnie", scores * pair_decays(gt, mask, t),
                 v.reshape(B, G, R, T, t, Dv), precision=_HI)  # diagonal tiles
  head = jnp.cumsum(gt, axis=-1)  # [B,G,R,T,t]: from the start of tile I to i, inclusive
  below = [jnp.zeros((B, G, R, t, Dv), o.dtype)]  # tile 0 has no earlier tokens
  for i in range(1, T):
    lo = i * t
    w, h = suffix_sum(g[..., :lo]), head[..., i, :]  # [B,G,R,lo], [B,G,R,t]
    if seg is not None:
      w = jnp.where(seg[..., :lo] == seg[..., lo - 1:lo], w, NEG_INF)  # no reset in (j, lo)
      h = jnp.where(seg[..., lo:lo + t] == seg[..., lo - 1:lo], h, NEG_INF)  # none in [lo, i]
    blk = jnp.einsum("bgid,bgjd->bgij", q[:, :, lo:lo + t], k[:, :, :lo], precision=_HI)
    y = jnp.einsum("bgij,bgrje->bgrie", blk, v[..., :lo, :] * jnp.exp(w)[..., None],
                   precision=_HI)
    below.append(y * jnp.exp(h)[..., None])
  return o.reshape(B, G, R, C, Dv) + jnp.concatenate(below, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pair_decays(g, mask, sub=None):
  """``D[..., i, j] = exp(sum_{j < m <= i} g_m)`` where ``mask`` (which must lie in the lower
  triangle, diagonal included), else 0; ``g``: ``[..., C]``, ``mask`` broadcastable to
  ``g.shape + (C,)`` (and no larger: ``D`` has that shape).

  Forward in O(C^2) with few ``exp``s: cut the chunk into sub-chunks of ``sub`` (default
  :data:`PAIR_SUB_CHUNK`) tokens
  (chunks of at most ``2 * sub`` tokens, or not a multiple of it, use
  :func:`kernels.common.segment_sum` directly). A pair in sub-chunks ``J < I`` has the
  decay ``exp(head_i) * exp(mid_IJ) * exp(tail_j)``: from the start of ``I`` to ``i``
  (``cumsum``), the whole sub-chunks strictly between (a segment sum over the sub-chunk
  totals), and from ``j`` (exclusive) to the end of ``J`` (``suffix_sum``). Each exponent
  is a sum of exactly the gates in between, never a difference of cumulative sums
  (``kernels.common``), and for gates <= 0 each factor is <= 1, so a factor underflows
  only where the product does. Pairs inside one sub-chunk use ``exp(segment_sum)``. So
  ``exp`` runs on O(C * sub) values instead of C^2 (on this CPU an exp costs ~15x a
  multiply).

  The backward is O(C^2) and reduction-light: with ``dE = dD * D`` (zero on the diagonal,
  whose exponent is the constant 0), ``dL/dg_m = sum_{i >= m, j < m} dE_ij =
  sum_{i >= m} (rowsum_i - colsum_i)`` of the strictly lower triangle.
  """
  C, sub = g.shape[-1], sub or PAIR_SUB_CHUNK
  if C <= 2 * sub or C % sub:
    return jnp.exp(jnp.where(mask, segment_sum(g), NEG_INF))
  S = C // sub
  gs = g.reshape(g.shape[:-1] + (S, sub))
  head = jnp.exp(jnp.cumsum(gs, axis=-1))  # [..., S, sub]
  tail = jnp.exp(suffix_sum(gs))  # [..., S, sub]
  tot = jnp.sum(gs, axis=-1)  # [..., S]
  i_, m_ = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
  # mid[I, J] = sum_{J < M < I} tot_M  (a masked ones-matmul over the S sub-chunks)
  mid = jnp.exp(jnp.einsum("...im,mj->...ij", jnp.where(m_ < i_, tot[..., None, :], 0.0),
                           (m_.T > m_).astype(g.dtype), precision=_HI))
  off = (head[..., :, :, None, None] * mid[..., :, None, :, None]
         * tail[..., None, None, :, :])  # [..., S(I), sub(i), S(J), sub(j)]
  tri = jnp.tril(jnp.ones((sub, sub), bool))
  inside = jnp.exp(jnp.where(tri, segment_sum(gs), NEG_INF))  # [..., S, sub, sub]
  same = jnp.eye(S, dtype=bool)[:, None, :, None]
  d = jnp.where(same, inside[..., :, :, None, :], off).reshape(g.shape[:-1] + (C, C))
  return jnp.where(mask, d, 0.0)


def _pair_decays_fwd(g, mask, sub):
  d = pair_decays(g, mask, sub)
  return d, d


def _pair_decays_bwd(sub, d, dd):
  del sub
  de = jnp.where(jnp.eye(d.shape[-1], dtype=bool), 0.0, dd * d)
  diff = jnp.sum(de, axis=-1) - jnp.sum(de, axis=-2)  # rowsum_i - colsum_i: g's shape
  return jnp.flip(jnp.cumsum(jnp.flip(diff, -1), axis=-1), -1), None


pair_decays.defvjp(_pair_decays_fwd, _pair_decays_bwd)


def _channel_scores(qc, kc, g, seg, L):
  """Intra-chunk scores ``A_ij = sum_d q_i[d] k_j[d] exp(sum_{j<m<=i} g_m[d])`` (j <= i,
  same segment), stable for arbitrarily strong per-channel decays.

  Pairs in different sub-chunks (J < I) factor through the reference point at the start
  of sub-chunk I: ``exp(sum_{start_I <= m <= i} g_m) * exp(sum_{j < m < start_I} g_m)``,
  both exponents <= 0. Pairs inside one sub-chunk are computed element-wise on an
  [L, L, Dk] tensor. Every exponent is a sum of exactly the gates in between (see
  ``kernels.common``), never a difference of cumulative sums.
  """
  B, H, N, C, Dk = qc.shape
  S = C // L
  f32 = jnp.float32
  gs = g.reshape(B, H, N, S, L, Dk)
  qs = qc.reshape(B, H, N, S, L, Dk)
  segs = seg.reshape(seg.shape[:3] + (S, L))  # [B,1,N,S,L]
  q_t = qs * jnp.exp(jnp.cumsum(gs, axis=-2))  # decay from the sub-chunk start to i
  start = (jnp.arange(S) * L)[:, None, None]
  j, m = jnp.arange(C)[None, :, None], jnp.arange(C)[None, None, :]
  between = ((j < m) & (m < start)).astype(f32)  # [S, C(j), C(m)]
  to_ref = jnp.einsum("sjm,bhnmd->bhnsjd", between, g, precision=_HI)  # [B,H,N,S,C,Dk]
  before = jnp.arange(C)[None, :] < (jnp.arange(S) * L)[:, None]  # [S,C]: j < start_I
  k_t = kc[..., None, :, :] * jnp.exp(jnp.where(before[:, :, None], to_ref, NEG_INF))
  a_off = jnp.einsum("bhnsld,bhnscd->bhnslc", q_t, k_t, precision=_HI)  # [B,H,N,S,L,C]
  same_off = segs[..., :, None] == seg[..., None, None, :]  # [B,1,N,S,L,C]
  a_off = jnp.where(same_off, a_off, 0.0)
  # Diagonal sub-blocks: exact element-wise decays.
  tri = jnp.tril(jnp.ones((L, L), bool))
  same_d = segs[..., :, None] == segs[..., None, :]  # [B,1,N,S,L,L]
  m = (tri & same_d)[..., None]
  diag = jnp.eye(L, dtype=bool)[:, :, None]
  inside = jnp.moveaxis(segment_sum(jnp.moveaxis(gs, -1, -2)), -3, -1)  # [B,H,N,S,L,L,Dk]
  dec = jnp.exp(jnp.where(diag, 0.0, jnp.where(m, inside, NEG_INF)))
  ks = kc.reshape(B, H, N, S, L, Dk)
  a_diag = jnp.einsum("bhnsid,bhnsjd,bhnsijd->bhnsij", qs, ks, dec, precision=_HI)
  eye = jnp.eye(S, dtype=f32)
  a_diag = jnp.einsum("bhnsij,st->bhnsitj", a_diag, eye).reshape(B, H, N, S, L, C)
  return (a_off + a_diag).reshape(B, H, N, C, C)
