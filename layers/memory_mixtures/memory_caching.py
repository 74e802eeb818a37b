"""Memory Caching (MC) over a matrix-memory mixer or Titans' neural memory.

Reference (the math; the code is lcm's own): Behrouz, Li, Deng, Zhong, Razaviyayn,
Mirrokni 2026, "Memory Caching: RNNs with Growing Memory" (arXiv 2602.24281).

The sequence of every document is cut into segments of ``L = segment_len`` tokens, at
positions ``0, L, 2L, ...`` counted from the document start. Token ``t`` of segment
``s = pos_t // L`` reads the *online* memory and the memories *cached* at the end of the
completed segments ``i < s``::

    y_t = read(M_t^(s), q_t) + sum_{i in C_t} w_{t,i} read(M^(i), q_t)

``read(M, q) = M^T q`` for a matrix memory ``M [Dk, Dv]`` (for ``titans_lmm`` the memory
MLP's forward pass, see below). ``M^(i)`` is the memory at the
end of segment i. With ``segment_reset=True`` (default) every segment is compressed into its
own memory, starting from zero (``M_t^(s)`` holds only segment s's tokens; with
``segment_len=1`` and linear attention the cached memories are single ``k_i v_i^T`` and MC
becomes attention-like, the paper's interpolation between RNNs and Transformers); with
``segment_reset=False`` the recurrence runs on uninterrupted and the cache holds checkpoints
of the running memory.

Aggregation (``aggregation``), with the gate score of a cached segment
``r_{t,i} = <u_t, kbar_i> / sqrt(Dks)``, ``u_t = W_u x_t`` (a learned gate query per head)
and ``kbar_i`` the mean of segment i's keys (a mean pooling of the segment; the inner
mixer's keys before any feature map, per head):

  * ``"gated"`` (Gated Residual Memory, GRM): ``w_{t,i} = softmax_{i in C_t}(r_{t,i})``.
  * ``"topk"`` (Sparse Selective Caching, SSC): only the ``top_k`` best-scoring cached
    segments are read, ``w_{t,i} = softmax`` over those (0 for the others).

The online memory's read has weight 1 (a residual). ``C_t`` is the completed segments of
t's document, at most the ``max_segments`` most recent ones (in training and decoding
alike, so there is no ``seq_len`` limit). Reads are combined before the inner mixer's
output stage (per-head norm, output gate, output projection); for normalised linear
attention the numerator and the denominator ``phi(q) . sum phi(k)`` are aggregated alike
and divided afterwards.

A segment's final memory for the linear recurrences is the closed form
``S_L = exp(sum_j g_j) S_0 + sum_j (k_j * exp(sum_{i>j} g_i)) v_j^T``. Cost
O(T (T / L) Dk Dv) on top of the inner mixer, the paper's O(NL).

Titans' LMM (``inner="titans_lmm"``): the memory is the weights ``W`` of its memory MLP, a
cached memory ``M^(i)`` the MLP weights at the end of segment i, and a cached read is the
MLP forward pass with those weights, ``read(M^(i), q_t) = M(M^(i), q_t)``, aggregated with
the same weights ``w_{t,i}`` (gate keys: the mean of the segment's LMM keys ``k``, after its
short convolution, SiLU and L2 norm). The LMM's projections, gates, initial weights and
output stage (per-head norm, gate, projection) are its own.

  * ``segment_reset=True``: every segment starts from the learned initial weights with zero
    momentum and the LMM's chunk grid (gradient points) restarts at every segment start.
  * ``segment_reset=False``: the LMM runs on uninterrupted (its own chunk grid and document
    restarts) and the cache holds checkpoints of its memory; ``segment_len`` must then be a
    multiple of ``chunk_size``: segment ends fall on chunk ends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import ConfigError, Linear, check, doc_starts, segment_positions
from layers.common import check_bool, check_d_model, check_pos_int
from layers.memory_mixtures.memories import INNER_MIXERS, mask_tokens
from layers.memory_mixtures.validation import check_kernel_opts, choice, error_message

__all__ = ["MemoryCachingConfig", "MemoryCaching", "cache_weights"]


_SHARED_FIELDS = ("num_heads", "chunk_size", "impl")


@dataclasses.dataclass(frozen=True)
class MemoryCachingConfig:
  """Hyper-parameters of :class:`MemoryCaching`.

  inner: the memory mixer whose state is cached: one of ``INNER_MIXERS``.
  num_heads: heads of the inner mixer.
  segment_len: L; a memory is cached every L tokens (positions from the document start).
  aggregation: "gated" (GRM: softmax over the cached segments) or "topk" (SSC: the
    ``top_k`` best-scoring cached segments only).
  top_k: segments read per token with ``aggregation="topk"`` (<= max_segments).
  max_segments: cached memories kept (the oldest is evicted); the decode state holds this
    many ``[H, Dk, Dv]`` memories plus the online one.
  segment_reset: True: every segment's memory starts from zero (titans_lmm: from its
    learned initial weights, zero momentum; compresses that segment only); False: the
    memory runs on and the cache holds checkpoints of it (titans_lmm: segment_len must
    then be a multiple of chunk_size).
  chunk_size, impl: the inner mixer's kernel options (titans_lmm: chunk_size is its
    gradient chunk; it has no ``impl``).
  inner_overrides: any other fields of the inner mixer's Config, as (field, value) pairs
    (or a mapping), e.g. ``(("use_short_conv", True),)``.
  """

  inner: str = "gla"
  num_heads: int = 4
  segment_len: int = 64
  aggregation: str = "gated"
  top_k: int = 2
  max_segments: int = 32
  segment_reset: bool = True
  chunk_size: int = 64
  impl: str = "auto"
  inner_overrides: Any = ()

  def __post_init__(self):
    # A hashable canonical form (lists from JSON / CLI, or a mapping -> tuple of pairs);
    # anything malformed is left as given for validate() to report.
    ov = self.inner_overrides
    try:
      pairs = sorted(ov.items()) if isinstance(ov, Mapping) else [tuple(p) for p in ov]
      if not isinstance(ov, (str, bytes)) and all(len(p) == 2 for p in pairs):
        object.__setattr__(self, "inner_overrides", tuple(pairs))
    except TypeError:
      pass

  def overrides(self) -> dict[str, Any]:
    """``inner_overrides`` as a dict (ConfigError("inner_overrides") if malformed)."""
    ov = self.inner_overrides
    items = None
    if isinstance(ov, Mapping):
      items = list(ov.items())
    elif not isinstance(ov, (str, bytes)):
      try:
        items = [tuple(p) for p in ov]
      except TypeError:
        pass
    if items is None or any(len(p) != 2 or not isinstance(p[0], str) for p in items):
      raise ConfigError("inner_overrides", "must be (field, value) pairs or a mapping of "
                        f"the inner mixer's Config fields (got {ov!r})")
    return dict(items)

  def inner_spec(self, d_model: int):
    """(inner layer class, adapter, validated inner Config)."""
    choice(self.inner, tuple(INNER_MIXERS), "inner")
    cls, adapter = INNER_MIXERS[self.inner]
    ov = self.overrides()
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for key in ov:
      check(key in fields and key not in _SHARED_FIELDS, "inner_overrides",
            f"{key!r} is not a field of the {self.inner} Config that memory_caching passes "
            f"on" + (" (set memory_caching's own field instead)" if key in _SHARED_FIELDS
                     else f"; allowed: {', '.join(sorted(fields - set(_SHARED_FIELDS)))}"))
    kwargs = {f: getattr(self, f) for f in _SHARED_FIELDS if f in fields}
    try:
      inner_cfg = cls.Config(**{**ov, **kwargs})
      inner_cfg.validate(d_model)
    except ConfigError as e:
      if e.field in _SHARED_FIELDS or e.field == "d_model":
        raise
      if e.field not in ov:  # an inner default that does not fit memory_caching's num_heads
        raise ConfigError("num_heads", f"{self.inner}'s {e.field}: {error_message(e)}") from None
      raise ConfigError("inner_overrides", f"{e.field}: {error_message(e)}") from None
    except (TypeError, ValueError) as e:  # a value of a type the inner Config cannot take
      raise ConfigError("inner_overrides", f"invalid value for the {self.inner} Config: "
                        f"{type(e).__name__}: {e}") from None
    return cls, adapter, inner_cfg

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    check_pos_int(self.num_heads, "num_heads")
    check_kernel_opts(self)
    check_pos_int(self.segment_len, "segment_len")
    choice(self.aggregation, ("gated", "topk"), "aggregation")
    check_pos_int(self.max_segments, "max_segments")
    check_pos_int(self.top_k, "top_k")
    check(self.top_k <= self.max_segments, "top_k",
          f"must be <= max_segments={self.max_segments} (got {self.top_k})")
    check_bool(self.segment_reset, "segment_reset")
    self.inner_spec(d_model)
    if self.inner == "titans_lmm" and not self.segment_reset:
      check(self.segment_len % self.chunk_size == 0, "segment_len",
            f"must be a multiple of chunk_size={self.chunk_size} with inner='titans_lmm' "
            f"and segment_reset=False (got {self.segment_len}), so that every segment ends at "
            "the end of one of the running memory's chunks; change segment_len or "
            "chunk_size (or use segment_reset=True)")


def cache_weights(scores: jax.Array, available: jax.Array, top_k: int | None) -> jax.Array:
  """Aggregation weights over cached segments (last axis).

  scores [..., C] (fp32), available [..., C] bool. ``top_k=None``: softmax over the
  available segments (GRM); else softmax over the ``top_k`` highest-scoring available
  segments, 0 elsewhere (SSC). All zeros where nothing is available.
  """
  scores = scores.astype(jnp.float32)
  if top_k is not None:
    c = scores.shape[-1]
    vals, idx = jax.lax.top_k(jnp.where(available, scores, -jnp.inf), min(top_k, c))
    chosen = jax.nn.one_hot(idx, c, dtype=jnp.bool_) & jnp.isfinite(vals)[..., None]
    available = available & jnp.any(chosen, axis=-2)
  m = jnp.max(jnp.where(available, scores, -jnp.inf), axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(available, jnp.exp(jnp.where(available, scores - m, 0.0)), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


class MemoryCaching(nnx.Module):
  """Memory Caching (Behrouz et al. 2026) around a matrix-memory mixer (see the module
  docstring for the equations; :meth:`__call__` and :meth:`step` for the parallel form and
  the decode cache).

  State: ``{"S": [B, H, Dk, Dv] online memory, "cache": [B, M, H, Dk, Dv] cached memories
  (ring buffer, slot = segment number mod M), "ksum": [B, H, Dks] key sum of the current
  segment, "kbar": [B, M, H, Dks] cached key summaries, "pos": int32 tokens seen}`` plus the
  inner mixer's short-convolution states. ``M = max_segments``. With ``titans_lmm``,
  ``"S"`` is ``{"w0", "m", "s"}`` (tuples over memory layers of ``[B, H, d_in, d_out]``)
  and ``"cache"`` a tuple over layers of ``[B, M, H, d_in, d_out]``.
  """

  Config = MemoryCachingConfig

  def __init__(self, d_model: int, cfg: MemoryCachingConfig = MemoryCachingConfig(), *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    inner_cls, adapter, inner_cfg = cfg.inner_spec(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.adapter = adapter
    self.inner = inner_cls(d_model, inner_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    h, dk, dv, dks = adapter.dims(self.inner)
    self.num_heads, self.key_dim, self.value_dim, self.summary_dim = h, dk, dv, dks
    self.gate_q = Linear(d_model, (h, dks), ("embed", "heads", "head_dim"), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  # -- pieces

  def _check_x(self, x: jax.Array) -> None:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"MemoryCaching expects x of shape [B, T, {self.d_model}], "
                       f"got {x.shape}")

  def _top_k(self) -> int | None:
    return self.cfg.top_k if self.cfg.aggregation == "topk" else None

  def _lmm_chunk(self) -> int:
    """titans_lmm's chunk size for the recurrence. With ``segment_reset`` positions restart
    every L tokens, so a chunk longer than L is the same grid as L (one chunk per segment);
    capping it keeps at most one segment end per physical chunk."""
    c = self.inner.cfg.chunk_size
    return min(c, self.cfg.segment_len) if self.cfg.segment_reset else c

  def _summaries(self, ks, ends, valid, ksum0):
    """Key summaries ``kbar`` [B, N, H, Dks] fp32 of the segments ending at ``ends`` [B, N]
    (``valid`` marks real ones): the mean of the segment's L keys ``ks`` [B, T, H, Dks];
    tokens before this call (index < 0) are in ``ksum0`` [B, H, Dks] (or None)."""
    b, t = ks.shape[:2]
    n = ends.shape[1]
    seg_len = self.cfg.segment_len
    idx = ends[..., None] - (seg_len - 1) + jnp.arange(seg_len)  # [B, N, L]
    ok = (idx >= 0) & valid[..., None]
    flat = jnp.clip(idx, 0, t - 1).reshape(b, n * seg_len)
    seg = jax.vmap(lambda a, i: a[i])(ks, flat).reshape((b, n, seg_len) + ks.shape[2:])
    ksum = jnp.sum(jnp.where(ok[..., None, None], seg.astype(jnp.float32), 0.0), axis=2)
    if ksum0 is not None:
      first_partial = ends - (seg_len - 1) < 0  # [B, N]: began before this call
      ksum = ksum + jnp.where(first_partial[..., None, None],
                              ksum0[:, None].astype(jnp.float32), 0.0)
    return ksum / seg_len

  def _segment_memories(self, proj, ends, valid, s0, ksum0, chain_reset):
    """Memories and key summaries of the segments ending at ``ends`` [B, N] (token indices
    of this call; ``valid`` [B, N] marks real ones, always a prefix of the N slots).

    A segment's tokens are ``ends - L + 1 .. ends``; indices < 0 were seen by an earlier
    ``step`` and are inside ``s0`` (the online memory entering this call) and ``ksum0``.
    With ``segment_reset`` each segment starts from zero (or from ``s0`` if it began before
    this call) and all run as one batch; otherwise slot n continues from slot n-1's memory
    (from ``s0`` for slot 0, from zero where ``chain_reset`` marks a document start).
    Returns ``(S [B, N, H, Dk, Dv] fp32, kbar [B, N, H, Dks] fp32)``.
    """
    b, t = proj["q"].shape[:2]
    n = ends.shape[1]
    seg_len = self.cfg.segment_len
    idx = ends[..., None] - (seg_len - 1) + jnp.arange(seg_len)  # [B, N, L]
    ok = ((idx >= 0) & valid[..., None]).reshape(b, n * seg_len)
    flat = jnp.clip(idx, 0, t - 1).reshape(b, n * seg_len)
    gather = jax.vmap(lambda a, i: a[i])
    seg = {k: (None if a is None else gather(a, flat)) for k, a in proj.items()
           if k not in ("q", "ks")}
    seg = mask_tokens(seg, ok)
    split = lambda a: None if a is None else a.reshape((b, n, seg_len) + a.shape[2:])
    seg = {k: split(a) for k, a in seg.items()}
    first_partial = ends - (seg_len - 1) < 0  # [B, N]: began before this call
    kbar = self._summaries(proj["ks"], ends, valid, ksum0)
    h, dk, dv = self.num_heads, self.key_dim, self.value_dim
    zeros = jnp.zeros((b, h, dk, dv), jnp.float32)
    s0 = zeros if s0 is None else s0.astype(jnp.float32)
    if self.cfg.segment_reset:
      init = jnp.where(first_partial[..., None, None, None], s0[:, None], 0.0)
      batch = {k: (None if a is None else a.reshape((b * n, seg_len) + a.shape[3:]))
               for k, a in seg.items()}
      sf = self.adapter.segment_final(self.inner, batch, init.reshape(b * n, h, dk, dv))
      return sf.reshape(b, n, h, dk, dv), kbar

    def body(carry, xs):
      one, reset = xs
      init = jnp.where(reset[:, None, None, None], 0.0, carry)
      sf = self.adapter.segment_final(self.inner, one, init)
      return sf, sf

    slot_major = {k: (None if a is None else jnp.swapaxes(a, 0, 1)) for k, a in seg.items()}
    _, states = jax.lax.scan(body, s0, (slot_major, jnp.swapaxes(chain_reset, 0, 1)))
    return jnp.swapaxes(states, 0, 1), kbar

  def _aggregate(self, o, q, x, states, kbar, available):
    """``o + sum_c w_{t,c} read(S_c, q_t)``; states [B, C, H, Dk, Dv], kbar [B, C, H, Dks],
    available [B, T, C] (segment c is completed, in t's document, within the window)."""
    u = self.gate_q(x).astype(jnp.float32)  # [B, T, H, Dks]
    scores = jnp.einsum("bthd,bchd->bthc", u, kbar.astype(jnp.float32))
    scores = scores * (self.summary_dim ** -0.5)
    w = cache_weights(scores, available[:, :, None, :], self._top_k())  # [B, T, H, C]
    reads = self.adapter.read(self.inner, states, q)  # [B, T, C, H, Dv]
    return o.astype(jnp.float32) + jnp.einsum("bthc,btchv->bthv", w, reads)

  def _finish(self, o, x):
    return self.adapter.finish(self.inner, o.astype(self.dtype), x)

  # -- the contract

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Parallel form: one kernel call over the whole row gives the online reads (``reset``
    at document and, with ``segment_reset``, segment starts). The memories of the full
    segments (at most ``N = T // L`` per row; a segment cut short by the end of its
    document is never read by anyone) are computed by gathering each segment's L tokens:
    with ``segment_reset`` all segments at once (``[B * N, L]``), else as a ``lax.scan``
    over the N segments, each continuing from the previous one. A segment's final memory is
    a delta-rule kernel call, or for linear recurrences the closed form (no kernel). All
    cached memories are then read with batched einsums (dense over segments, weights 0
    where unavailable or not selected). titans_lmm: one ``memory_recurrence`` call gives
    both the online reads and the memory right after every segment's last token."""
    self._check_x(x)
    b, t, _ = x.shape
    seg_len, max_seg = self.cfg.segment_len, self.cfg.max_segments
    proj, _ = self.adapter.project(self.inner, x, segment_ids, None)
    pos = segment_positions(segment_ids, b, t)
    starts = doc_starts(segment_ids)
    n = t // seg_len  # at most n segments complete inside this sequence
    is_end = pos % seg_len == seg_len - 1
    ends = jnp.argsort(~is_end, axis=1, stable=True)[:, :n].astype(jnp.int32)
    valid = jnp.take_along_axis(is_end, ends, axis=1)
    if self.adapter.kind == "mlp":  # online reads and segment memories in one pass
      rpos = pos % seg_len if self.cfg.segment_reset else pos
      o, _, states = self.adapter.recur_cached(self.inner, proj, None, rpos,
                                               is_end if n else None, ends, self._lmm_chunk())
      if n == 0:
        return self._finish(o, x)
      kbar = self._summaries(proj["ks"], ends, valid, None)
    else:
      if self.cfg.segment_reset:
        reset = pos % seg_len == 0  # includes every document start (pos 0)
      else:
        reset = starts
      o, _ = self.adapter.recur(self.inner, proj, None, reset)
      if n == 0:  # no segment completes inside this sequence
        return self._finish(o, x)
      seg_start = jnp.clip(ends - (seg_len - 1), 0, t - 1)
      chain_reset = jnp.take_along_axis(pos, seg_start, axis=1) == 0
      states, kbar = self._segment_memories(proj, ends, valid, None, None, chain_reset)
    doc = (jnp.zeros((b, t), jnp.int32) if starts is None
           else jnp.cumsum(starts.astype(jnp.int32), axis=1))
    num = jnp.take_along_axis(pos, ends, axis=1) // seg_len  # [B, N] segment numbers
    g = (pos // seg_len)[:, :, None]  # [B, T, 1]
    available = (valid[:, None, :]
                 & (jnp.take_along_axis(doc, ends, axis=1)[:, None, :] == doc[:, :, None])
                 & (num[:, None, :] < g) & (num[:, None, :] >= g - max_seg))
    o = self._aggregate(o, proj["q"], x, states, kbar, available)
    return self._finish(o, x)

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len  # a fixed-size cache of max_segments memories
    h, dks = self.num_heads, self.summary_dim
    m = self.cfg.max_segments
    state = {"S": self.adapter.init_online(self.inner, batch, dtype),
             "cache": self.adapter.init_cache(self.inner, batch, m, dtype),
             "ksum": jnp.zeros((batch, h, dks), dtype),
             "kbar": jnp.zeros((batch, m, h, dks), dtype),
             "pos": jnp.zeros((), jnp.int32)}
    state.update(self.adapter.conv_init_state(self.inner, batch, dtype))
    return state

  def step(self, x: jax.Array, state):
    """x: [B, t, D], t >= 1 tokens of one document per row, continuing ``state``.

    The same machinery as :meth:`__call__` on a chunk of any length: segments completing
    inside the chunk continue from the online state carried in ``state["S"]`` (their
    earlier tokens are in it), then they enter the ring buffer of ``max_segments`` cached
    memories (the oldest is evicted)."""
    self._check_x(x)
    b, t, _ = x.shape
    seg_len, max_seg = self.cfg.segment_len, self.cfg.max_segments
    pos0 = state["pos"]
    proj, conv_state = self.adapter.project(self.inner, x, None, state)
    p = pos0 + jnp.arange(t, dtype=jnp.int32)  # [t]
    # Segments completing inside this call: ends every L tokens from the first one.
    n = -(-t // seg_len)
    first_end = (seg_len - 1 - pos0 % seg_len) % seg_len
    ends1 = first_end + seg_len * jnp.arange(n, dtype=jnp.int32)  # [N]
    valid1 = ends1 < t
    ends, valid = (jnp.broadcast_to(a, (b, n)) for a in (ends1, valid1))
    if self.adapter.kind == "mlp":
      rpos = jnp.broadcast_to(p % seg_len if self.cfg.segment_reset else p, (b, t))
      marks = jnp.broadcast_to(p % seg_len == seg_len - 1, (b, t))
      o, s_new, states = self.adapter.recur_cached(self.inner, proj, state["S"], rpos, marks,
                                                   ends, self._lmm_chunk())
      kbar = self._summaries(proj["ks"], ends, valid, state["ksum"])
    else:
      reset = (jnp.broadcast_to(p % seg_len == 0, (b, t)) if self.cfg.segment_reset else None)
      o, s_new = self.adapter.recur(self.inner, proj, state["S"], reset)
      states, kbar = self._segment_memories(proj, ends, valid, state["S"], state["ksum"],
                                            jnp.zeros((b, n), bool))
    # Ring buffer: slot j holds the latest completed segment number = j (mod M).
    done0 = pos0 // seg_len
    num_old = done0 - 1 - jnp.mod(done0 - 1 - jnp.arange(max_seg, dtype=jnp.int32), max_seg)
    num_new = (pos0 + ends1) // seg_len
    nums = jnp.concatenate([num_old, num_new])
    ok = jnp.concatenate([num_old >= 0, valid1])
    g = (p // seg_len)[:, None]  # [t, 1]
    available = ok[None, :] & (nums[None, :] < g) & (nums[None, :] >= g - max_seg)
    all_states = jax.tree.map(lambda c, s: jnp.concatenate([c.astype(jnp.float32), s], 1),
                              state["cache"], states)
    all_kbar = jnp.concatenate([state["kbar"].astype(jnp.float32), kbar], axis=1)
    o = self._aggregate(o, proj["q"], x, all_states, all_kbar,
                        jnp.broadcast_to(available, (b,) + available.shape))
    y = self._finish(o, x)
    # New state: the newest M completed segments enter the ring buffer.
    done1 = (pos0 + t) // seg_len
    slot = jnp.where(valid1 & (num_new >= done1 - max_seg), num_new % max_seg, max_seg)
    cache = jax.tree.map(lambda c, s: c.at[:, slot].set(s.astype(c.dtype), mode="drop"),
                         state["cache"], states)
    kbar_c = state["kbar"].at[:, slot].set(kbar.astype(state["kbar"].dtype), mode="drop")
    # Key sum of the segment still open: tokens from the last segment start on.
    idx = jnp.arange(t)
    last_start = jnp.max(jnp.where(p % seg_len == 0, idx, -1))
    after = (idx >= last_start)[None, :, None, None]
    ksum = jnp.sum(jnp.where(after, proj["ks"].astype(jnp.float32), 0.0), axis=1)
    ksum = ksum + jnp.where(last_start < 0, state["ksum"].astype(jnp.float32), 0.0)
    new = {"S": jax.tree.map(lambda a, r: a.astype(r.dtype), s_new, state["S"]),
           "cache": cache,
           "ksum": ksum.astype(state["ksum"].dtype), "kbar": kbar_c, "pos": pos0 + t}
    if conv_state is not None:
      new.update(conv_state)
    return y, new

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    h, dks, m = self.num_heads, self.summary_dim, self.cfg.max_segments
    memories = (self.adapter.online_size(self.inner, batch)
                + m * self.adapter.cached_size(self.inner, batch))
    return (memories + batch * (1 + m) * h * dks
            + self.adapter.conv_state_size(self.inner, batch))
