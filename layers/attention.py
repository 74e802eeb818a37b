"""Causal softmax attention: multi-head / grouped-query, RoPE, sliding window, KV cache.

References (the math only; the code is lcm's own):
  * Vaswani et al. 2017, "Attention Is All You Need" (scaled dot-product attention).
  * Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding" (RoPE).
  * Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
    Multi-Head Checkpoints" (grouped-query attention).
  * Beltagy et al. 2020, "Longformer" (sliding-window attention).

The mixer contract (see docs/design.md):
  * ``y = attn(x, segment_ids)``: training / prefill. Mask = causal AND same document AND
    (``0 <= q_pos - k_pos < window`` when ``window`` is set). RoPE positions restart at 0 at
    every document start, so a document packed into a row gives the same output as run alone.
    Full attention (and any call with ``segment_ids``) materialises the [B, H, T, T] score
    matrix. Sliding-window attention without ``segment_ids`` and with T > 2 * ``block_size``
    runs on ``kernels.block_sparse`` over :func:`sliding_window_blocks` lists instead
    (T padded up to a multiple of ``block_size``, outputs sliced back): O(T * window) time
    and memory. The kernel has no document mask, so packed documents keep the dense masked
    path (exact, O(T^2)); see :meth:`Attention.uses_block_sparse`.
  * Context parallelism: with a ``sequence`` mesh in context (``layers.context_parallel``)
    each shard attends with its own queries to all-gathered keys and values (full
    attention) or to a halo of ``window - 1`` previous keys (sliding window), dense masked.
  * ``state = attn.init_state(batch, dtype, max_len=...)``: an empty KV cache.
  * ``y, state = attn.step(x, state)``: ``t >= 1`` new tokens of one document per row.

KV cache layout (a plain dict of arrays, so it jits, scans and shards like any pytree)::

    {"k": [B, L, Hkv, Dh], "v": [B, L, Hkv, Dh],
     "slot_pos": [L] int32   absolute position of the token in each slot, -1 = empty,
     "pos": int32 scalar     number of tokens seen so far}

``L = min(window, max_len)`` with a window, else ``max_len``. ``step`` attends over the
concatenation [cache, new tokens] and keeps its last L entries as the new cache, so any chunk
size (also ``t > L``) gives the same result. The cache always holds the last L tokens, and
``step`` masks keys with ``q_pos - k_pos >= L``: decoding is exact while at most ``max_len``
tokens have been seen; past that, a full-attention cache behaves exactly (and independently of
the chunking) like sliding-window attention with ``window = max_len``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.block_sparse import block_sparse_attention, sliding_window_blocks
from layers import context_parallel
from layers.common import ConfigError, Linear, check, dense_init, param, segment_positions
from layers.common import is_int

_NEG_INF = -1e30  # finite, so a (never expected) fully masked row cannot produce NaNs


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Hyper-parameters of :class:`Attention`.

  num_heads: query heads H.
  num_kv_heads: key/value heads; None -> num_heads (MHA); a divisor of num_heads -> GQA
    (query head h uses kv head ``h // (num_heads // num_kv_heads)``); 1 -> MQA.
  head_dim: per-head width Dh; None -> d_model // num_heads.
  rope_theta: RoPE base; 0 disables RoPE.
  window: sliding window; a query attends to keys with ``0 <= q_pos - k_pos < window``.
    None = full causal attention.
  max_len: KV-cache capacity used by ``init_state`` when ``max_len`` is not passed.
  block_size: query/key block of the block-sparse sliding-window path of ``__call__``
    (used only when ``window`` is set; T is padded up to a multiple of it). Pallas kernels
    need a multiple of 16 (GPU: a power of two); other sizes run the ``xla`` implementation.
  """

  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_theta: float = 10000.0
  window: int | None = None
  max_len: int = 4096
  block_size: int = 64

  def validate(self, d_model: int) -> None:
    """Raises ConfigError(field, message) for the first invalid field."""
    check(is_int(d_model) and d_model >= 1, "d_model",
          f"must be a positive integer (got {d_model!r})")
    check(is_int(self.num_heads) and self.num_heads >= 1, "num_heads",
          f"must be a positive integer (got {self.num_heads!r})")
    if self.num_kv_heads is not None:
      check(is_int(self.num_kv_heads) and self.num_kv_heads >= 1, "num_kv_heads",
            f"must be None or a positive integer (got {self.num_kv_heads!r})")
      check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
            f"must divide num_heads={self.num_heads} (got {self.num_kv_heads})")
    if self.head_dim is None:
      check(d_model % self.num_heads == 0, "num_heads",
            f"must divide d_model={d_model} (got {self.num_heads}); "
            "or set head_dim explicitly")
      head_dim = d_model // self.num_heads
    else:
      check(is_int(self.head_dim) and self.head_dim >= 1, "head_dim",
            f"must be None or a positive integer (got {self.head_dim!r})")
      head_dim = self.head_dim
    check(isinstance(self.rope_theta, (int, float)) and not isinstance(self.rope_theta, bool)
          and math.isfinite(self.rope_theta) and self.rope_theta >= 0, "rope_theta",
          f"must be a finite number >= 0, 0 disables RoPE (got {self.rope_theta!r})")
    if self.rope_theta > 0:
      check(head_dim % 2 == 0, "head_dim",
            f"must be even when RoPE is on (got head_dim={head_dim}); "
            "set an even head_dim or rope_theta=0")
    if self.window is not None:
      check(is_int(self.window) and self.window >= 1, "window",
            f"must be None or an integer >= 1 (got {self.window!r})")
    check(is_int(self.max_len) and self.max_len >= 1, "max_len",
          f"must be an integer >= 1 (got {self.max_len!r})")
    check(is_int(self.block_size) and self.block_size >= 1, "block_size",
          f"must be an integer >= 1 (got {self.block_size!r})")


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention (Su et al. 2021), for any leading shape.

  x: [..., Dh] (Dh even); positions: integer positions broadcastable to ``x.shape[:-1]``.
  Dimension pair (i, i + Dh/2) is rotated by the angle ``pos * theta**(-2i/Dh)``. Computed
  in fp32, returned in x.dtype. ``theta == 0`` returns x unchanged.
  """
  if theta == 0:
    return x
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  # cos/sin at the positions' own shape (e.g. once for all heads), broadcast against x.
  ang = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """:func:`rope` for x [B, T, H, Dh] with positions [B, T] or [T] (shared by the heads)."""
  return rope(x, jnp.broadcast_to(positions, x.shape[:2])[:, :, None], theta)


class Attention(nnx.Module):
  """Causal softmax attention (MHA / GQA / MQA) with RoPE, sliding window and a KV cache."""

  Config = AttentionConfig

  def __init__(self, d_model: int, cfg: AttentionConfig = AttentionConfig(), *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.num_heads = cfg.num_heads
    self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
    self.head_dim = cfg.head_dim or d_model // cfg.num_heads
    self.dtype = dtype
    h, hkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (h, dh), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (hkv, dh), ("embed", "kv_heads", "head_dim"), **kw)
    self.v = Linear(d_model, (hkv, dh), ("embed", "kv_heads", "head_dim"), **kw)
    self.out = param(rngs, dense_init(h * dh), (h, dh, d_model), ("heads", "head_dim", "embed"),
                     param_dtype)

  # ---------------------------------------------------------------- helpers
  def _check_x(self, x: jax.Array) -> None:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"Attention expects x of shape [B, T, {self.d_model}], got {x.shape}")

  def _qkv(self, x: jax.Array, positions: jax.Array):
    q = self.q(x)
    k = self.k(x)
    v = self.v(x)
    q = apply_rope(q, positions, self.cfg.rope_theta)
    k = apply_rope(k, positions, self.cfg.rope_theta)
    return q, k, v

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,Tq,H,Dh], k/v [B,Tk,Hkv,Dh], mask broadcastable to [B,Tq,Tk] -> [B,Tq,D]."""
    return self._project(self._attend_heads(q, k, v, mask))

  def _project(self, o: jax.Array) -> jax.Array:
    """Per-head outputs o [B,T,H,Dh] -> the output projection [B,T,D]."""
    return jnp.einsum("bqhd,hde->bqe", o, self.out[...].astype(self.dtype))

  def _attend_heads(self, q, k, v, mask) -> jax.Array:
    """Dense masked attention, per-head outputs [B,Tq,H,Dh] (see ``_attend``)."""
    b, tq, h, dh = q.shape
    hkv = self.num_kv_heads
    g = h // hkv
    qg = q.reshape(b, tq, hkv, g, dh)
    k = k.astype(self.dtype)
    v = v.astype(self.dtype)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    s = s * (1.0 / math.sqrt(dh))
    mask = jnp.broadcast_to(mask, (b, tq, k.shape[1]))[:, None, None]
    s = jnp.where(mask, s, _NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(self.dtype)
    return jnp.einsum("bhgqk,bkhd->bqhgd", p, v).reshape(b, tq, h, dh)

  def _window_heads(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal sliding-window attention of one document per row on the block-sparse kernel:
    q [B,T,H,Dh], k/v [B,T,Hkv,Dh] -> [B,T,H,Dh]. T is padded at the end to a multiple of
    ``block_size`` (padded keys lie after every real query, so the causal mask hides them;
    padded queries are sliced off)."""
    t = q.shape[1]
    bs = self.cfg.block_size
    tp = -(-t // bs) * bs
    pad = lambda a: jnp.pad(a, ((0, 0), (0, tp - t), (0, 0), (0, 0))) if tp > t else a
    idx, cnt = sliding_window_blocks(tp, bs, self.cfg.window)
    o = block_sparse_attention(pad(q), pad(k.astype(self.dtype)), pad(v.astype(self.dtype)),
                               idx, cnt, block_size=bs, causal=True,
                               scale=1.0 / math.sqrt(self.head_dim), window=self.cfg.window)
    return o[:, :t]

  def uses_block_sparse(self, seq_len: int, segment_ids: jax.Array | None = None) -> bool:
    """Whether ``__call__`` on ``seq_len`` tokens runs the block-sparse sliding-window kernel:
    a window is set, no packed documents (the kernel has no document mask) and the padded
    length exceeds two blocks (below that the dense path is as cheap)."""
    bs = self.cfg.block_size
    return (self.cfg.window is not None and segment_ids is None
            and -(-seq_len // bs) * bs > 2 * bs)

  def cache_len(self, max_len: int | None = None) -> int:
    """Number of KV-cache slots L for a cache built with ``max_len`` (default cfg.max_len)."""
    max_len = self.cfg.max_len if max_len is None else max_len
    if not is_int(max_len) or max_len < 1:
      raise ConfigError("max_len", f"must be an integer >= 1 (got {max_len!r})")
    return max_len if self.cfg.window is None else min(self.cfg.window, max_len)

  # ---------------------------------------------------------------- contract
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, T, D]; segment_ids: [B, T] int (packed documents) or None -> [B, T, D]."""
    self._check_x(x)
    b, t, _ = x.shape
    pos = segment_positions(segment_ids, b, t)
    q, k, v = self._qkv(x, pos)
    if context_parallel.sequence_mesh(t) is not None:  # T split over the `sequence` axis
      return self._project(context_parallel.attention(
          q, k, v, segment_ids, window=self.cfg.window, attend=self._attend_heads,
          scale=1.0 / math.sqrt(self.head_dim), dtype=self.dtype))
    if self.uses_block_sparse(t, segment_ids):
      return self._project(self._window_heads(q, k, v))
    i = jnp.arange(t)
    mask = (i[:, None] >= i[None, :])[None]  # [1, T, T]
    if self.cfg.window is not None:
      mask = mask & ((i[:, None] - i[None, :]) < self.cfg.window)[None]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return self._attend(q, k, v, mask)

  def init_state(self, batch: int, dtype=jnp.float32, *,
                 max_len: int | None = None) -> dict[str, jax.Array]:
    """An empty KV cache for ``batch`` rows holding up to ``cache_len(max_len)`` tokens."""
    length = self.cache_len(max_len)
    shape = (batch, length, self.num_kv_heads, self.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "slot_pos": jnp.full((length,), -1, jnp.int32),
        "pos": jnp.zeros((), jnp.int32),
    }

  def step(self, x: jax.Array, state: dict[str, jax.Array]):
    """x: [B, t, D] (t >= 1, the next t tokens of one document per row) -> (y, new state)."""
    self._check_x(x)
    b, t, _ = x.shape
    k_cache, v_cache, slot_pos, pos = state["k"], state["v"], state["slot_pos"], state["pos"]
    length = k_cache.shape[1]
    q_pos = pos + jnp.arange(t, dtype=jnp.int32)  # [t]
    q, k, v = self._qkv(x, q_pos)
    keys = jnp.concatenate([k_cache, k.astype(k_cache.dtype)], axis=1)
    vals = jnp.concatenate([v_cache, v.astype(v_cache.dtype)], axis=1)
    k_pos = jnp.concatenate([slot_pos, q_pos])  # [L + t]
    diff = q_pos[:, None] - k_pos[None, :]
    # length <= window, so this is also the sliding-window mask when a window is set.
    mask = (k_pos[None, :] >= 0) & (diff >= 0) & (diff < length)
    y = self._attend(q, keys, vals, mask[None])
    new_state = {
        "k": keys[:, t:],
        "v": vals[:, t:],
        "slot_pos": k_pos[t:],
        "pos": pos + t,
    }
    return y, new_state

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    """Elements of the float leaves of the state (the K and V caches); the int32 bookkeeping
    (``slot_pos``: L, ``pos``: 1) is not counted."""
    return 2 * batch * self.cache_len(max_len) * self.num_kv_heads * self.head_dim
