"""The inner memories of Memory Caching: one adapter per supported memory mixer, splitting it
into the matrix-memory protocol (project, recur, segment_final, read, finish).

Reference: Behrouz, Li, Deng, Zhong, Razaviyayn, Mirrokni 2026, "Memory Caching: RNNs with
Growing Memory" (arXiv 2602.24281).

Matrix memories (``linear_attention``, ``gla``, ``deltanet``, ``gated_deltanet``): one state
``M [Dk, Dv]`` per head, read as ``read(M, q) = M^T q``. A token whose ``k, v, beta`` and
log decay are zero is an identity update (the state passes through unchanged). The memory
after a segment of L tokens entering at ``S_0`` is, for the linear recurrences, the closed
form::

    S_L = exp(sum_j g_j) S_0 + sum_j (k_j * exp(sum_{i>j} g_i)) v_j^T

with ``g_j`` the log decay (one per head or one per key channel; none for linear
attention). For normalised linear attention the value carries a ones column, so the read
gives the numerator and the denominator ``phi(q) . sum phi(k)`` together.

Titans' LMM (``titans_lmm``): the memory is the weights ``W`` of its memory MLP (a tuple over
layers, per head), read as the MLP's forward pass ``read(W, q) = M(W, q)``. Its recurrence
state is ``(w0, m, s)`` (gradient point, memory, momentum); a cached memory is ``m``
alone. A token with learning rate 0 is not an identity update of this memory (momentum
carries on). The key summaries are the LMM's keys ``k`` (after its short convolution, SiLU
and L2 norm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.common import suffix_sum
from kernels.chunked_scan import linear_recurrence
from kernels.delta_rule import delta_rule
from layers import context_parallel
from layers.common import append_ones, l2norm, normalise
from layers import linear_attention as la
from layers import neural_memory as nm

# The adapters use the inner layers' internals (LinearAttention._phi, ._project_out): the
# inner mixer keeps its exact projections, inits and output stage.
# pylint: disable=protected-access

__all__ = ["mask_tokens", "MatrixMemory", "LinearAttentionMemory", "GatedOutputMemory",
           "GLAMemory", "DeltaMemory", "TitansMemory", "INNER_MIXERS"]


def mask_tokens(proj: dict, ok: jax.Array) -> dict:
  """Tokens where ``ok`` [B, T] is False become identity updates of the memory: k = v = 0,
  beta = 0, log decay = 0 (the state passes through unchanged)."""
  out = dict(proj)
  for name in ("k", "v", "beta", "ld", "ks"):
    a = proj.get(name)
    if a is not None:
      out[name] = jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - 2)), a, 0).astype(a.dtype)
  return out


class MatrixMemory:
  """Adapter base: a mixer whose state is one matrix ``S [B, H, Dk, Dv]`` per head, updated
  by ``kernels.chunked_scan.linear_recurrence`` (``kind = "linear"``) or
  ``kernels.delta_rule.delta_rule`` (``kind = "delta"``) and read as ``S^T q``. Methods take
  the inner module ``m`` explicitly (adapters hold no state).

  The protocol:

    ``project(m, x, segment_ids, state) -> (proj, conv_state)``: per-token
        ``q, k, v, beta, log_decay`` (beta / log_decay None where the mixer has none) and
        ``ks`` (the keys that are mean-pooled into segment summaries);
    ``recur(m, proj, initial_state, reset) -> (o, final_state)``: the recurrence over a
        token stream (a kernel from ``kernels/``); a token whose ``k, v, beta, log_decay``
        are zeroed must leave the state unchanged;
    ``segment_final(m, seg, init) -> final_state``: the memory after a batch of segments;
    ``read(m, states [B, C, H, Dk, Dv], q [B, T, H, Dk]) -> [B, T, C, H, Dv]``;
    ``finish(m, o, x) -> y``: the mixer's output stage;
    ``init_online`` / ``init_cache`` / ``online_size`` / ``cached_size``: the state's
        pieces and their element counts (``state_size``).

  :class:`TitansMemory` (``kind = "mlp"``) replaces ``recur`` / ``segment_final`` by one
  ``recur_cached`` call.
  """

  kind = "linear"

  @staticmethod
  def dims(m) -> tuple[int, int, int, int]:
    """(H, Dk of the state, Dv of the state, Dks of the key summaries)."""
    raise NotImplementedError

  @staticmethod
  def project(m, x, segment_ids, state):
    raise NotImplementedError

  @staticmethod
  def finish(m, o, x):
    raise NotImplementedError

  @classmethod
  def init_online(cls, m, batch: int, dtype):
    """The online memory entering a document: ``[B, H, Dk, Dv]`` zeros."""
    h, dk, dv, _ = cls.dims(m)
    return jnp.zeros((batch, h, dk, dv), dtype)

  @classmethod
  def init_cache(cls, m, batch: int, slots: int, dtype):
    """An empty ring buffer of ``slots`` cached memories: ``[B, slots, H, Dk, Dv]``."""
    h, dk, dv, _ = cls.dims(m)
    return jnp.zeros((batch, slots, h, dk, dv), dtype)

  @classmethod
  def online_size(cls, m, batch: int) -> int:
    """Elements of the online state (:meth:`init_online`)."""
    h, dk, dv, _ = cls.dims(m)
    return batch * h * dk * dv

  @classmethod
  def cached_size(cls, m, batch: int) -> int:
    """Elements of one cached memory (per ring-buffer slot)."""
    h, dk, dv, _ = cls.dims(m)
    return batch * h * dk * dv

  @staticmethod
  def conv_init_state(m, batch: int, dtype) -> dict:
    conv = getattr(m, "conv", None)
    return {} if conv is None else conv.init_state(batch, dtype)

  @staticmethod
  def conv_state_size(m, batch: int) -> int:
    conv = getattr(m, "conv", None)
    return 0 if conv is None else conv.state_size(batch)

  @classmethod
  def recur(cls, m, proj: dict, initial_state, reset, *, split: bool = True):
    """The recurrence over ``proj``'s [B, T, ...] tokens -> (outputs, final state). With
    ``split`` (a row of tokens, not a batch of segments) it is split over a ``sequence``
    mesh in context (``layers.context_parallel``'s drop-ins for the two kernels)."""
    s0 = None if initial_state is None else initial_state.astype(jnp.float32)
    kw = dict(initial_state=s0, reset=reset, chunk_size=m.cfg.chunk_size, impl=m.cfg.impl)
    if cls.kind == "delta":
      fn = context_parallel.delta_rule if split else delta_rule
      return fn(proj["q"], proj["k"], proj["v"], proj["beta"].astype(proj["q"].dtype),
                proj["ld"], **kw)
    fn = context_parallel.linear_recurrence if split else linear_recurrence
    return fn(proj["q"], proj["k"], proj["v"], proj["ld"], **kw)

  @classmethod
  def segment_final(cls, m, seg: dict, init: jax.Array) -> jax.Array:
    """Memory after one segment: ``seg`` holds [M, L, ...] token inputs (masked tokens are
    identity updates), ``init`` [M, H, Dk, Dv] the memory entering it; -> [M, H, Dk, Dv]
    fp32. Delta rule: a kernel call. Linear recurrence: closed form, no kernel,
    ``S_L = exp(sum_j g_j) S_0 + sum_j (k_j * exp(sum_{i>j} g_i)) v_j^T`` with the decay
    to the segment end a sum of exactly the gates in between (``suffix_sum``)."""
    if cls.kind == "delta":
      return cls.recur(m, dict(seg, q=seg["k"]), init, None, split=False)[1]
    k, v, ld = seg["k"].astype(jnp.float32), seg["v"].astype(jnp.float32), seg["ld"]
    s0 = init.astype(jnp.float32)
    if ld is not None:
      ld = ld.astype(jnp.float32)
      scalar = ld.ndim == 3  # [M, L, H]: one decay per head; else [M, L, H, Dk]
      to_end = jnp.exp(suffix_sum(ld, axis=1))
      k = k * (to_end[..., None] if scalar else to_end)
      total = jnp.exp(jnp.sum(ld, axis=1))  # [M, H] or [M, H, Dk]
      s0 = s0 * (total[..., None, None] if scalar else total[..., None])
    return s0 + jnp.einsum("mlhk,mlhv->mhkv", k, v, precision=jax.lax.Precision.HIGHEST)

  @staticmethod
  def read(m, states: jax.Array, q: jax.Array) -> jax.Array:
    """``S_c^T q_t`` for every token t and cached memory c: [B, T, C, H, Dv] (fp32)."""
    del m
    return jnp.einsum("bthk,bchkv->btchv", q.astype(jnp.float32),
                      states.astype(jnp.float32))


class LinearAttentionMemory(MatrixMemory):
  """layers.linear_attention.LinearAttention: ``q, k = phi(W x)``, v (+ a ones column that
  accumulates the normaliser with ``normalize``); summaries from the keys before phi."""

  @staticmethod
  def dims(m):
    return m.num_heads, m.feature_width, m.head_dim + int(m.cfg.normalize), m.qk_dim

  @staticmethod
  def project(m, x, segment_ids, state):
    del segment_ids, state
    ks = m.k(x)
    v = m.v(x)
    if m.cfg.normalize:
      v = append_ones(v)
    return {"q": m._phi(m.q(x)), "k": m._phi(ks), "v": v, "beta": None, "ld": None,
            "ks": ks}, None

  @staticmethod
  def finish(m, o, x):
    del x
    if m.cfg.normalize:
      o = normalise(o, m.cfg.eps)
    if m.norm is not None:
      o = m.norm(o)
    return m._project_out(o)


class GatedOutputMemory(MatrixMemory):
  """Shared output stage of GLA / DeltaNet: per-head RMSNorm (* swish(W_g x)), projection."""

  @staticmethod
  def dims(m):
    return m.num_heads, m.head_dim, m.value_dim, m.head_dim

  @staticmethod
  def finish(m, o, x):
    o = m.norm(o, m.g(x)) if m.g is not None else m.norm(o)
    return m._project_out(o)


class GLAMemory(GatedOutputMemory):
  """layers.linear_attention.GLA: key-wise forget gate, q scaled by Dk^-0.5."""

  @staticmethod
  def project(m, x, segment_ids, state):
    q, k, v = m.q(x), m.k(x), m.v(x)
    conv_state = None
    if m.conv is not None:
      q, k, v, conv_state = m.conv(q, k, v, segment_ids, state)
    q = q * jnp.asarray(m.head_dim ** -0.5, q.dtype)
    return {"q": q, "k": k, "v": v, "beta": None, "ld": m.log_forget_gate(x), "ks": k}, conv_state


class DeltaMemory(GatedOutputMemory):
  """layers.linear_attention.DeltaNet / GatedDeltaNet: q, k SiLU (after the short conv) and
  L2-normalised, q scaled by Dk^-0.5, ``beta = sigmoid(W_b x)``, optional decay."""

  kind = "delta"

  @staticmethod
  def project(m, x, segment_ids, state):
    q, k, v = m.q(x), m.k(x), m.v(x)
    conv_state = None
    if m.conv is not None:
      q, k, v, conv_state = m.conv(q, k, v, segment_ids, state)
    else:
      q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
    q = l2norm(q) * jnp.asarray(m.head_dim ** -0.5, q.dtype)
    k = l2norm(k)
    return {"q": q, "k": k, "v": v, "beta": m.beta(x), "ld": m.log_decay(x), "ks": k}, conv_state


class TitansMemory(MatrixMemory):
  """layers.neural_memory.TitansLMM: the memory is the weights of its memory MLP (a tuple
  over layers of ``[B, H, d_in, d_out]``), updated by ``neural_memory.memory_recurrence``
  (chunked gradient descent with momentum and forgetting) and read as ``M(W, q)``.

  The online state is the recurrence's ``{"w0", "m", "s"}`` (gradient point, memory,
  momentum); a cached memory is ``m`` alone. The online pass and the cached memories come
  from one recurrence call (:meth:`recur_cached`): a segment's memory is the online memory
  right after the segment's last token (``memory_at``), so no masked-token replay is
  needed (a token with learning rate 0 is not an identity update: momentum carries on).
  Keys ``k`` (after the short convolution, SiLU and L2 norm) are the gate summaries.
  """

  kind = "mlp"

  @staticmethod
  def dims(m):
    return m.num_heads, m.head_dim, m.head_dim, m.head_dim

  @staticmethod
  def project(m, x, segment_ids, state):
    q, k, v, (lk, le, th), conv_state = m.project(x, segment_ids, state)
    return {"q": q, "k": k, "v": v, "lk": lk, "le": le, "th": th, "ks": k}, conv_state

  @staticmethod
  def finish(m, o, x):
    return m.output(o, x)

  @classmethod
  def init_online(cls, m, batch: int, dtype):
    w = tuple(jnp.broadcast_to(a, (batch,) + a.shape).astype(dtype)
              for a in m.initial_weights())
    return {"w0": w, "m": w, "s": tuple(jnp.zeros_like(a) for a in w)}

  @classmethod
  def init_cache(cls, m, batch: int, slots: int, dtype):
    return tuple(jnp.zeros((batch, slots, m.num_heads, i, o), dtype)
                 for i, o in m.mlp.shapes())

  @classmethod
  def online_size(cls, m, batch: int) -> int:
    return 3 * m.memory_size(batch)

  @classmethod
  def cached_size(cls, m, batch: int) -> int:
    return m.memory_size(batch)

  @staticmethod
  def recur_cached(m, proj: dict, state, rpos, marks, ends, chunk_size: int):
    """The online recurrence and the memories at segment ends, in one pass.

    rpos [B, T]: each token's position since the memory last restarted (its segment's
    start with ``segment_reset``, else its document's start): the recurrence restarts from
    the initial weights where it is 0 and its chunk grid is ``rpos % chunk_size == 0``.
    marks [B, T] bool: segment ends (at most one per physical chunk: chunk_size <= L), or
    None; ends [B, N]: token indices of the segment ends to return (invalid ones are
    clipped, their memories meaningless). state: the online state or None (fresh).
    Returns ``(o [B, T, H, Dh] fp32, final online state, memories)``, the memories a tuple
    over layers of ``[B, N, H, d_in, d_out]`` fp32 (None without ``marks``).
    """
    b, t = proj["q"].shape[:2]
    mem = None if state is None else (state["w0"], state["m"], state["s"])
    out = nm.memory_recurrence(m.mlp, m.initial_weights(), proj["q"], proj["k"], proj["v"],
                               proj["lk"], proj["le"], proj["th"], chunk_size=chunk_size,
                               state=mem, doc_pos=rpos, memory_at=marks)
    o, (w0, mm, s) = out[:2]
    final = {"w0": w0, "m": mm, "s": s}
    if marks is None:
      return o, final, None
    # With doc_pos given, physical chunks are min(chunk_size, T) tokens from token 0.
    chunk = jnp.clip(ends, 0, t - 1) // min(chunk_size, t)  # [B, N]
    rows = jnp.arange(b)[:, None]
    return o, final, tuple(a[chunk, rows] for a in out[2])

  @staticmethod
  def read(m, states, q: jax.Array) -> jax.Array:
    """``M(W_c, q_t)`` (the memory MLP with cached weights) for every token t and cached
    memory c: states a tuple of ``[B, C, H, d_in, d_out]`` -> ``[B, T, C, H, Dh]`` fp32."""
    qh = jnp.moveaxis(q.astype(jnp.float32), 2, 1)[:, None]  # [B, 1, H, T, Dh]
    r = m.mlp.apply(tuple(w.astype(jnp.float32) for w in states), qh)  # [B, C, H, T, Dh]
    return jnp.transpose(r, (0, 3, 1, 2, 4))


# inner name -> (layer class, adapter).
INNER_MIXERS: dict[str, tuple[type, type]] = {
    "linear_attention": (la.LinearAttention, LinearAttentionMemory),
    "gla": (la.GLA, GLAMemory),
    "deltanet": (la.DeltaNet, DeltaMemory),
    "gated_deltanet": (la.GatedDeltaNet, DeltaMemory),
    "titans_lmm": (nm.TitansLMM, TitansMemory),
}
