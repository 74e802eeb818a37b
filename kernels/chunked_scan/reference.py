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
exactly the log decays in between (``kernels._common.segment_sum`` / ``suffix_sum``), not
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

import jax
import jax.numpy as jnp
from jax import lax

from kernels._common import pad_time, segment_sum, suffix_sum

_HI = lax.Precision.HIGHEST
NEG_INF = -jnp.inf


def decay_kind(q, log_decay) -> str:
  """``"none"``, ``"scalar"`` ([B,T,H]) or ``"channel"`` ([B,T,H,Dk]); validates shapes."""
  if log_decay is None:
    return "none"
  B, T, H, Dk = q.shape
  if log_decay.shape == (B, T, H):
    return "scalar"
  if log_decay.shape == (B, T, H, Dk):
    return "channel"
  raise ValueError(
      f"log_decay must have shape [B,T,H]={(B, T, H)} (one decay per head) or "
      f"[B,T,H,Dk]={(B, T, H, Dk)} (one per key channel); got {log_decay.shape}.")


def check_inputs(q, k, v, log_decay=None, initial_state=None, reset=None):
  """Raise a ValueError naming the argument whose shape is wrong."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B,T,H,Dk]; got shape {q.shape}.")
  B, T, H, Dk = q.shape
  if k.shape != q.shape:
    raise ValueError(f"k must have q's shape {q.shape}; got {k.shape}.")
  if v.ndim != 4 or v.shape[:3] != (B, T, H):
    raise ValueError(f"v must be [B,T,H,Dv] with B,T,H={(B, T, H)}; got {v.shape}.")
  Dv = v.shape[-1]
  kind = decay_kind(q, log_decay)
  if initial_state is not None and initial_state.shape != (B, H, Dk, Dv):
    raise ValueError(
        f"initial_state must be [B,H,Dk,Dv]={(B, H, Dk, Dv)}; got {initial_state.shape}.")
  if reset is not None:
    if reset.shape != (B, T):
      raise ValueError(f"reset must be a [B,T]={(B, T)} bool array; got {reset.shape}.")
  return kind


# ----------------------------------------------------------------------------------
# Ground truth: one token at a time.
# ----------------------------------------------------------------------------------


def linear_recurrence_reference(q, k, v, log_decay=None, initial_state=None, reset=None):
  """Per-token ``lax.scan`` of the recurrence (fp32 state). Returns ``(o, final_state)``."""
  kind = check_inputs(q, k, v, log_decay, initial_state, reset)
  B, T, H, Dk = q.shape
  Dv = v.shape[-1]
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

  Intra-chunk work is batched over all chunks; only the [Dk, Dv] state hand-off between
  chunks is a ``lax.scan``. T need not be a multiple of ``chunk_size`` (zero-padded at the front).
  Differentiable with ordinary ``jax.grad`` (all masks are applied before ``exp``).
  """
  kind = check_inputs(q, k, v, log_decay, initial_state, reset)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
  B, T, H, Dk = q.shape
  Dv = v.shape[-1]
  C = int(chunk_size)
  N = -(-T // C)
  Tp = N * C
  f32 = jnp.float32
  out_dtype = q.dtype

  def to_chunks(x):  # [B,T,H,...] -> [B,H,N,C,...]
    x = pad_time(x.astype(f32), Tp)
    x = x.reshape((B, N, C) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)

  qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
  if kind == "none":
    gc = jnp.zeros((B, H, N, C), f32)
  else:
    gc = to_chunks(log_decay)  # [B,H,N,C] or [B,H,N,C,Dk]
  b = jnp.cumsum(gc, axis=3)  # inclusive prefix sums: decay from the chunk start

  if reset is not None:
    r = pad_time(reset.astype(jnp.int32), Tp).reshape(B, N, C)
    seg = jnp.cumsum(r, axis=-1)[:, None]  # [B,1,N,C]
  else:
    seg = jnp.zeros((B, 1, N, C), jnp.int32)
  first = seg == 0  # token sees the carried state
  last_seg = seg[..., -1:]
  to_end = seg == last_seg  # token reaches the chunk-end state
  keeps = last_seg[..., 0] == 0  # [B,1,N] no reset inside the chunk
  causal = jnp.tril(jnp.ones((C, C), bool))
  same = seg[..., :, None] == seg[..., None, :]  # [B,1,N,C,C]

  if kind == "channel":
    bl = b[..., -1, :]  # [B,H,N,Dk] sum of the chunk's gates
    q_in = qc * jnp.exp(jnp.where(first[..., None], b, NEG_INF))
    k_out = kc * jnp.exp(jnp.where(to_end[..., None], suffix_sum(gc, axis=-2), NEG_INF))
    chunk_decay = jnp.where(keeps[..., None], jnp.exp(bl), 0.0)[..., None]
    scores = _channel_scores(qc, kc, gc, seg, sub_chunk_size(C))
  else:
    bl = b[..., -1]  # [B,H,N]
    q_in = qc * jnp.exp(jnp.where(first, b, NEG_INF))[..., None]
    k_out = kc * jnp.exp(jnp.where(to_end, suffix_sum(gc), NEG_INF))[..., None]
    chunk_decay = jnp.where(keeps, jnp.exp(bl), 0.0)[..., None, None]
    mask = causal & same
    eye = jnp.eye(C, dtype=bool)
    decay = jnp.exp(jnp.where(eye, 0.0, jnp.where(mask, segment_sum(gc), NEG_INF)))
    scores = jnp.einsum("bhncd,bhnsd->bhncs", qc, kc, precision=_HI) * decay

  o_intra = jnp.einsum("bhncs,bhnse->bhnce", scores, vc, precision=_HI)
  # Per-chunk state contributions, then the sequential hand-off across chunks.
  u = jnp.einsum("bhncd,bhnce->bhnde", k_out, vc, precision=_HI)  # [B,H,N,Dk,Dv]
  s0 = (jnp.zeros((B, H, Dk, Dv), f32) if initial_state is None
        else initial_state.astype(f32))

  def pass_state(s, xs):
    dec, un = xs
    return dec * s + un, s

  sf, s_in = lax.scan(pass_state, s0, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(u, 2, 0)))
  s_in = jnp.moveaxis(s_in, 0, 2)  # state entering each chunk, [B,H,N,Dk,Dv]
  o_inter = jnp.einsum("bhncd,bhnde->bhnce", q_in, s_in, precision=_HI)
  o = (o_intra + o_inter)  # [B,H,N,C,Dv]
  o = jnp.moveaxis(o, 1, 3).reshape(B, Tp, H, Dv)[:, Tp - T:]
  return o.astype(out_dtype), sf


def _channel_scores(qc, kc, g, seg, L):
  """Intra-chunk scores ``A_ij = sum_d q_i[d] k_j[d] exp(sum_{j<m<=i} g_m[d])`` (j <= i,
  same segment), stable for arbitrarily strong per-channel decays.

  Pairs in different sub-chunks (J < I) factor through the reference point at the start
  of sub-chunk I: ``exp(sum_{start_I <= m <= i} g_m) * exp(sum_{j < m < start_I} g_m)``,
  both exponents <= 0. Pairs inside one sub-chunk are computed element-wise on an
  [L, L, Dk] tensor. Every exponent is a sum of exactly the gates in between (see
  ``kernels._common``), never a difference of cumulative sums.
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
