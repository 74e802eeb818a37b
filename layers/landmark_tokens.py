"""The sequence layout of landmark attention: a learned landmark token after every block.

Landmark attention (Mohtashami & Jaggi 2023) trains on rows in which every block of
``block_size`` positions ends with a landmark token whose key represents the block. The LM
therefore runs its layers on an *extended* row: after every ``every = block_size - 1`` real
tokens of each document it inserts the learned landmark embedding, and it returns outputs
only at the real tokens (the reference's ``MemLMCache`` + ``get_final_logits``). Callers never
see landmarks: tokens in, one output row per token out.

This is the landmark mixer's *sequence-layout hook* (see ``docs/design.md``): a mixer class
may define ``sequence_layout(configs, *, d_model, param_dtype, rngs)`` returning a module with
``__call__(x, segment_ids, run)``, ``cache_len(max_len)``, ``init_state(layer_state)`` and
``step(x, state, apply, params, out_dim)``; ``lcm/model.py`` calls it and knows nothing about
landmarks.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import ConfigError, param, segment_positions


def landmark_layout(segment_ids, batch: int, length: int, every: int):
  """Where tokens and landmarks go when a landmark follows every ``every`` tokens of each
  document. Returns ``(tok_idx [B, T], lm_idx [B, T], has_lm [B, T], ext_len)``: token j
  moves to ``tok_idx[j]`` of the extended row; when ``has_lm[j]`` a landmark follows it at
  ``lm_idx[j]``. ``ext_len = T + T // every`` bounds every row (the tail is padding)."""
  pos = segment_positions(segment_ids, batch, length)
  has_lm = (pos + 1) % every == 0
  before = jnp.cumsum(has_lm, axis=1) - has_lm
  tok_idx = jnp.arange(length)[None] + before
  return tok_idx, tok_idx + 1, has_lm, length + length // every


def _normal_init(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


class LandmarkTokens(nnx.Module):
  """Inserts a learned landmark embedding after every ``every`` tokens of each document."""

  def __init__(self, every: int, d_model: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.every = int(every)
    self.embedding = param(rngs, _normal_init, (d_model,), ("embed",), param_dtype)

  @classmethod
  def from_configs(cls, configs: Sequence[Any], *, d_model: int, param_dtype=jnp.float32,
                   rngs: nnx.Rngs) -> "LandmarkTokens":
    """One layout for all landmark layers of a model; they must share one ``block_size``."""
    blocks = sorted({int(c["block_size"]) for c in configs})
    if len(blocks) != 1:
      raise ConfigError("model.mixers", f"landmark layers must share one block_size "
                        f"(got {blocks})")
    return cls(blocks[0] - 1, d_model, param_dtype=param_dtype, rngs=rngs)

  def cache_len(self, max_len: int | None) -> int | None:
    """Positions a layer's state must hold for ``max_len`` real tokens."""
    return None if max_len is None else max_len + max_len // self.every + 1

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None,
               run: Callable[[jax.Array, jax.Array | None], tuple[jax.Array, Any]]):
    """``run(extended x, extended segment ids) -> (h, aux)`` over the extended row; returns
    ``(h at the real tokens [B, T, D], aux)``."""
    b, t = x.shape[:2]
    if segment_ids is None:
      return self._periodic(x, run)
    tok_idx, lm_idx, has_lm, ext = landmark_layout(segment_ids, b, t, self.every)
    rows = jnp.arange(b)[:, None]
    lm_at = jnp.where(has_lm, lm_idx, ext)  # out of range (dropped) where no landmark follows
    xe = jnp.zeros((b, ext, x.shape[-1]), x.dtype).at[rows, tok_idx].set(x)
    lm = jnp.broadcast_to(self.embedding[...].astype(x.dtype), x.shape)
    xe = xe.at[rows, lm_at].set(lm, mode="drop")
    if segment_ids is not None:  # landmarks join their document; the tail gets its own id
      se = jnp.full((b, ext), jnp.max(segment_ids) + 1, segment_ids.dtype)
      se = se.at[rows, tok_idx].set(segment_ids)
      segment_ids = se.at[rows, lm_at].set(segment_ids, mode="drop")
    h, aux = run(xe, segment_ids)
    return jnp.take_along_axis(h, tok_idx[..., None], axis=1), aux  # drop landmark outputs

  def _periodic(self, x, run):
    """One document per row: a landmark after every ``every`` tokens is a reshape (the same
    row as :func:`landmark_layout` gives). Reshapes keep a ``sequence``-sharded row local:
    with ``every`` dividing the shard length, the extended shards hold whole blocks and
    no token changes device (a scatter would gather the whole row)."""
    b, t, d = x.shape
    full = t // self.every * self.every
    groups = x[:, :full].reshape(b, full // self.every, self.every, d)
    lm = jnp.broadcast_to(self.embedding[...].astype(x.dtype), (b, groups.shape[1], 1, d))
    xe = jnp.concatenate([groups, lm], axis=2).reshape(b, -1, d)
    cut = xe.shape[1]
    h, aux = run(jnp.concatenate([xe, x[:, full:]], axis=1), None)
    body = h[:, :cut].reshape(b, full // self.every, self.every + 1, h.shape[-1])
    out = body[:, :, :self.every].reshape(b, full, h.shape[-1])
    return jnp.concatenate([out, h[:, cut:]], axis=1), aux

  def init_state(self, layer_state) -> dict:
    """The layers' state plus the count of real tokens seen."""
    return {"layers": layer_state, "tokens": jnp.zeros((), jnp.int32)}

  def step(self, x: jax.Array, state: dict, apply: Callable, params, out_dim: int):
    """Decode / chunked prefill of embedded tokens ``x [B, t, D]``: each token, then (after
    every ``every``-th real token of the stream) a landmark, through
    ``apply(params, inp [B, 1, D], layer_state) -> (out [B, 1, out_dim], layer_state)``.
    ``params`` is carried through the loops so they trace it at their own level. Returns
    ``(out [B, t, out_dim], state)`` with one row per real token."""
    lm = jnp.broadcast_to(self.embedding[...].astype(x.dtype), x[:, :1].shape)
    every = self.every

    def one(carry, xi):
      """A token, then maybe a landmark: one or two passes of a while loop (a ``lax.cond``
      around the layers would copy every KV cache per token)."""
      st, n, p = carry
      n = n + 1
      passes = 1 + (n % every == 0).astype(jnp.int32)

      def body(c):
        i, s, out, pp = c
        y, s = apply(pp, jnp.where(i == 0, xi[:, None], lm), s)
        return i + 1, s, jnp.where(i == 0, y[:, 0], out), pp

      init = (jnp.zeros((), jnp.int32), st, jnp.zeros((xi.shape[0], out_dim), jnp.float32), p)
      _, st, out, _ = jax.lax.while_loop(lambda c: c[0] < passes, body, init)
      return (st, n, p), out

    if x.shape[1] == 1:  # decode: no scan around the caches
      (layers, n, _), out = one((state["layers"], state["tokens"], params), x[:, 0])
      return out[:, None], {"layers": layers, "tokens": n}
    (layers, n, _), out = jax.lax.scan(one, (state["layers"], state["tokens"], params),
                                       jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(out, 0, 1), {"layers": layers, "tokens": n}
