"""Softmax attention with Titans' persistent memory (Behrouz, Zhong & Mirrokni 2025, "Titans:
Learning to Memorize at Test Time", Sec. 3.3 and 4), shared by MAC, MAG and MAL.

Persistent memory: ``num_persistent`` learnable tokens ``P`` [Np, D], projected by the
attention's key/value projections. They carry no position: their scores use the queries
before RoPE (position-free "task knowledge"), and a sliding window never drops them::

    s_{i,j} = q_i . k_j / sqrt(Dh)  over  [q_raw_i . k(P), rope(q_i) . rope(k_j)],  one softmax
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.attention import apply_rope
from layers.common import Linear, check, dense_init, is_int, is_num, param, segment_positions
from layers.neural_memory.common import head_dim_of

__all__ = ["PrefixAttention", "attention_fields"]

_NEG_INF = -1e30
_F32 = jnp.float32


def _normal_init(std: float):
  def init(key, shape, dtype):
    return (std * jax.random.normal(key, shape, _F32)).astype(dtype)
  return init


class PrefixAttention(nnx.Module):
  """Softmax attention whose keys are ``[persistent tokens] + context``.

  Persistent tokens ``P`` [Np, D] (learned, N(0, 1) init) are projected by the same key /
  value projections, are never rotated, and are scored with the un-rotated queries:
  ``s_{i,j} = q_i . k_j / sqrt(Dh)`` over ``[q_raw . k_P, rope(q) . rope(k)]``, one softmax.
  """

  def __init__(self, d_model: int, heads: int, num_persistent: int, rope_theta: float, *,
               dtype, param_dtype, rngs: nnx.Rngs):
    self.heads = heads
    self.head_dim = dh = d_model // heads
    self.rope_theta = rope_theta
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (heads, dh), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (heads, dh), ("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (heads, dh), ("embed", "heads", "head_dim"), **kw)
    self.out = param(rngs, dense_init(d_model), (heads, dh, d_model),
                     ("heads", "head_dim", "embed"), param_dtype)
    self.persistent = (param(rngs, _normal_init(1.0), (num_persistent, d_model), (None, "embed"),
                             param_dtype) if num_persistent else None)

  def qkv(self, x, pos):
    """(rotated q, raw q, rotated k, v), each [B, T, H, Dh]."""
    q_raw = self.q(x)
    return (apply_rope(q_raw, pos, self.rope_theta), q_raw,
            apply_rope(self.k(x), pos, self.rope_theta), self.v(x))

  def attend(self, q, q_raw, keys, vals, mask) -> jax.Array:
    """q [B,Tq,H,Dh]; keys/vals [B,Tk,H,Dh]; mask [B,Tq,Tk] -> [B,Tq,D]."""
    scale = 1.0 / math.sqrt(self.head_dim)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, keys.astype(q.dtype),
                   preferred_element_type=_F32) * scale
    s = jnp.where(mask[:, None], s, _NEG_INF)
    vals = vals.astype(self.dtype)
    if self.persistent is not None:
      p = self.persistent[...].astype(self.dtype)
      pk, pv = self.k(p), self.v(p)  # [Np, H, Dh]
      sp = jnp.einsum("bqhd,khd->bhqk", q_raw, pk, preferred_element_type=_F32) * scale
      s = jnp.concatenate([sp, s], axis=-1)
      vals = jnp.concatenate([jnp.broadcast_to(pv, (vals.shape[0],) + pv.shape), vals], 1)
    w = jax.nn.softmax(s, axis=-1).astype(self.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, vals)
    return jnp.einsum("bqhd,hde->bqe", o, self.out[...].astype(self.dtype))

  # ---- sliding window (MAG, MAL): a cache of the last `window` tokens, as layers.attention
  def window_call(self, x, segment_ids, window: int):
    b, t, _ = x.shape
    pos = segment_positions(segment_ids, b, t)
    q, q_raw, k, v = self.qkv(x, pos)
    if context_parallel.sequence_mesh(t) is not None:  # T split over the `sequence` axis
      dh = q.shape[-1]  # q and q_raw travel together (the persistent keys read q_raw)
      return context_parallel.attention(
          jnp.concatenate([q, q_raw], -1), k, v, segment_ids, window=window,
          attend=lambda qc, keys, vals, mask: self.attend(
              qc[..., :dh], qc[..., dh:], keys, vals,
              jnp.broadcast_to(mask, qc.shape[:2] + keys.shape[1:2])))
    i = jnp.arange(t)
    diff = i[:, None] - i[None, :]
    mask = ((diff >= 0) & (diff < window))[None]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return self.attend(q, q_raw, k, v, jnp.broadcast_to(mask, (b, t, t)))

  def window_init_state(self, batch: int, dtype, window: int):
    shape = (batch, window, self.heads, self.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "slot_pos": jnp.full((window,), -1, jnp.int32), "pos": jnp.zeros((), jnp.int32)}

  def window_step(self, x, cache, window: int):
    b, t, _ = x.shape
    pos = cache["pos"]
    q_pos = pos + jnp.arange(t, dtype=jnp.int32)
    q, q_raw, k, v = self.qkv(x, q_pos)
    keys = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], 1)
    vals = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], 1)
    k_pos = jnp.concatenate([cache["slot_pos"], q_pos])
    diff = q_pos[:, None] - k_pos[None, :]
    mask = (k_pos[None, :] >= 0) & (diff >= 0) & (diff < window)
    y = self.attend(q, q_raw, keys, vals, jnp.broadcast_to(mask, (b, t, keys.shape[1])))
    new = {"k": keys[:, t:], "v": vals[:, t:], "slot_pos": k_pos[t:], "pos": pos + t}
    return y, new


def attention_fields(cfg, d_model: int) -> None:
  """Validates the attention fields shared by MAC / MAG / MAL configs."""
  check(is_int(cfg.num_persistent) and cfg.num_persistent >= 0, "num_persistent",
        f"must be an integer >= 0 (got {cfg.num_persistent!r})")
  dh = head_dim_of(d_model, cfg.attn_heads, "attn_heads")
  check(is_num(cfg.rope_theta) and cfg.rope_theta >= 0, "rope_theta",
        f"must be a finite number >= 0, 0 disables RoPE (got {cfg.rope_theta!r})")
  if cfg.rope_theta > 0:
    check(dh % 2 == 0, "attn_heads",
          f"attention head dim d_model / attn_heads = {dh} must be even with RoPE; "
          "change attn_heads or set rope_theta=0")
