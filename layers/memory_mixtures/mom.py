"""Mixture-of-Memories (MoM): top-k routed gated-delta-rule memories plus a shared one.

References (the math and inits; the code is lcm's own):
  * Du, Sun, Lan, Hu, Cheng 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories";
    layer as OpenSparseLLMs/MoM ``mom/layers/mom_gated_deltanet.py``, load balance as its
    ``load_balancing_loss_func``.
  * Fedus, Zoph, Shazeer 2021, "Switch Transformers" (eqs. 4-6: the load-balance loss).

``E = num_memories`` gated-delta-rule memories with their own key, value, beta and decay
projections, a shared query projection, and (``shared_memory``) one more memory that every
token updates. Router: ``p_t = softmax(W_r x_t)`` (no bias), the ``top_k`` memories of
``p_t`` are selected and their weights renormalised, ``w_{t,e} = p_{t,e} / sum_{top-k} p``.
A selected memory e is updated by the Gated DeltaNet rule::

    S^e_t = a^e_t S^e_{t-1} + beta^e_t k^e_t (v^e_t - a^e_t S^e_{t-1}^T k^e_t)^T
    o_t = sum_{e in top-k} w_{t,e} S^e_t^T q_t + S^shared_t^T q_t

and a memory that is not selected keeps its state (``beta = 0`` and ``log a = 0`` for that
token), so every memory is one delta-rule recurrence over all tokens with masked beta and
decay. ``q, k`` SiLU (after the short convolutions) and L2-normalised, q scaled by
``Dk^-0.5``, ``beta = sigmoid(W_b x)``, ``log a = -exp(A_log) softplus(W_a x + dt_bias)``
with ``A_log``, ``dt_bias`` shared by all memories (as the reference); output per-head
RMSNorm * swish(W_g x), output projection. The short convolutions run over the full token
stream (before routing) and no token is dropped.

Load balance (Switch eqs. 4-6): ``aux = E * sum_e f_e P_e`` with ``f_e`` the fraction of
routing slots given to memory e (``sum_e f_e = 1``, not differentiable) and ``P_e`` the
mean router probability ``p_{t,e}``; 1 for perfectly balanced routing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.common import (GatedRMSNorm, Linear, RMSNorm, ShortConv, check, dense_init,
                           param)
from layers.common import check_bool, check_d_model, check_pos_int, check_positive, is_num
from layers.common import a_log_init, doc_starts, dt_bias_init, l2norm
from layers.memory_mixtures.validation import check_kernel_opts

__all__ = ["MoMConfig", "MoM", "load_balance_loss"]


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
    check_kernel_opts(self)


def load_balance_loss(probs: jax.Array, selected: jax.Array) -> jax.Array:
  """Switch-style load-balance loss ``E * sum_e f_e P_e`` (Fedus et al. 2021, eqs. 4-6).

  probs [..., E]: router softmax; selected [..., E] bool: the top-k choice of each token.
  ``f_e`` = share of the routing slots that went to e (sums to 1; no gradient),
  ``P_e`` = mean router probability of e. Equals 1 when routing is perfectly balanced.
  (The MoM reference uses the renormalised top-k weights for P and an unnormalised f, equal
  to ``top_k`` at balance.)
  """
  e = probs.shape[-1]
  sel = selected.reshape(-1, e).astype(jnp.float32)
  f = jnp.sum(sel, axis=0) / jnp.maximum(jnp.sum(sel), 1.0)
  p = jnp.mean(probs.reshape(-1, e).astype(jnp.float32), axis=0)
  return e * jnp.sum(jax.lax.stop_gradient(f) * p)


class MoM(nnx.Module):
  """Mixture-of-Memories (Du et al. 2025) with gated-delta-rule memories (see the module
  docstring for the routing, the masked dense form and the aux loss).

  All memories (plus the shared one) run as extra heads of a single delta-rule kernel
  call. Deviations from the reference: the reference sorts each memory's tokens into a
  compact sequence and runs the short convolutions on that sequence, with a capacity limit
  that drops the oldest tokens; here the convolutions run over the full token stream
  (before routing: one convolution per projection, the memories' k / v channels stacked)
  and no token is dropped. Both make the masked dense form exact.

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
    o, sf = context_parallel.delta_rule(flat(q_all), flat(k), flat(v),
                                        flat(beta).astype(q.dtype), flat(log_decay),
                                        initial_state=s0, reset=reset,
                                        chunk_size=self.cfg.chunk_size, impl=self.cfg.impl)
    o = o.reshape(b, t, m, h, dv).astype(jnp.float32)
    o = jnp.einsum("btm,btmhv->bthv", mix, o)
    o = o.astype(self.dtype)
    o = self.norm(o, self.g(x)) if self.g is not None else self.norm(o)
    y = jnp.einsum("bthd,hde->bte", o.astype(self.dtype), self.out[...].astype(self.dtype))
    aux = load_balance_loss(probs, selected)
    return y, sf.reshape(b, m, h, dk, dv), new, aux

  def call_with_aux(self, x: jax.Array, segment_ids: jax.Array | None = None):
    """``(y, aux)``: the output and this layer's load-balance loss (a scalar).

    ``lcm.model.LM`` sums ``aux`` over layers and the trainer adds
    ``train.aux_loss_weight`` times that sum to the loss (metric ``aux_loss``);
    ``__call__`` returns the output only, as every mixer."""
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
