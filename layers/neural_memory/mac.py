"""Titans' memory as context (MAC, ``titans_mac``; Behrouz, Zhong & Mirrokni 2025, "Titans:
Learning to Memorize at Test Time", Sec. 4.1).

The document is cut into segments of ``segment_len`` tokens. For segment s with tokens x
(queries ``q_x = l2norm(silu(x W_q))`` with the memory's query projection, no convolution),
``P`` the persistent tokens (:mod:`layers.neural_memory.prefix_attention`) and LMM the neural
memory (:mod:`layers.neural_memory.lmm`)::

    h = LMM-read(M_{s-1}, q_x)                   memory state at the segment start
    y = norm_y(Attn([P] || h || x))              queries: x; token i sees P, h_{<=i}, x_{<=i}
    r = LMM(y)  (updates the memory with y, per token, then reads with q from y)
    o = y * sigmoid(norm_r(r))

The paper writes ``o = y (x) M(y)``; the two RMSNorms have learned scales, as the paper's MAG
gate. ``h_i`` depends on x_i, so the memory tokens are causally masked too (all of h would
leak later tokens into earlier ones). RoPE positions: h_j and x_j share position j.

Without ``segment_ids`` the layer runs segment-parallel (a scan over segments, attention and
the memory update parallel inside; ``segment_len`` must be a multiple of ``chunk_size`` so the
memory's chunks align with segments). With ``segment_ids``, and in ``step``, it runs the
exact token-by-token form (a scan over tokens), which equals the segment-parallel one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.neural_memory import Weights
from layers import context_parallel
from layers.common import RMSNorm, check, check_pos_int, doc_starts
from layers.neural_memory.common import check_x, fields_of, select_rows
from layers.neural_memory.lmm import TitansLMM, TitansLMMConfig
from layers.neural_memory.prefix_attention import PrefixAttention, attention_fields

__all__ = ["TitansMAC", "TitansMACConfig"]

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TitansMACConfig(TitansLMMConfig):
  """:class:`TitansLMMConfig` fields (the memory) plus:

  segment_len: segment length of the attention (a multiple of chunk_size).
  num_persistent: learnable persistent-memory tokens (0 = none).
  attn_heads: attention heads (must divide d_model; head dim even with RoPE).
  rope_theta: RoPE base of the attention (0 disables it).
  """

  segment_len: int = 64
  num_persistent: int = 4
  attn_heads: int = 4
  rope_theta: float = 10000.0

  def validate(self, d_model: int) -> None:
    super().validate(d_model)
    check_pos_int(self.segment_len, "segment_len")
    check(self.segment_len % self.chunk_size == 0, "segment_len",
          f"must be a multiple of chunk_size={self.chunk_size} (got {self.segment_len}) so "
          "that the memory's chunks align with the segments")
    attention_fields(self, d_model)


class TitansMAC(nnx.Module):
  """Memory as context (module docstring): per segment, attention over ``[persistent
  tokens, memory read h, segment]`` (causal), the memory updated with the attention output
  y, and ``o = norm_y(y) * sigmoid(norm_r(LMM(norm_y(y))))``.

  State: ``{"lmm": the memory's state (w0, m, s, pos, conv), "mseg": the memory weights at
  the current segment start, "hk"/"hv"/"xk"/"xv": [B, segment_len, Ha, Dha] the segment's
  keys/values of h and x, "pos": [B] int32}``.
  """

  Config = TitansMACConfig

  def __init__(self, d_model: int, cfg: TitansMACConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg = TitansMACConfig() if cfg is None else cfg
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lmm = TitansLMM(d_model, fields_of(cfg, TitansLMMConfig), **kw)
    self.attn = PrefixAttention(d_model, cfg.attn_heads, cfg.num_persistent, cfg.rope_theta,
                                **kw)
    self.norm_y = RMSNorm(d_model, **kw)
    self.norm_r = RMSNorm(d_model, **kw)

  def _check_x(self, x: jax.Array) -> None:
    check_x(self, x)

  def _gate(self, y, r):
    """o = y * sigmoid(norm_r(r)) (y already normalised)."""
    return (y.astype(_F32) * jax.nn.sigmoid(self.norm_r(r).astype(_F32))).astype(self.dtype)

  def memory_tokens(self, weights: Weights, x: jax.Array) -> jax.Array:
    """h = the memory's read of x's queries with ``weights`` -> ``[B, T, D]``."""
    return self.lmm.output(self.lmm.read(weights, self.lmm.query(x)), x)

  def segment_attention(self, x, h, pos) -> jax.Array:
    """Attention of one segment: queries x_i, keys [P, h_{<=i}, x_{<=i}] (RoPE position
    ``pos`` [L] for both h_j and x_j) -> y [B, L, D]."""
    b, ls, _ = x.shape
    q, q_raw, kx, vx = self.attn.qkv(x, pos)
    _, _, kh, vh = self.attn.qkv(h, pos)
    tri = jnp.tril(jnp.ones((ls, ls), bool))
    mask = jnp.broadcast_to(jnp.concatenate([tri, tri], 1), (b, ls, 2 * ls))
    return self.attn.attend(q, q_raw, jnp.concatenate([kh, kx], 1),
                            jnp.concatenate([vh, vx], 1), mask)

  def _segments(self, x, state, first=0):
    """Segment-parallel form (no documents): scan over the segments of x [B, T, D] from
    the memory ``state``; ``first`` is the index of x's first segment in the row (RoPE
    positions). Returns (y, final memory state)."""
    b, t, d = x.shape
    ls = min(self.cfg.segment_len, t)  # one segment needs no padding (causal inside)
    n = -(-t // ls)
    xp = jnp.pad(x, ((0, 0), (0, n * ls - t), (0, 0)))
    xs = jnp.moveaxis(xp.reshape(b, n, ls, d), 1, 0)

    def body(state, inp):
      xseg, i = inp
      h = self.memory_tokens(state["m"], xseg)
      y = self.segment_attention(xseg, h, i * ls + jnp.arange(ls, dtype=jnp.int32))
      y = self.norm_y(y)
      r, state = self.lmm._run(y, None, state, aligned=True)
      return state, self._gate(y, r)

    state, ys = jax.lax.scan(body, state, (xs, first + jnp.arange(n, dtype=jnp.int32)))
    return jnp.moveaxis(ys, 0, 1).reshape(b, n * ls, d)[:, :t], state

  def _token(self, state, x_t):
    """One token per row: x_t [B, 1, D] -> (o_t, new state)."""
    ls = self.cfg.segment_len
    b = x_t.shape[0]
    pos = state["pos"]  # [B]
    j = pos % ls
    new_seg = j == 0
    mseg = select_rows(new_seg, state["lmm"]["m"], state["mseg"])
    h_t = self.memory_tokens(mseg, x_t)
    q, q_raw, kx, vx = self.attn.qkv(x_t, pos[:, None])
    _, _, kh, vh = self.attn.qkv(h_t, pos[:, None])
    rows = jnp.arange(b)
    cache = {}
    for name, new in (("hk", kh), ("hv", vh), ("xk", kx), ("xv", vx)):
      cache[name] = state[name].at[rows, j].set(new[:, 0].astype(state[name].dtype))
    visible = jnp.arange(ls)[None, :] <= j[:, None]  # [B, Ls]
    mask = jnp.concatenate([visible, visible], 1)[:, None, :]
    y = self.attn.attend(q, q_raw, jnp.concatenate([cache["hk"], cache["xk"]], 1),
                         jnp.concatenate([cache["hv"], cache["xv"]], 1), mask)
    y = self.norm_y(y)
    r, lmm = self.lmm.step(y, state["lmm"])
    o = self._gate(y, r)
    dt = state["mseg"][0].dtype
    new_state = {"lmm": lmm, "mseg": tuple(w.astype(dt) for w in mseg), **cache,
                 "pos": pos + 1}
    return o, new_state

  def _tokens(self, x, state, reset=None):
    """Token-by-token scan. reset: [B, T] bool (document starts) or None."""
    init = self.init_state(x.shape[0], state["mseg"][0].dtype) if reset is not None else None

    def body(st, inp):
      x_t, r_t = inp
      if r_t is not None:  # every leaf has the batch axis first
        st = jax.tree.map(
            lambda a, z: jnp.where(r_t.reshape((-1,) + (1,) * (a.ndim - 1)), z, a), st, init)
      o, st = self._token(st, x_t[:, None])
      return st, o[:, 0]

    xs = jnp.moveaxis(x, 1, 0)
    rs = None if reset is None else jnp.moveaxis(reset, 1, 0)
    state, ys = jax.lax.scan(body, state, (xs, rs))
    return jnp.moveaxis(ys, 0, 1), state

  # ---------------------------------------------------------------- contract
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] -> [B, T, D]. With a ``sequence`` mesh in context the shards hand the
    state on in order (``context_parallel.sequential``; the memory update is not affine in
    its state): the segment scan when every shard holds whole segments, the token scan
    with documents. Otherwise (or unsplit) the same forms on the whole row."""
    self._check_x(x)
    b, t, _ = x.shape
    mesh = context_parallel.sequence_mesh(t)
    if segment_ids is None:
      ls = self.cfg.segment_len
      if mesh is None or (t // mesh.shape[context_parallel.AXIS]) % ls:
        return self._segments(x, self.lmm.init_state(b, _F32))[0]
      pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

      def run(xs, state):  # one shard of whole segments, from the handed-on memory
        return self._segments(xs["x"], state, first=xs["pos"][0, 0] // ls)
      return context_parallel.sequential(run, {"x": x, "pos": pos},
                                         self.lmm.init_state(b, _F32))[0]
    reset = doc_starts(segment_ids)
    if mesh is None:
      return self._tokens(x, self.init_state(b, _F32), reset)[0]
    return context_parallel.sequential(
        lambda xs, state: self._tokens(xs["x"], state, xs["reset"]),
        {"x": x, "reset": reset}, self.init_state(b, _F32))[0]

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    lmm = self.lmm.init_state(batch, dtype)
    shape = (batch, self.cfg.segment_len, self.attn.heads, self.attn.head_dim)
    state = {"lmm": lmm, "mseg": lmm["m"], "pos": jnp.zeros((batch,), jnp.int32)}
    for name in ("hk", "hv", "xk", "xv"):
      state[name] = jnp.zeros(shape, dtype)
    return state

  def step(self, x: jax.Array, state):
    """x ``[B, t, D]``: exact token-by-token form (a scan over the t tokens)."""
    self._check_x(x)
    return self._tokens(x, state)

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    cache = 4 * batch * self.cfg.segment_len * self.attn.heads * self.attn.head_dim
    return self.lmm.state_size(batch) + self.lmm.memory_size(batch) + cache
