"""JRT-RNN prefix linear attention (Arora et al. 2024, "Just read twice: closing the recall
gap for recurrent language models"); HazyResearch/prefix-linear-attention
``based/models/mixers/prefix_linear_attention.py``.

The first M tokens of each document are encoded non-causally with their own key/value
projections::

  o_t = phi(q_t) . [ sum_{j <= t} phi(k_j) v_j^T + sum_{j < M} phi(ke_j) ve_j^T ]
        / phi(q_t) . [ sum_{j <= t} phi(k_j)       + sum_{j < M} phi(ke_j)       ]

Kernel: ``kernels.chunked_scan.linear_recurrence`` (three passes: causal decoder, causal
encoder, time-reversed encoder for the later prefix tokens). State ``[B, H, F, Dv (+1)]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import feature_maps as fm
from layers.common import Linear, segment_positions
from layers.common import check_d_model, check_pos_int
from layers.common import append_ones, doc_starts, normalise
from layers.linear_attention.common import (Mixer, check_feature_map, check_kernel_opts,
                                            resolve_head_dim)

__all__ = ["JRT", "JRTConfig"]


@dataclasses.dataclass(frozen=True)
class JRTConfig:
  """Hyper-parameters of :class:`JRT`.

  prefix_len: M, the number of leading tokens of every document encoded non-causally.
  num_heads, feature_dim, head_dim, feature_map, taylor_upper, normalize, eps: as
    :class:`LinearAttentionConfig` (defaults as the reference: Taylor map of feature_dim 16,
    normalised, eps 1e-12).
  chunk_size, impl: passed to ``linear_recurrence``.
  """

  prefix_len: int = 32
  num_heads: int = 4
  feature_dim: int = 16
  head_dim: int | None = None
  feature_map: str = "taylor"
  taylor_upper: bool = False
  normalize: bool = True
  eps: float = 1e-12
  chunk_size: int = 64
  impl: str = "auto"

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    check_pos_int(self.prefix_len, "prefix_len")
    resolve_head_dim(d_model, self.num_heads, self.head_dim)
    check_pos_int(self.feature_dim, "feature_dim")
    check_feature_map(self)
    check_kernel_opts(self)


class JRT(Mixer):
  """JRT-RNN prefix linear attention (Arora et al. 2024, "Just read twice").

  The first ``M = prefix_len`` tokens of every document (the prompt) are encoded
  *non-causally* with their own key/value projections (``k_enc``, ``v_enc``); every token
  attends to all of them, plus causally to every token through the decoder projections::

    o_t = phi(q_t) . [ sum_{j <= t} phi(k_j) v_j^T + sum_{j < M} phi(ke_j) ve_j^T ]
          / phi(q_t) . [ sum_{j <= t} phi(k_j)       + sum_{j < M} phi(ke_j)       ]

  (denominator with ``normalize``). The state after the prefix is the sum of the causal and
  the encoder states, so decoding continues from the combined state exactly as in the
  reference. The non-causal part is computed with the same linear-time kernel: a causal
  pass over the masked encoder keys, plus a time-reversed pass that adds the strictly later
  prefix tokens of the same document.

  ``step`` and the prefix: the first call of a document (``state["pos"] == 0``) must contain
  the whole prefix (``t >= M``), or the whole document if it is shorter than M (as the
  reference, which asserts that generation starts with a full prefill). A call that starts
  inside the prefix (``0 < pos < M``: the first call was shorter than M and the document
  goes on) cannot know the prefix's later tokens; its outputs and its state are NaN, so the
  mistake cannot go unnoticed. Token-by-token decoding is exact once the prefix is in the
  state, and from the first token when ``prefix_len == 1``.
  State: ``{"S": [B, H, F, Dv (+1)], "pos": int32}``.

  Training note: a prefix token sees the later prefix tokens, so a next-token loss at
  positions ``t < prefix_len - 1`` is trivially solvable (its target is in the input). Mask
  the loss there for language modelling. MQAR is unaffected: its answers are never written
  into the inputs, only the key-value context is.
  """

  Config = JRTConfig

  def __init__(self, d_model: int, cfg: JRTConfig = JRTConfig(), *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.num_heads = h = cfg.num_heads
    self.head_dim = dv = cfg.head_dim or d_model // h
    f = cfg.feature_dim
    self.feature_width = fm.feature_dim(cfg.feature_map, f, upper=cfg.taylor_upper)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    axes = ("embed", "heads", "head_dim")
    self.q = Linear(d_model, (h, f), axes, **kw)
    self.k = Linear(d_model, (h, f), axes, **kw)
    self.v = Linear(d_model, (h, dv), axes, **kw)
    self.k_enc = Linear(d_model, (h, f), axes, **kw)
    self.v_enc = Linear(d_model, (h, dv), axes, **kw)
    self._make_out(h, dv, param_dtype, rngs)

  def _phi(self, x):
    return fm.apply(self.cfg.feature_map, x, upper=self.cfg.taylor_upper)

  def _core(self, x, positions, reset, s0):
    """positions: [B, T] position in the document; reset: document starts or None."""
    b, t, _ = x.shape
    in_prefix = (positions < self.cfg.prefix_len)[..., None, None]
    q, k, v = self._phi(self.q(x)), self._phi(self.k(x)), self.v(x)
    ke = jnp.where(in_prefix, self._phi(self.k_enc(x)), 0).astype(k.dtype)
    ve = self.v_enc(x)
    if self.cfg.normalize:
      v, ve = append_ones(v), append_ones(ve)
    # Causal: decoder keys over all tokens (from s0), encoder keys of prefix tokens j <= t.
    o_dec, s_dec = self._scan(q, k, v, None, s0, reset)
    o_enc, s_enc = self._scan(q, ke, ve, None, None, reset)
    # Non-causal remainder: prefix tokens j > t of the same document. Token t of the
    # reversed pass carries token t+1's encoder key (zero across a document boundary), so
    # the inclusive reversed sum over t' >= t is the strict sum over j > t.
    same_next = (jnp.ones((b, t - 1), bool) if reset is None else ~reset[:, 1:])
    ke_next = jnp.where(same_next[..., None, None], ke[:, 1:], 0).astype(ke.dtype)
    ke_next = jnp.concatenate([ke_next, jnp.zeros_like(ke[:, :1])], axis=1)
    ve_next = jnp.concatenate([ve[:, 1:], jnp.zeros_like(ve[:, :1])], axis=1)
    flip = lambda a: jnp.flip(a, axis=1)
    reset_rev = None
    if reset is not None:  # reversed documents start at each original document's last token
      last = jnp.concatenate([reset[:, 1:], jnp.ones((b, 1), bool)], axis=1)
      reset_rev = flip(last)
    o_later, _ = self._scan(flip(q), flip(ke_next), flip(ve_next), None, None, reset_rev)
    o = (o_dec.astype(jnp.float32) + o_enc.astype(jnp.float32)
         + flip(o_later).astype(jnp.float32))
    if self.cfg.normalize:
      o = normalise(o, self.cfg.eps)
    return self._project_out(o), s_dec + s_enc

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    b, t, _ = x.shape
    pos = segment_positions(segment_ids, b, t)
    return self._core(x, pos, doc_starts(segment_ids), None)[0]

  def _state_shape(self, batch: int):
    return (batch, self.num_heads, self.feature_width, self.head_dim + int(self.cfg.normalize))

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    return {"S": jnp.zeros(self._state_shape(batch), dtype), "pos": jnp.zeros((), jnp.int32)}

  def step(self, x: jax.Array, state):
    """x: [B, t, D]. The first call of a document must cover the prefix (see the class
    docstring); a call starting at ``0 < pos < prefix_len`` returns NaN output and state."""
    self._check_x(x)
    b, t, _ = x.shape
    pos0 = state["pos"]
    positions = jnp.broadcast_to(pos0 + jnp.arange(t, dtype=jnp.int32), (b, t))
    y, sf = self._core(x, positions, None, state["S"])
    bad = (pos0 > 0) & (pos0 < self.cfg.prefix_len)
    y = jnp.where(bad, jnp.nan, y).astype(y.dtype)
    sf = jnp.where(bad, jnp.nan, sf)
    return y, {"S": sf.astype(state["S"].dtype), "pos": pos0 + t}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    return math.prod(self._state_shape(batch))
