"""Memory mixtures: Memory Caching over a matrix-memory mixer or Titans' neural memory, and
Mixture-of-Memories.

References (the math and inits; the code is lcm's own):
  * Behrouz, Li, Deng, Zhong, Razaviyayn, Mirrokni 2026, "Memory Caching: RNNs with Growing
    Memory" (arXiv 2602.24281) (:class:`MemoryCaching`).
  * Du, Sun, Lan, Hu, Cheng 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories"
    (:class:`MoM`); layer as OpenSparseLLMs/MoM ``mom/layers/mom_gated_deltanet.py``, load
    balance as its ``load_balancing_loss_func``.
  * Fedus, Zoph, Shazeer 2021, "Switch Transformers" (eqs. 4-6: the load-balance loss).

Memory Caching (MC)
-------------------
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
t's document, at most the ``max_segments`` most recent ones: decoding keeps a fixed-size
ring buffer of ``max_segments`` cached memories and evicts the oldest, and the parallel
form reads exactly the same window, so both agree at any length (no ``seq_len`` limit).
Reads are combined before the inner mixer's output stage (per-head norm, output gate,
output projection); for normalised linear attention the numerator and the denominator
``phi(q) . sum phi(k)`` are aggregated alike and divided afterwards.

Parallel form (training): one kernel call over the whole row gives the online reads
(``reset`` at document and, with ``segment_reset``, segment starts). The memories of the
full segments (at most ``N = T // L`` per row; a segment cut short by the end of its
document is never read by anyone) are computed by gathering each segment's L tokens:
with ``segment_reset`` all segments at once (``[B * N, L]``), else as a ``lax.scan`` over
the N segments, each continuing from the previous one. A segment's final memory is a
delta-rule kernel call, or for linear recurrences the closed form
``S_L = exp(sum_j g_j) S_0 + sum_j (k_j * exp(sum_{i>j} g_i)) v_j^T`` (no kernel). All cached
memories are then read with batched einsums (dense over segments, weights 0 where
unavailable or not selected: SSC saves reads only at decode time). Cost
O(T (T / L) Dk Dv) on top of the inner mixer, the paper's O(NL); the reads materialise a
``[B, T, N, H, Dv]`` fp32 tensor.

Caveat: only the paper's abstract and secondary summaries were at hand when this was
written (its four variants: residual, GRM, memory soup, SSC; segments cached at their
boundaries; gates from the query and a pooled segment summary). The exact forms above --
zero-initialised segment memories by default, the gate query ``W_u x_t`` against mean keys,
weight 1 on the online read, softmax normalisation -- are this implementation's reading;
check them against the paper's equations before quoting results as a reproduction.

``step`` uses the same machinery on a chunk of any length: segments completing inside the
chunk continue from the online state carried in ``state["S"]`` (their earlier tokens are in
it), then they enter the ring buffer.

Supported inner mixers (``inner``): ``linear_attention``, ``gla``, ``deltanet``,
``gated_deltanet``, ``titans_lmm``. The inner mixer is built from its own Config
(``num_heads``, ``chunk_size``, ``impl`` from MC's config where its Config has the field,
anything else from ``inner_overrides``) and keeps its own parameters and inits; an
*adapter* splits it into the matrix-memory protocol:

  ``project(m, x, segment_ids, state) -> (proj, conv_state)``: per-token
      ``q, k, v, beta, log_decay`` (beta / log_decay None where the mixer has none) and
      ``ks`` (the keys that are mean-pooled into segment summaries);
  ``recur(m, proj, initial_state, reset) -> (o, final_state)``: the recurrence over a token
      stream (a kernel from ``kernels/``); a token whose ``k, v, beta, log_decay`` are
      zeroed must leave the state unchanged;
  ``segment_final(m, seg, init) -> final_state``: the memory after a batch of segments;
  ``read(m, states [B, C, H, Dk, Dv], q [B, T, H, Dk]) -> [B, T, C, H, Dv]``;
  ``finish(m, o, x) -> y``: the mixer's output stage;
  ``init_online`` / ``init_cache`` / ``online_size`` / ``cached_size``: the state's
      pieces and their element counts (``state_size``).

Titans' LMM (``inner="titans_lmm"``, layers/neural_memory.py; adapter ``kind = "mlp"``):
the memory is the weights ``W`` of its memory MLP (a tuple over layers, per head), the
online state its recurrence's ``(w0, m, s)`` (gradient point, memory, momentum), a cached
memory ``M^(i)`` the MLP weights at the end of segment i (``m`` only), and a cached read is
the MLP forward pass with those weights, ``read(M^(i), q_t) = M(M^(i), q_t)``, aggregated
with the same weights ``w_{t,i}`` (gate keys: the mean of the segment's LMM keys ``k``,
after its short convolution, SiLU and L2 norm). The LMM's projections, gates, initial
weights and output stage (per-head norm, gate, projection) are its own. The protocol
differs in one place: a token with learning rate 0 is not an identity update of this
memory (momentum carries on), so segment memories are not replayed from masked tokens;
instead one ``neural_memory.memory_recurrence`` call gives both the online reads and the
memory right after every segment's last token (its ``memory_at`` marks; the adapter's
``recur_cached``), in ``__call__`` and ``step`` alike. Positions passed to it as
``doc_pos``:

  * ``segment_reset=True``: the position inside the segment, so every segment starts from
    the learned initial weights with zero momentum and the LMM's chunk grid (gradient
    points) restarts at every segment start; a chunk_size above L is the same grid as L
    and is capped to L (at most one segment end per physical chunk).
  * ``segment_reset=False``: the document position; the LMM runs on uninterrupted (its own
    chunk grid and document restarts) and the cache holds checkpoints of its memory.
    ``segment_len`` must then be a multiple of ``chunk_size`` (ConfigError on
    ``segment_len``): segment ends fall on chunk ends.

Cost on top of the LMM: O(T (T / L)) MLP reads (the reads materialise
``[B, N, H, T, hidden]`` activations) and a per-chunk extraction of the marked memory.

Mixture-of-Memories (MoM)
-------------------------
``E = num_memories`` gated-delta-rule memories with their own key, value, beta and decay
projections, a shared query projection, and (``shared_memory``) one more memory that every
token updates. Router: ``p_t = softmax(W_r x_t)`` (no bias), the ``top_k`` memories of
``p_t`` are selected and their weights renormalised, ``w_{t,e} = p_{t,e} / sum_{top-k} p``.
A selected memory e is updated by the Gated DeltaNet rule::

    S^e_t = a^e_t S^e_{t-1} + beta^e_t k^e_t (v^e_t - a^e_t S^e_{t-1}^T k^e_t)^T
    o_t = sum_{e in top-k} w_{t,e} S^e_t^T q_t + S^shared_t^T q_t

and a memory that is not selected keeps its state (``beta = 0`` and ``log a = 0`` for that
token): then every memory is one delta-rule recurrence over all tokens with masked beta and
decay, and all memories (plus the shared one) run as extra heads of a single kernel call.
``q, k`` SiLU (after the short convolutions) and L2-normalised, q scaled by ``Dk^-0.5``,
``beta = sigmoid(W_b x)``, ``log a = -exp(A_log) softplus(W_a x + dt_bias)`` with
``A_log``, ``dt_bias`` shared by all memories (as the reference); output per-head RMSNorm *
swish(W_g x), output projection.

Deviations from the reference: the reference sorts each memory's tokens into a compact
sequence and runs the short convolutions on that sequence, with a capacity limit that drops
the oldest tokens; here the convolutions run over the full token stream (before routing:
one convolution per projection, the memories' k / v channels stacked) and no token is
dropped. Both make the masked dense form exact.

Load balance (Switch eqs. 4-6): ``aux = E * sum_e f_e P_e`` with ``f_e`` the fraction of
routing slots given to memory e (``sum_e f_e = 1``, not differentiable) and ``P_e`` the
mean router probability ``p_{t,e}``; 1 for perfectly balanced routing. (The MoM reference
uses the renormalised top-k weights for P and an unnormalised f, equal to ``top_k`` at
balance.) :meth:`MoM.call_with_aux` returns it; ``lcm.model.LM`` sums it over layers and
the trainer adds ``train.aux_loss_weight`` times that sum to the loss (metric
``aux_loss``). ``__call__`` returns the output only, as every mixer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.common import suffix_sum
from kernels.chunked_scan import IMPLS, linear_recurrence
from kernels.delta_rule import delta_rule
from layers.common import (ConfigError, GatedRMSNorm, Linear, RMSNorm, ShortConv, check,
                           dense_init, param, segment_positions)
from layers.common import check_bool, check_d_model, check_pos_int, check_positive, is_num
from layers.common import (a_log_init, append_ones, doc_starts, dt_bias_init, l2norm,
                           normalise)
from layers import linear_attention as la
from layers import neural_memory as nm

# The adapters reuse linear_attention's private helpers and its layers' internals (same
# package): the inner mixer keeps its exact projections, inits and output stage.
# pylint: disable=protected-access

__all__ = ["MemoryCaching", "MemoryCachingConfig", "MoM", "MoMConfig", "INNER_MIXERS",
           "load_balance_loss"]


# ----------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------


def _choice(v: Any, allowed, field: str) -> None:
  check(isinstance(v, str) and v in allowed, field,
        f"must be one of {', '.join(map(repr, allowed))} (got {v!r})")


def _check_kernel_opts(cfg) -> None:
  check_pos_int(cfg.chunk_size, "chunk_size")
  _choice(cfg.impl, IMPLS, "impl")


def _message(e: ConfigError) -> str:
  text = str(e)
  return text[len(e.field) + 2:] if text.startswith(f"{e.field}: ") else text


# ----------------------------------------------------------------------------------
# The matrix-memory protocol: one adapter per supported inner mixer
# ----------------------------------------------------------------------------------


def _mask_tokens(proj: dict, ok: jax.Array) -> dict:
  """Tokens where ``ok`` [B, T] is False become identity updates of the memory: k = v = 0,
  beta = 0, log decay = 0 (the state passes through unchanged)."""
  out = dict(proj)
  for name in ("k", "v", "beta", "ld", "ks"):
    a = proj.get(name)
    if a is not None:
      out[name] = jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - 2)), a, 0).astype(a.dtype)
  return out


class _MatrixMemory:
  """Adapter base: a mixer whose state is one matrix ``S [B, H, Dk, Dv]`` per head, updated
  by ``kernels.chunked_scan.linear_recurrence`` (``kind = "linear"``) or
  ``kernels.delta_rule.delta_rule`` (``kind = "delta"``) and read as ``S^T q``. Methods take
  the inner module ``m`` explicitly (adapters hold no state)."""

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
  def recur(cls, m, proj: dict, initial_state, reset):
    s0 = None if initial_state is None else initial_state.astype(jnp.float32)
    kw = dict(initial_state=s0, reset=reset, chunk_size=m.cfg.chunk_size, impl=m.cfg.impl)
    if cls.kind == "delta":
      return delta_rule(proj["q"], proj["k"], proj["v"], proj["beta"].astype(proj["q"].dtype),
                        proj["ld"], **kw)
    return linear_recurrence(proj["q"], proj["k"], proj["v"], proj["ld"], **kw)

  @classmethod
  def segment_final(cls, m, seg: dict, init: jax.Array) -> jax.Array:
    """Memory after one segment: ``seg`` holds [M, L, ...] token inputs (masked tokens are
    identity updates), ``init`` [M, H, Dk, Dv] the memory entering it; -> [M, H, Dk, Dv]
    fp32. Delta rule: a kernel call. Linear recurrence: closed form, no kernel,
    ``S_L = exp(sum_j g_j) S_0 + sum_j (k_j * exp(sum_{i>j} g_i)) v_j^T`` with the decay
    to the segment end a sum of exactly the gates in between (``suffix_sum``)."""
    if cls.kind == "delta":
      return cls.recur(m, dict(seg, q=seg["k"]), init, None)[1]
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


class _LinearAttentionMemory(_MatrixMemory):
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


class _GatedOutputMemory(_MatrixMemory):
  """Shared output stage of GLA / DeltaNet: per-head RMSNorm (* swish(W_g x)), projection."""

  @staticmethod
  def dims(m):
    return m.num_heads, m.head_dim, m.value_dim, m.head_dim

  @staticmethod
  def finish(m, o, x):
    o = m.norm(o, m.g(x)) if m.g is not None else m.norm(o)
    return m._project_out(o)


class _GLAMemory(_GatedOutputMemory):
  """layers.linear_attention.GLA: key-wise forget gate, q scaled by Dk^-0.5."""

  @staticmethod
  def project(m, x, segment_ids, state):
    q, k, v = m.q(x), m.k(x), m.v(x)
    conv_state = None
    if m.conv is not None:
      q, k, v, conv_state = m.conv(q, k, v, segment_ids, state)
    q = q * jnp.asarray(m.head_dim ** -0.5, q.dtype)
    return {"q": q, "k": k, "v": v, "beta": None, "ld": m.log_forget_gate(x), "ks": k}, conv_state


class _DeltaMemory(_GatedOutputMemory):
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


class _TitansMemory(_MatrixMemory):
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
    "linear_attention": (la.LinearAttention, _LinearAttentionMemory),
    "gla": (la.GLA, _GLAMemory),
    "deltanet": (la.DeltaNet, _DeltaMemory),
    "gated_deltanet": (la.GatedDeltaNet, _DeltaMemory),
    "titans_lmm": (nm.TitansLMM, _TitansMemory),
}


# ----------------------------------------------------------------------------------
# Memory Caching
# ----------------------------------------------------------------------------------


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
    _choice(self.inner, tuple(INNER_MIXERS), "inner")
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
        raise ConfigError("num_heads", f"{self.inner}'s {e.field}: {_message(e)}") from None
      raise ConfigError("inner_overrides", f"{e.field}: {_message(e)}") from None
    except (TypeError, ValueError) as e:  # a value of a type the inner Config cannot take
      raise ConfigError("inner_overrides", f"invalid value for the {self.inner} Config: "
                        f"{type(e).__name__}: {e}") from None
    return cls, adapter, inner_cfg

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    check_pos_int(self.num_heads, "num_heads")
    _check_kernel_opts(self)
    check_pos_int(self.segment_len, "segment_len")
    _choice(self.aggregation, ("gated", "topk"), "aggregation")
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
  docstring for the equations, the parallel form and the decode cache).

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
    seg = _mask_tokens(seg, ok)
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
    """x: [B, t, D], t >= 1 tokens of one document per row, continuing ``state``."""
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


# ----------------------------------------------------------------------------------
# Mixture-of-Memories
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoMConfig:
  """Hyper-parameters of :class:`MoM` (defaults as the reference's gated-DeltaNet MoM, with
  lcm's Gated DeltaNet defaults for the per-memory layer).

  num_memories: routed memories E.
  top_k: memories each token is routed to (<= num_memories).
  shared_memory: one more memory that every token updates and reads.
  num_heads, head_dim, expand_v: heads H, q/k width per head Dk (None: d_model // H), value
    width per head Dv = Dk * expand_v.
  use_gate: swish output gate fused with the per-head RMSNorm; False: RMSNorm only.
  use_short_conv, conv_size, conv_bias: SiLU short convolutions on q, k, v (over the full
    token stream); without them q, k, v get a plain SiLU.
  norm_eps: eps of the per-head norm.
  A_init_max, dt_min, dt_max, dt_init_floor: decay inits as Gated DeltaNet
    (``A ~ U(0, A_init_max]``, ``dt = exp(U[log dt_min, log dt_max])`` floored).
  chunk_size, impl: passed to ``kernels.delta_rule.delta_rule``.
  """

  num_memories: int = 4
  top_k: int = 2
  shared_memory: bool = True
  num_heads: int = 4
  head_dim: int | None = None
  expand_v: float = 2.0
  use_gate: bool = True
  use_short_conv: bool = True
  conv_size: int = 4
  conv_bias: bool = False
  norm_eps: float = 1e-5
  A_init_max: float = 16.0
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  chunk_size: int = 64
  impl: str = "auto"

  def dims(self, d_model: int) -> tuple[int, int]:
    """(Dk, Dv) per head."""
    check_pos_int(self.num_heads, "num_heads")
    if self.head_dim is None:
      check(d_model % self.num_heads == 0, "num_heads",
            f"must divide d_model={d_model} (got {self.num_heads}); or set head_dim")
      dk = d_model // self.num_heads
    else:
      check_pos_int(self.head_dim, "head_dim")
      dk = self.head_dim
    check(is_num(self.expand_v) and self.expand_v > 0, "expand_v",
          f"must be a finite number > 0 (got {self.expand_v!r})")
    dv = dk * self.expand_v
    check(abs(dv - round(dv)) < 1e-6 and round(dv) >= 1, "expand_v",
          f"head_dim * expand_v = {dk} * {self.expand_v} must be a positive integer")
    return dk, int(round(dv))

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    check_pos_int(self.num_memories, "num_memories")
    check_pos_int(self.top_k, "top_k")
    check(self.top_k <= self.num_memories, "top_k",
          f"must be <= num_memories={self.num_memories} (got {self.top_k})")
    self.dims(d_model)
    for f in ("shared_memory", "use_gate", "use_short_conv", "conv_bias"):
      check_bool(getattr(self, f), f)
    check_pos_int(self.conv_size, "conv_size")
    check_positive(self.norm_eps, "norm_eps")
    check_positive(self.A_init_max, "A_init_max")
    check_positive(self.dt_min, "dt_min")
    check_positive(self.dt_max, "dt_max")
    check(self.dt_max >= self.dt_min, "dt_max",
          f"must be >= dt_min={self.dt_min} (got {self.dt_max!r})")
    check(is_num(self.dt_init_floor) and self.dt_init_floor >= 0, "dt_init_floor",
          f"must be a finite number >= 0 (got {self.dt_init_floor!r})")
    _check_kernel_opts(self)


def load_balance_loss(probs: jax.Array, selected: jax.Array) -> jax.Array:
  """Switch-style load-balance loss ``E * sum_e f_e P_e`` (Fedus et al. 2021, eqs. 4-6).

  probs [..., E]: router softmax; selected [..., E] bool: the top-k choice of each token.
  ``f_e`` = share of the routing slots that went to e (sums to 1; no gradient),
  ``P_e`` = mean router probability of e. Equals 1 when routing is perfectly balanced.
  """
  e = probs.shape[-1]
  sel = selected.reshape(-1, e).astype(jnp.float32)
  f = jnp.sum(sel, axis=0) / jnp.maximum(jnp.sum(sel), 1.0)
  p = jnp.mean(probs.reshape(-1, e).astype(jnp.float32), axis=0)
  return e * jnp.sum(jax.lax.stop_gradient(f) * p)


class MoM(nnx.Module):
  """Mixture-of-Memories (Du et al. 2025) with gated-delta-rule memories (see the module
  docstring for the routing, the masked dense form, the deviations and the aux loss).

  Parameters: shared ``q``; router ``W_r [D, E]``; per memory (E routed + the shared one,
  stacked on a memory axis) ``k, v, b (beta), a (decay)`` projections; ``A_log``,
  ``dt_bias`` per head (tag ``ssm``); output gate, per-head norm, output projection.
  State: ``{"S": [B, E (+1), H, Dk, Dv]}`` (+ the q / k / v convolution states).
  """

  Config = MoMConfig

  def __init__(self, d_model: int, cfg: MoMConfig = MoMConfig(), *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.num_heads = h = cfg.num_heads
    dk, dv = cfg.dims(d_model)
    self.head_dim, self.value_dim = dk, dv
    self.num_memories = e = cfg.num_memories
    self.num_slots = m = e + int(cfg.shared_memory)  # memories with a state
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.router = Linear(d_model, e, ("embed", None), **kw)
    self.q = Linear(d_model, (h, dk), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (m, h, dk), ("embed", None, "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (m, h, dv), ("embed", None, "heads", "head_dim"), **kw)
    self.b = Linear(d_model, (m, h), ("embed", None, "heads"), **kw)
    self.a = Linear(d_model, (m, h), ("embed", None, "heads"), **kw)
    self.A_log = param(rngs, a_log_init(cfg.A_init_max), (h,), ("heads",), param_dtype,
                       tag="ssm")
    self.dt_bias = param(rngs, dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
                         (h,), ("heads",), param_dtype, tag="ssm")
    if cfg.use_short_conv:
      ckw = dict(use_bias=cfg.conv_bias, axis_name="heads", **kw)
      self.conv_q = ShortConv(h * dk, cfg.conv_size, **ckw)
      self.conv_k = ShortConv(m * h * dk, cfg.conv_size, **ckw)
      self.conv_v = ShortConv(m * h * dv, cfg.conv_size, **ckw)
    else:
      self.conv_q = self.conv_k = self.conv_v = None
    if cfg.use_gate:
      self.g = Linear(d_model, (h, dv), ("embed", "heads", "head_dim"), **kw)
      self.norm = GatedRMSNorm(dv, eps=cfg.norm_eps, norm_before_gate=True,
                               axis_name="head_dim", **kw)
    else:
      self.g = None
      self.norm = RMSNorm(dv, eps=cfg.norm_eps, axis_name="head_dim", **kw)
    self.out = param(rngs, dense_init(h * dv), (h, dv, d_model),
                     ("heads", "head_dim", "embed"), param_dtype)

  def _check_x(self, x: jax.Array) -> None:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"MoM expects x of shape [B, T, {self.d_model}], got {x.shape}")

  def route(self, x: jax.Array):
    """Router: ``(probs [B, T, E], selected [B, T, E] bool, weights [B, T, E])``; weights are
    the top-k probabilities renormalised to sum 1, 0 for memories not selected."""
    logits = self.router(x).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top, idx = jax.lax.top_k(probs, self.cfg.top_k)
    top = top / jnp.sum(top, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(idx, self.num_memories, dtype=jnp.float32)  # [B, T, k, E]
    weights = jnp.sum(onehot * top[..., None], axis=-2)
    return probs, jnp.sum(onehot, axis=-2) > 0, weights

  def _conv(self, name, u, segment_ids, state, new):
    conv = getattr(self, f"conv_{name}")
    flat = u.reshape(u.shape[:2] + (-1,))
    if conv is None:
      return jax.nn.silu(u)
    if state is None:
      y = conv(flat, segment_ids)
    else:
      y, new[f"conv_{name}"] = conv.step(flat, state[f"conv_{name}"])
    return jax.nn.silu(y).reshape(u.shape)

  def _core(self, x, segment_ids, state):
    """-> (y, final S [B, M, H, Dk, Dv], conv states, aux loss)."""
    b, t, _ = x.shape
    h, dk, dv, m, e = self.num_heads, self.head_dim, self.value_dim, self.num_slots, \
        self.num_memories
    probs, selected, weights = self.route(x)
    new = {}
    q = self._conv("q", self.q(x), segment_ids, state, new)  # [B, T, H, Dk]
    k = self._conv("k", self.k(x), segment_ids, state, new)  # [B, T, M, H, Dk]
    v = self._conv("v", self.v(x), segment_ids, state, new)  # [B, T, M, H, Dv]
    q = l2norm(q) * jnp.asarray(dk ** -0.5, q.dtype)
    k = l2norm(k)
    beta = jax.nn.sigmoid(self.b(x).astype(jnp.float32))  # [B, T, M, H]
    a = self.a(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
    log_decay = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
    routed = selected
    mix = weights
    if self.cfg.shared_memory:
      routed = jnp.concatenate([routed, jnp.ones((b, t, 1), bool)], axis=-1)
      mix = jnp.concatenate([mix, jnp.ones((b, t, 1), jnp.float32)], axis=-1)
    # A memory not routed to keeps its state: beta = 0, log decay = 0 for that token.
    beta = jnp.where(routed[..., None], beta, 0.0)
    log_decay = jnp.where(routed[..., None], log_decay, 0.0)
    flat = lambda u: u.reshape((b, t, m * h) + u.shape[4:])
    q_all = jnp.broadcast_to(q[:, :, None], (b, t, m, h, dk))
    s0 = None if state is None else state["S"].reshape(b, m * h, dk, dv).astype(jnp.float32)
    reset = doc_starts(segment_ids)
    o, sf = delta_rule(flat(q_all), flat(k), flat(v), flat(beta).astype(q.dtype),
                       flat(log_decay), initial_state=s0, reset=reset,
                       chunk_size=self.cfg.chunk_size, impl=self.cfg.impl)
    o = o.reshape(b, t, m, h, dv).astype(jnp.float32)
    o = jnp.einsum("btm,btmhv->bthv", mix, o)
    o = o.astype(self.dtype)
    o = self.norm(o, self.g(x)) if self.g is not None else self.norm(o)
    y = jnp.einsum("bthd,hde->bte", o.astype(self.dtype), self.out[...].astype(self.dtype))
    aux = load_balance_loss(probs, selected)
    return y, sf.reshape(b, m, h, dk, dv), new, aux

  def call_with_aux(self, x: jax.Array, segment_ids: jax.Array | None = None):
    """``(y, aux)``: the output and this layer's load-balance loss (a scalar)."""
    self._check_x(x)
    y, _, _, aux = self._core(x, segment_ids, None)
    return y, aux

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    return self.call_with_aux(x, segment_ids)[0]

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    state = {"S": jnp.zeros((batch, self.num_slots, self.num_heads, self.head_dim,
                             self.value_dim), dtype)}
    for name in ("q", "k", "v"):
      conv = getattr(self, f"conv_{name}")
      if conv is not None:
        state[f"conv_{name}"] = conv.init_state(batch, dtype)
    return state

  def step(self, x: jax.Array, state):
    self._check_x(x)
    y, sf, conv_state, _ = self._core(x, None, state)
    new = {"S": sf.astype(state["S"].dtype)}
    new.update(conv_state)
    return y, new

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    n = batch * self.num_slots * self.num_heads * self.head_dim * self.value_dim
    for name in ("q", "k", "v"):
      conv = getattr(self, f"conv_{name}")
      if conv is not None:
        n += batch * (conv.kernel_size - 1) * conv.channels
    return n
