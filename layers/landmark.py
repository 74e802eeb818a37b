"""Landmark attention: grouped-softmax training, top-k block retrieval at inference.

Reference (the math only; the code is lcm's own): Mohtashami & Jaggi 2023, "Landmark
Attention: Random-Access Infinite Context Length for Transformers"; facts checked against
epfml/landmark-attention (``models/landmark.py`` grouped softmax, ``models/caches/
mem_cache.py`` retrieval and its position mapping).

Blocks and landmark tokens. A document is cut into blocks of ``block_size`` tokens whose
*last* token is the block's landmark: token ``t`` (position ``p`` inside its document) is a
landmark iff ``p % block_size == block_size - 1``. The mixer does not insert tokens; the
model does (``lcm/model.py`` puts a learned landmark embedding after every
``block_size - 1`` real tokens and drops the landmark positions' outputs, the paper's
``MemLMCache`` / ``get_final_logits``). Used alone, the mixer simply treats every
``block_size``-th token as a landmark.

Grouped softmax (training, and inference up to ``exact_len`` tokens). Query ``i`` in block
``b`` with scores ``s_ij`` (RoPE, scaled dot product):

    top group  G_i = {non-landmark tokens of block b, j <= i} + {landmarks L_c, c < b}
    w_ij = exp(s_ij - lse_{G_i})                                   j in block b
    w_ij = exp(s_{i,L_c} - lse_{G_i}) * exp(s_ij - lse_{c,i})      j in block c < b, not L_c
    w_ij = 0                                                       j a landmark
    y_i  = sum_j w_ij v_j

where ``lse_{c,i}`` is the log-sum-exp of ``s_i.`` over block c's non-landmark tokens: the
landmark's probability in the top group gates its block, whose tokens share it by their own
softmax. Every weight row sums to 1. The current block's landmark is never attended (also
not by the landmark token itself).

Top-k retrieval (inference beyond ``exact_len`` tokens). Query ``i`` of block ``b`` ranks
the earlier blocks by ``q_i . k_{L_c}`` (per head, per token -- the reference's
``per_token_and_head``), keeps the ``top_k`` best, and evaluates the grouped softmax above
over its own block plus the retrieved blocks only. Positions follow the reference's
mapping: the retrieved blocks, in their original order, are placed right before the current
block (slot ``b - n + r`` for the r-th of ``n`` retrieved), so no query ever sees a relative
distance beyond ``(top_k + 1) * block_size`` -- which is why a model trained on short
sequences reads arbitrarily long ones. For ranking, every landmark is rotated to the slot
just before the current block (all candidates at the same distance). With ``top_k`` >= the
number of earlier blocks, retrieval is exactly the grouped softmax (tested).

Forms (the mixer contract):
  * ``y = lm(x, segment_ids)``: queries at document positions ``< exact_len`` use the exact
    grouped softmax (dense [T, T] scores, the training path); later queries retrieve, one
    query block at a time (``lax.map``), O(T * (T / block_size + top_k * block_size)).
    Packed rows (``segment_ids``) always use the exact form.
  * ``state = lm.init_state(batch, dtype, max_len=...)``: a KV cache of ``max_len`` slots
    holding un-rotated keys (slot = position); optionally in host memory
    (``kv_memory="pinned_host"``, JAX memory kinds): each step then moves only the landmark
    keys, the current block and the retrieved blocks to the device.
  * ``y, state = lm.step(x, state)``: token by token (``lax.scan``); the same exact /
    retrieval rule per position, so step, chunked step and the parallel form agree.

The block-sparse kernel (``kernels.block_sparse``) takes one key-block list per *query
block*; landmark retrieval selects per *token* (a query block's union would let later
queries influence earlier ones' choice of blocks), so the retrieval path gathers blocks
per token instead; see docs/design.md and docs/known-issues.md ("Landmark attention").
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.attention import Attention, AttentionConfig, rope
from layers.common import ConfigError, check, is_int, segment_positions
from layers.landmark_tokens import LandmarkTokens

_NEG = -1e30
KV_MEMORY = ("device", "pinned_host")


@dataclasses.dataclass(frozen=True)
class LandmarkConfig(AttentionConfig):
  """Hyper-parameters of :class:`Landmark` (plus those of :class:`AttentionConfig`).

  block_size: tokens per block, the landmark included (the paper: 50 = 49 + 1). >= 2.
  top_k: blocks retrieved per token and head beyond ``exact_len`` (the paper's passkey
    test retrieves 4 or 5).
  exact_len: document positions below this use the exact grouped softmax; later ones
    retrieve. A multiple of ``block_size``; 0 = always retrieve.
  kv_memory: where ``init_state`` keeps the KV cache: "device" or "pinned_host".
  keep_previous: when retrieving, the block just before the query's is always one of its
    ``top_k`` (selected whatever its landmark score; its weight is still the grouped
    softmax's). A token early in its block otherwise sees its recent past only through
    retrieval; the reference's inference runs the current segment with full local attention.
  (``window`` must stay None.)
  """

  block_size: int = 32
  top_k: int = 4
  exact_len: int = 512
  max_len: int = 4096
  kv_memory: str = "device"
  keep_previous: bool = False

  def validate(self, d_model: int) -> None:
    super().validate(d_model)
    check(self.window is None, "window", f"must be None for landmark (got {self.window!r})")
    check(is_int(self.block_size) and self.block_size >= 2, "block_size",
          f"must be an integer >= 2 (got {self.block_size!r})")
    check(is_int(self.top_k) and self.top_k >= 1, "top_k",
          f"must be an integer >= 1 (got {self.top_k!r})")
    check(is_int(self.exact_len) and self.exact_len >= 0
          and self.exact_len % self.block_size == 0, "exact_len",
          f"must be a non-negative multiple of block_size={self.block_size} "
          f"(got {self.exact_len!r})")
    check(isinstance(self.keep_previous, bool), "keep_previous",
          f"must be True or False (got {self.keep_previous!r})")
    check(self.kv_memory in KV_MEMORY, "kv_memory",
          f"must be one of {KV_MEMORY} (got {self.kv_memory!r})")


def _lse(s, mask, axis=-1):
  """Masked log-sum-exp (finite -1e30 where the mask is empty). Entries outside the mask
  never reach exp: above the max they would overflow, and where(mask, inf, 0) has a NaN
  gradient."""
  m = jnp.max(jnp.where(mask, s, _NEG), axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(m > _NEG / 2, m, 0.0))
  e = _exp_where(mask, s - m).sum(axis=axis, keepdims=True)
  return jnp.where(e > 0, jnp.log(jnp.maximum(e, 1e-38)) + m, _NEG)


def _exp_where(mask, x):
  """exp(x) where mask, else 0; masked entries never reach exp (no inf * 0 in gradients)."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _segment_lse(s, grp, group, bs):
  """Per-block log-sum-exp of each query's scores over the block's non-landmark keys, and
  each key's landmark score, for arbitrary block layouts (``group``: first key index of each
  key's block): segment ops over the key axis."""
  tk = s.shape[-1]
  # Per-block log-sum-exp of each query's scores: segment ops over the key axis.
  st = jnp.moveaxis(jnp.where(grp, s, _NEG), -1, 0)  # [Tk, B, H, Tq]
  seg = group[0] if group.shape[0] == 1 else None
  if seg is None:  # rows with different block layouts (packed documents): vmap over B
    gmax = jax.vmap(lambda a, g: jax.ops.segment_max(a, g, num_segments=tk), (1, 0), 1)(
        st, group)
  else:
    gmax = jax.ops.segment_max(st, seg, num_segments=tk)
  gmax = jax.lax.stop_gradient(jnp.maximum(gmax, _NEG))
  take = lambda a: (jnp.take(a, seg, axis=0) if seg is not None else
                    jax.vmap(lambda x, g: jnp.take(x, g, axis=0), (1, 0), 1)(a, group))
  shift = jnp.where(jnp.moveaxis(grp, -1, 0), take(gmax), 0.0)
  e = jnp.where(jnp.moveaxis(grp, -1, 0), jnp.exp(st - shift), 0.0)
  if seg is None:
    gsum = jax.vmap(lambda a, g: jax.ops.segment_sum(a, g, num_segments=tk), (1, 0), 1)(
        e, group)
  else:
    gsum = jax.ops.segment_sum(e, seg, num_segments=tk)
  lse_grp = jnp.moveaxis(jnp.log(jnp.maximum(take(gsum), 1e-38)) + take(gmax), 0, -1)
  lm_idx = jnp.minimum(group + bs - 1, tk - 1)  # [B, Tk]
  s_lm = jnp.take_along_axis(s, jnp.broadcast_to(lm_idx[:, None, None, :], s.shape), -1)
  return lse_grp, s_lm


def grouped_softmax_weights(s, q_pos, k_pos, visible, group, bs):
  """Attention weights of the grouped softmax.

  s: [B, H, Tq, Tk] fp32 scores; q_pos [B, Tq], k_pos [B, Tk]: positions in the document;
  visible [B, Tq, Tk] or per head [B, H, Tq, Tk]: causal, same document, filled cache slot,
  (retrieval) a retrieved block; group [B, Tk]: index (into
  the key axis) of the first token of key j's block, so key ``group + bs - 1`` is its
  landmark; None when key j sits at position j of one document (blocks are then reshapes
  of the key axis, much faster than the segment ops packed rows need). Returns
  w [B, H, Tq, Tk] (rows sum to 1 over non-landmark keys).
  """
  tk = s.shape[-1]
  if visible.ndim == 3:
    visible = visible[:, None]
  qb = (q_pos // bs)[:, None, :, None]
  kb = (k_pos // bs)[:, None, None, :]
  is_lm = (k_pos % bs == bs - 1)[:, None, None, :]
  current = visible & (kb == qb)
  earlier = visible & (kb < qb)
  top = (current & ~is_lm) | (earlier & is_lm)
  grp = earlier & ~is_lm
  lse_top = _lse(s, top)
  if group is None:  # one document per row, key j at position j: blocks are reshapes
    nb = -(-tk // bs)
    pad = lambda a, v: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, nb * bs - tk)],
                               constant_values=v)
    sb = pad(s, _NEG).reshape(*s.shape[:-1], nb, bs)
    gb = pad(grp, False).reshape(*grp.shape[:-1], nb, bs)
    lse_grp = jnp.repeat(_lse(sb, gb), bs, axis=-1).reshape(*s.shape[:-1], nb * bs)[..., :tk]
    s_lm = jnp.repeat(sb[..., bs - 1:], bs, axis=-1).reshape(*s.shape[:-1], nb * bs)[..., :tk]
  else:
    lse_grp, s_lm = _segment_lse(s, grp, group, bs)
  top_tok = top & ~is_lm
  return (_exp_where(top_tok, s - lse_top)
          + _exp_where(grp, s_lm - lse_top + s - lse_grp))


class Landmark(Attention):
  """Landmark attention (Mohtashami & Jaggi 2023); see the module docstring."""

  Config = LandmarkConfig

  @staticmethod
  def sequence_layout(configs, *, d_model: int, param_dtype=jnp.float32,
                      rngs: nnx.Rngs) -> LandmarkTokens:
    """The LM's sequence-layout hook: landmark tokens after every ``block_size - 1`` tokens
    (``configs``: the field dicts of every landmark layer of the model)."""
    return LandmarkTokens.from_configs(configs, d_model=d_model, param_dtype=param_dtype,
                                       rngs=rngs)

  def __init__(self, d_model: int, cfg: LandmarkConfig = LandmarkConfig(), *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(d_model, cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  # ---------------------------------------------------------------- pieces
  def _heads(self, x):
    """Un-rotated q, k, v [B, T, H, Dh] (k, v repeated to H heads for GQA)."""
    rep = self.num_heads // self.num_kv_heads
    k = jnp.repeat(self.k(x), rep, axis=2) if rep > 1 else self.k(x)
    v = jnp.repeat(self.v(x), rep, axis=2) if rep > 1 else self.v(x)
    return self.q(x), k, v

  def _scores(self, q, k):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    return s * (1.0 / math.sqrt(self.head_dim))

  def _exact(self, q, k, v, q_pos, k_pos, visible, group):
    """Grouped softmax of rotated q [B,Tq,H,Dh] over rotated k / v [B,Tk,H,Dh]."""
    w = grouped_softmax_weights(self._scores(q, k), q_pos, k_pos, visible, group,
                                self.cfg.block_size)
    return jnp.einsum("bhqk,bkhd->bqhd", w.astype(self.dtype), v.astype(self.dtype))

  def _retrieve(self, q, offs, b, local_k, local_v, lm_keys, blocks_k, blocks_v):
    """Top-k retrieval for queries of one block.

    q: [B, n, H, Dh] rotated at their true positions ``b * bs + offs`` (offs [n]);
    local_k / local_v: [B, bs, H, Dh] block b (keys un-rotated; slots past the queries are
    masked); lm_keys: [B, nb, H, Dh] un-rotated landmark keys of blocks 0..nb-1 (blocks >= b
    are masked); blocks_k / blocks_v: [B, nb, bs, H, Dh] the block table to gather from.
    Returns [B, n, H, Dh].
    """
    bs, theta, topk = self.cfg.block_size, self.cfg.rope_theta, self.cfg.top_k
    nb = lm_keys.shape[1]
    kk = min(topk, nb)
    scale = 1.0 / math.sqrt(self.head_dim)
    qf = q.astype(jnp.float32)
    # Local block at true positions.
    j = jnp.arange(bs)
    lk = rope(local_k, (b * bs + j)[None, :, None], theta)
    s_loc = jnp.einsum("bqhd,bkhd->bhqk", qf, lk.astype(jnp.float32)) * scale
    loc_mask = (j[None, :] <= offs[:, None]) & (j[None, :] != bs - 1)  # [n, bs]
    # Rank the earlier blocks, all landmarks at the slot just before block b.
    sel = jnp.einsum("bqhd,bchd->bhqc", qf,
                     rope(lm_keys, b * bs - 1, theta).astype(jnp.float32))
    sel = jnp.where(jnp.arange(nb) < b, sel, -jnp.inf)
    if self.cfg.keep_previous:
      sel = jnp.where(jnp.arange(nb) == b - 1, jnp.inf, sel)
    top_s, top_i = jax.lax.top_k(sel, kk)  # [B, H, n, kk]
    valid = top_s > -jnp.inf
    order = jnp.sort(jnp.where(valid, top_i, nb), axis=-1)  # chronological, invalid last
    valid = order < nb
    idx = jnp.minimum(order, nb - 1)
    n_valid = jnp.sum(valid, axis=-1, keepdims=True)  # [B, H, n, 1]
    slot = b - n_valid + jnp.arange(kk)  # [B, H, n, kk]
    bi = jnp.arange(q.shape[0])[:, None, None, None]
    hi = jnp.arange(q.shape[2])[None, :, None, None]
    gk = blocks_k[bi, idx, :, hi]  # [B, H, n, kk, bs, Dh]
    gv = blocks_v[bi, idx, :, hi]
    gk = rope(gk, slot[..., None] * bs + j, theta)
    s_blk = jnp.einsum("bqhd,bhqrkd->bhqrk", qf, gk.astype(jnp.float32)) * scale
    gate = s_blk[..., bs - 1]  # the landmark's score at its mapped position
    blk_mask = valid[..., None] & (j != bs - 1)
    lse_top = jnp.logaddexp(_lse(s_loc, loc_mask[None, None])[..., 0],
                            _lse(gate, valid)[..., 0])[..., None]  # [B, H, n, 1]
    lse_blk = _lse(s_blk, blk_mask)  # [B, H, n, kk, 1]
    w_loc = _exp_where(jnp.broadcast_to(loc_mask, s_loc.shape), s_loc - lse_top)
    w_blk = _exp_where(jnp.broadcast_to(blk_mask, s_blk.shape),
                       (gate - lse_top)[..., None] + s_blk - lse_blk)
    dt = self.dtype
    o = jnp.einsum("bhqk,bkhd->bqhd", w_loc.astype(dt), local_v.astype(dt))
    return o + jnp.einsum("bhqrk,bhqrkd->bqhd", w_blk.astype(dt), gv.astype(dt))

  def _packed_retrieval_scores(self, q, k, qr, kr, q_pos, pos, visible, group):
    """Dense [Tq, T] form of top-k retrieval for packed rows (documents start anywhere, so
    blocks are not reshapes). Queries at document positions < exact_len keep the exact
    scores and mask. A key in a retrieved block sits ``m * bs`` before the query's block
    once remapped (``m = n - r`` for the r-th of n retrieved, chronologically), so its score
    is ``q`` rotated at ``offset_q + m * bs`` against ``k`` rotated at ``offset_k``: one
    score matrix per ``m`` in 0..top_k (0: the query's own block). ``q_pos`` [B, Tq]: the
    queries' document positions; ``pos`` [B, T] the keys'. Returns (s, visible)."""
    bs, ex, theta, kk = self.cfg.block_size, self.cfg.exact_len, self.cfg.rope_theta, \
        self.cfg.top_k
    t = k.shape[1]
    q_off, q_blk = q_pos % bs, q_pos // bs
    off = pos % bs
    blk = pos // bs
    k_off = rope(k, off[:, :, None], theta)
    s_m = jnp.stack([self._scores(rope(q, (q_off + m * bs)[:, :, None], theta), k_off)
                     for m in range(kk + 1)])  # [k+1, B, H, Tq, T]
    is_lm = (off == bs - 1)[:, None, :]
    earlier = visible & (blk[:, None, :] < q_blk[:, :, None])
    # Ranking: every candidate landmark at the slot just before the query's block.
    sel = self._scores(rope(q, (q_off + bs)[:, :, None], theta), k_off)  # distance off + 1
    sel = jnp.where((earlier & is_lm)[:, None], sel, -jnp.inf)
    if self.cfg.keep_previous:
      prev = earlier & is_lm & (blk[:, None, :] == q_blk[:, :, None] - 1)
      sel = jnp.where(prev[:, None], jnp.inf, sel)
    top_s, top_i = jax.lax.top_k(sel, min(kk, t))  # [B, H, Tq, k]
    valid = top_s > -jnp.inf
    n = valid.sum(-1, keepdims=True)
    rank = jnp.sum(valid[..., None, :] & (top_i[..., None, :] < top_i[..., :, None]), -1)
    dist = jnp.where(valid, n - rank, 0)  # m of each retrieved block
    lm_of_key = jnp.minimum(group + bs - 1, t - 1)[:, None, None, :, None]  # [B,1,1,T,1]
    hit = valid[..., None, :] & (lm_of_key == top_i[..., None, :])  # [B, H, Tq, T, k]
    m_ij = jnp.sum(jnp.where(hit, dist[..., None, :], 0), -1)  # [B, H, Tq, T]
    chosen = hit.any(-1) & earlier[:, None]
    s_ret = jnp.take_along_axis(s_m, m_ij[None], 0)[0]
    local = visible & (blk[:, None, :] == q_blk[:, :, None])
    retr_q = (q_pos >= ex)[:, None, :, None]
    s_true = self._scores(qr, kr)
    s = jnp.where(retr_q, s_ret, s_true)
    vis = jnp.where(retr_q, chosen | local[:, None], visible[:, None])
    return s, vis

  # ---------------------------------------------------------------- contract
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, T, D]; segment_ids: [B, T] or None -> [B, T, D]. With a ``sequence`` mesh in
    context (``layers.context_parallel``) each shard computes its own query rows against
    the all-gathered keys (:func:`layers.context_parallel.gathered_rows`), where the shard
    length is a multiple of ``block_size`` or the rows are packed (else XLA's partitioner
    runs the unsplit form)."""
    self._check_x(x)
    t = x.shape[1]
    q, k, v = self._heads(x)
    mesh = context_parallel.sequence_mesh(t)
    if mesh is not None and (segment_ids is not None or t <= self.cfg.exact_len
                             or (t // mesh.shape[context_parallel.AXIS])
                             % self.cfg.block_size == 0):
      return self._project(context_parallel.gathered_rows(self._rows, q, (k, v), segment_ids))
    return self._project(self._rows(q, 0, (k, v), segment_ids))

  def _rows(self, q, start, kv, segment_ids):
    """Output rows ``start .. start + Tq`` (before the output projection) from their
    un-rotated queries q [B, Tq, H, Dh] and the whole row's un-rotated k, v [B, T, H, Dh]
    and segment ids [B, T] (or None). ``start`` is 0 (unsplit) or a traced multiple of
    Tq (a context-parallel shard; then Tq is a multiple of block_size on unpacked rows
    longer than exact_len)."""
    k, v = kv
    b_, tq = q.shape[:2]
    t = k.shape[1]
    bs, ex, theta = self.cfg.block_size, self.cfg.exact_len, self.cfg.rope_theta
    pos = segment_positions(segment_ids, b_, t)
    q_pos = pos if tq == t else jax.lax.dynamic_slice_in_dim(pos, start, tq, 1)
    qr = rope(q, q_pos[:, :, None], theta)
    i = jnp.arange(t)
    if segment_ids is not None or t <= ex:
      visible = (start + jnp.arange(tq))[:, None] >= i[None, :]
      if segment_ids is not None:
        q_seg = (segment_ids if tq == t else
                 jax.lax.dynamic_slice_in_dim(segment_ids, start, tq, 1))
        visible = visible & (q_seg[:, :, None] == segment_ids[:, None, :])
      visible = jnp.broadcast_to(visible, (b_, tq, t))
      group = None if segment_ids is None else (i[None, :] - pos % bs).astype(jnp.int32)
      kr = rope(k, pos[:, :, None], theta)
      if segment_ids is None or t <= ex:
        return self._exact(qr, kr, v, q_pos, pos, visible, group)
      s, visible = self._packed_retrieval_scores(q, k, qr, kr, q_pos, pos, visible, group)
      w = grouped_softmax_weights(s, q_pos, pos, visible, group, bs)
      return jnp.einsum("bhqk,bkhd->bqhd", w.astype(self.dtype), v.astype(self.dtype))
    # Unpacked rows longer than exact_len: blocks are reshapes of the key axis.
    tp = -(-t // bs) * bs
    pad = lambda a: jnp.pad(a, ((0, 0), (0, tp - a.shape[1])) + ((0, 0),) * (a.ndim - 2))
    nb = tp // bs
    blocks_k = pad(k).reshape(b_, nb, bs, *k.shape[2:])
    blocks_v = pad(v).reshape(b_, nb, bs, *v.shape[2:])
    lm_keys = blocks_k[:, :, bs - 1]
    offs = jnp.arange(bs)

    def retrieve(qb, blk):
      return self._retrieve(qb, offs, blk, blocks_k[:, blk], blocks_v[:, blk], lm_keys,
                            blocks_k, blocks_v)

    if tq == t:
      # Exact head (positions < exact_len), then retrieval one query block at a time.
      parts = []
      if ex:
        kr = rope(k[:, :ex], pos[:, :ex, None], theta)
        vis = jnp.broadcast_to(i[:ex, None] >= i[None, :ex], (b_, ex, ex))
        parts.append(self._exact(qr[:, :ex], kr, v[:, :ex], pos[:, :ex], pos[:, :ex], vis,
                                 None))
      blocks_q = pad(qr).reshape(b_, nb, bs, *q.shape[2:])
      out = jax.lax.map(lambda blk: retrieve(
          jax.lax.dynamic_index_in_dim(blocks_q, blk, 1, keepdims=False), blk),
                        jnp.arange(ex // bs, nb))  # [nb', B, bs, H, Dh]
      parts.append(jnp.moveaxis(out, 0, 1).reshape(b_, -1, *q.shape[2:]))
      return jnp.concatenate(parts, axis=1)[:, :t]
    # A shard of whole blocks: each block is exact (below exact_len) or retrieves.
    blocks_q = qr.reshape(b_, tq // bs, bs, *q.shape[2:])
    kr = rope(k[:, :ex], pos[:, :ex, None], theta) if ex else None

    def one_block(j):
      blk = start // bs + j
      qb = jax.lax.dynamic_index_in_dim(blocks_q, j, 1, keepdims=False)
      if not ex:
        return retrieve(qb, blk)

      def exact(_):
        qp = jnp.broadcast_to(blk * bs + offs, (b_, bs))
        vis = jnp.broadcast_to(qp[:, :, None] >= i[None, None, :ex], (b_, bs, ex))
        return self._exact(qb, kr, v[:, :ex], qp, pos[:, :ex], vis, None)
      return jax.lax.cond(blk * bs < ex, exact, lambda _: retrieve(qb, blk), None)

    out = jax.lax.map(one_block, jnp.arange(tq // bs))  # [Tq / bs, B, bs, H, Dh]
    return jnp.moveaxis(out, 0, 1).reshape(b_, tq, *q.shape[2:])

  def cache_len(self, max_len: int | None = None) -> int:
    """KV-cache slots: ``max_len`` (default cfg.max_len) rounded up to whole blocks."""
    length = super().cache_len(max_len)
    bs = self.cfg.block_size
    return -(-length // bs) * bs

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    """An empty cache: un-rotated keys and values by position, and the position counter."""
    length = self.cache_len(max_len)
    shape = (batch, length, self.num_heads, self.head_dim)
    k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    if self.cfg.kv_memory != "device":
      host = jax.sharding.SingleDeviceSharding(jax.devices()[0],
                                               memory_kind=self.cfg.kv_memory)
      k, v = jax.device_put(k, host), jax.device_put(v, host)
    return {"k": k, "v": v, "pos": jnp.zeros((), jnp.int32)}

  def _on_device(self, a):
    if self.cfg.kv_memory == "device":
      return a
    return jax.device_put(a, jax.memory.Space.Device)

  def _to_cache(self, a):
    if self.cfg.kv_memory == "device":
      return a
    return jax.device_put(a, jax.memory.Space.Host)

  def _step_one(self, q, k, v, state):
    """One token: q / k / v [B, 1, H, Dh] un-rotated -> (o [B, 1, H, Dh], state)."""
    bs, ex, theta = self.cfg.block_size, self.cfg.exact_len, self.cfg.rope_theta
    kc, vc, p = state["k"], state["v"], state["pos"]
    length = kc.shape[1]
    nb = length // bs
    p = jnp.minimum(p, length - 1)  # a full cache keeps overwriting its last slot
    kc = jax.lax.dynamic_update_slice_in_dim(kc, self._to_cache(k.astype(kc.dtype)), p, 1)
    vc = jax.lax.dynamic_update_slice_in_dim(vc, self._to_cache(v.astype(vc.dtype)), p, 1)
    blk = p // bs
    qr = rope(q, p, theta)

    def exact(_):
      n = min(ex, length)
      keys = self._on_device(kc[:, :n])
      vals = self._on_device(vc[:, :n])
      kpos = jnp.arange(n)
      vis = jnp.broadcast_to((kpos <= p)[None, None, :], (q.shape[0], 1, n))
      return self._exact(qr, rope(keys, kpos[None, :, None], theta), vals,
                         p[None, None], kpos[None], vis, None).astype(self.dtype)

    def retrieve(_):
      lk = self._on_device(jax.lax.dynamic_slice_in_dim(kc, blk * bs, bs, 1))
      lv = self._on_device(jax.lax.dynamic_slice_in_dim(vc, blk * bs, bs, 1))
      lm = self._on_device(kc[:, bs - 1::bs])
      table_k = kc.reshape(kc.shape[0], nb, bs, *kc.shape[2:])
      table_v = vc.reshape(vc.shape[0], nb, bs, *vc.shape[2:])
      o = self._retrieve(qr, (p % bs)[None], blk, lk, lv, lm, _DeviceGather(self, table_k),
                         _DeviceGather(self, table_v))
      return o.astype(self.dtype)

    if ex >= length:
      o = exact(None)
    elif ex == 0:
      o = retrieve(None)
    else:
      o = jax.lax.cond(p < ex, exact, retrieve, None)
    return o, {"k": kc, "v": vc, "pos": state["pos"] + 1}

  def step(self, x: jax.Array, state):
    """x: [B, t, D] (the next t tokens of one document per row) -> (y, new state)."""
    self._check_x(x)
    q, k, v = self._heads(x)

    def body(st, qkv):
      qi, ki, vi = (a[:, None] for a in qkv)
      o, st = self._step_one(qi, ki, vi, st)
      return st, o[:, 0]

    if x.shape[1] == 1:  # decode: no loop, so the cache is updated in place
      o, state = self._step_one(q, k, v, state)
      return self._project(o), state
    state, o = jax.lax.scan(body, state, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v)))
    return self._project(jnp.moveaxis(o, 0, 1)), state

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    """Elements of the K and V caches (``pos`` not counted)."""
    return 2 * batch * self.cache_len(max_len) * self.num_heads * self.head_dim


class _DeviceGather:
  """A block table ``[B, nb, bs, H, Dh]`` whose fancy-indexed reads land on the device (the
  table itself may live in host memory)."""

  def __init__(self, layer, table):
    self.layer, self.table = layer, table
    self.shape = table.shape

  def __getitem__(self, index):
    if self.layer.cfg.kv_memory == "device":
      return self.table[index]
    # The indices go to the table's memory space, the gathered blocks come back.
    index = tuple(jax.device_put(i, jax.memory.Space.Host) if isinstance(i, jax.Array) else i
                  for i in index)
    return self.layer._on_device(self.table[index])
