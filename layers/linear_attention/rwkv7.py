"""RWKV-7 "Goose" time mixing (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State
Evolution") and its channel-mixing MLP.

Equations and inits as the published training code, BlinkDL/RWKV-LM
``RWKV-v7/train_temp/src/model.py`` (``RWKV_Tmix_x070``, ``RWKV_CMix_x070``); fla's
``fla/layers/rwkv7.py`` computes the same function. Per token, with x the (normed) layer
input and x' the previous token's (zero at a document start):

    x_* = x + (x' - x) * mu_*                    * in r, w, k, v, a, g (learned lerps)
    r = x_r W_r,  k = x_k W_k,  v = x_v W_v       (H heads of N channels)
    log w = -e^{-0.5} sigmoid(w0 + tanh(x_w W1) W2)           per channel, in (-0.61, 0)
    iclr = sigmoid(a0 + x_a A1 A2)                in-context learning rate
    v <- v + (v_first - v) * sigmoid(v0 + x_v V1 V2)   value residual (not in the first layer)
    g = sigmoid(x_g G1) G2                        output gate
    kappa = l2norm_head(k * k_k);  k~ = k * (1 + (iclr - 1) * k_a)
    S_t = (diag(w) - kappa (iclr * kappa)^T) S_{t-1} + k~ v^T,   o = S_t^T r
    y = W_o((groupnorm_head(o) + (r . (r_k * k~)) v) * g)

The state update is ``kernels.dplr`` with q = r, k = k~, a = -(iclr * kappa), b = kappa
(the paper writes the state transposed). RWKV-7 has no data-dependent token shift (RWKV-6's
ddlerp was dropped): the lerps mu_* are static; the data dependence is in the LoRAs of w,
iclr, the value residual and the gate.

Value residual. ``v_first`` is the first RWKV-7 layer's v; later layers mix towards it. The
LM threads it through the layer stack with the ``layer_carry`` hook (docs/design.md, the
mixer contract): :meth:`RWKV7.init_layer_carry` makes the carry ``{"v": [B, T, H * N],
"set": bool}``; a layer whose carry is not yet set is the first (its v goes into the carry
unchanged), every later one applies the residual. Called alone (``__call__`` / ``step``) a
layer is the first one.

Inits (the published code; n = channel, C = d_model, Ck = H * N): mu_r, mu_w, mu_k, mu_v, mu_a,
mu_g = 1 - (n / C)^(p * (1 - depth)) with p = 0.2, 0.9, 0.7, 0.7, 0.9, 0.2; w0 = -6 + 6 (n /
(Ck - 1))^(1 + depth^0.3) + 0.5 + 2.5 z_n (z the per-head zigzag); a0 = -0.19 + 0.3 z_n +
0.4 l_n, v0 = 0.73 - 0.4 l_n (l_n = n / (Ck - 1) - 0.5); k_k = 0.71 - 0.1 l_n, k_a = 1.02,
r_k = -0.04; LoRA up-projections orthogonal with gain 0.1, down-projections zero; W_r, W_v
~ U(+-0.5 / sqrt(C)), W_k ~ U(+-0.05 / sqrt(C)), W_o = 0; group-norm eps = N * 1e-5 (64e-5
at N = 64); LoRA ranks max(32, round(f sqrt(C) / 32) * 32), f = 2.5 (w, iclr), 1.7 (value),
5 (gate). Channel mix: mu_k = 1 - (n / C)^((1 - depth)^4), W_k ~ U(+-0.5 / sqrt(C)), W_v = 0.

Where lcm chooses: ``depth`` (the published layer_id / n_layer ratios) is a config field
(``init_depth``, default 0.5) because the LM builds every layer of a pattern alike (stacked
under ``nnx.vmap``); every RWKV-7 layer has the value-residual LoRA (the first layer's stays
unused: stacked layers share one structure); ``zero_init=False`` draws W_o and the LoRA
down-projections from LeCun normal instead of zeros, so that a fresh layer is not
identically zero (the contract tests use it). The LoRA matrices, lerps, w0 / a0 / v0, k_k,
k_a, r_k and the norm are tagged ``no_decay`` (the published optimizer decays only the
r / k / v / o matrices); the published 2x learning rate of w0 is not reproduced.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.common import ConfigError, Linear, check, dense, dense_init, param, zeros_init
from layers.common import check_bool, check_d_model, check_pos_int, check_positive, is_num
from layers.common import doc_starts
from layers.linear_attention.common import Mixer, check_kernel_opts, resolve_head_dim

__all__ = ["RWKV7", "RWKV7Config", "RWKV7ChannelMix", "token_shift"]

_DECAY_SCALE = math.exp(-0.5)  # log w = -e^{-0.5} sigmoid(.): w in (e^{-0.607}, 1)
_LERPS = (("r", 0.2), ("w", 0.9), ("k", 0.7), ("v", 0.7), ("a", 0.9), ("g", 0.2))


@dataclasses.dataclass(frozen=True)
class RWKV7Config:
  """Hyper-parameters of :class:`RWKV7`.

  num_heads: heads H (the published models use head size 64: num_heads = d_model / 64).
  head_dim: key = value width per head N; None -> d_model // num_heads.
  decay_low_rank_dim, a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim: LoRA ranks of the
    decay, the in-context learning rate, the value residual and the output gate; None ->
    the published max(32, round(f sqrt(d_model) / 32) * 32), f = 2.5, 2.5, 1.7, 5.
  norm_eps: per-channel eps of the per-head group norm (eps = head_dim * norm_eps).
  init_depth: the layer's relative depth in [0, 1] for the published depth-dependent inits.
  zero_init: the published zero inits of the output projection and LoRA down-projections
    (False: LeCun normal, a layer that is live at init).
  chunk_size, impl: passed to ``kernels.dplr.dplr_recurrence``.
  """

  num_heads: int = 4
  head_dim: int | None = None
  decay_low_rank_dim: int | None = None
  a_low_rank_dim: int | None = None
  v_low_rank_dim: int | None = None
  gate_low_rank_dim: int | None = None
  norm_eps: float = 1e-5
  init_depth: float = 0.5
  zero_init: bool = True
  chunk_size: int = 64
  impl: str = "auto"

  def dims(self, d_model: int) -> tuple[int, int]:
    """(heads H, head width N)."""
    return self.num_heads, resolve_head_dim(d_model, self.num_heads, self.head_dim)

  def ranks(self, d_model: int) -> dict[str, int]:
    """LoRA rank of each of w, a, v, g."""
    out = {}
    for key, name, f in (("w", "decay", 2.5), ("a", "a", 2.5), ("v", "v", 1.7),
                         ("g", "gate", 5.0)):
      r = getattr(self, f"{name}_low_rank_dim")
      out[key] = max(32, int(round(f * d_model ** 0.5 / 32) * 32)) if r is None else r
    return out

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    self.dims(d_model)
    for name in ("decay", "a", "v", "gate"):
      r = getattr(self, f"{name}_low_rank_dim")
      if r is not None:
        check_pos_int(r, f"{name}_low_rank_dim")
    check_positive(self.norm_eps, "norm_eps")
    check(is_num(self.init_depth) and 0 <= self.init_depth <= 1, "init_depth",
          f"must be a number in [0, 1] (got {self.init_depth!r})")
    check_bool(self.zero_init, "zero_init")
    check_kernel_opts(self)


# ----------------------------------------------------------------------------------
# Token shift and inits
# ----------------------------------------------------------------------------------


def _previous(xp, sp, segment_ids):
  """xp [B, T + 1, ...] (one history token first) -> the previous token of each position,
  zero where it belongs to another document (``sp``: the segment ids of xp)."""
  prev = xp[:, :-1]
  if segment_ids is None:
    return prev
  same = (sp[:, :-1] == segment_ids).reshape(segment_ids.shape + (1,) * (prev.ndim - 2))
  return jnp.where(same, prev, jnp.zeros((), prev.dtype))


def token_shift(x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """The previous token x_{t-1} of every position of x [B, T, ...]: zero at t = 0 and at
  every document start; split over a ``sequence`` mesh axis as a one-token halo
  (``context_parallel.with_history``)."""
  return context_parallel.with_history(_previous, x, segment_ids, 1)


def _shift_step(x: jax.Array, last: jax.Array) -> jax.Array:
  """The previous tokens of a chunk x [B, t, D] given the token before it, last [B, D]."""
  return jnp.concatenate([last.astype(x.dtype)[:, None], x[:, :-1]], axis=1)


def _const(value: jax.Array):
  def init(key, shape, dtype):
    del key
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), shape).astype(dtype)
  return init


def _uniform(bound: float):
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


def _orthogonal(gain: float):
  """torch ``orthogonal_`` of the matrix [shape[0], prod(shape[1:])] with the published
  gain: ``gain * sqrt(rows / cols)`` when rows > cols."""
  def init(key, shape, dtype):
    rows, cols = shape[0], math.prod(shape[1:])
    g = gain * (math.sqrt(rows / cols) if rows > cols else 1.0)
    w = jax.nn.initializers.orthogonal(scale=g)(key, (rows, cols), jnp.float32)
    return w.reshape(shape).astype(dtype)
  return init


def _lerp_init(d: int, power: float):
  """1 - (n / d)^power over the d channels (the published token-shift inits)."""
  return _const(1.0 - jnp.power(jnp.arange(d, dtype=jnp.float32) / d, power))


def _channel_profiles(h: int, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(position n / (Ck - 1), linear ramp l, zigzag z) over the Ck = h * n key channels."""
  ck = h * n
  idx = jnp.arange(ck, dtype=jnp.float32)
  pos = idx / max(ck - 1, 1)
  half = (n - 1) / 2
  zig = ((idx % n) - half) / half if n > 1 else jnp.zeros_like(idx)
  return pos, pos - 0.5, zig * jnp.abs(zig)


def _group_norm(o: jax.Array, scale, bias, eps: float) -> jax.Array:
  """Per-head GroupNorm (mean and variance over each head's channels), fp32."""
  o = o.astype(jnp.float32)
  mean = jnp.mean(o, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(o - mean), axis=-1, keepdims=True)
  return (o - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _l2normalize(x: jax.Array) -> jax.Array:
  """x / max(|x|, 1e-12) over the last axis (torch ``F.normalize``), fp32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


# ----------------------------------------------------------------------------------
# Time mixing
# ----------------------------------------------------------------------------------


class RWKV7(Mixer):
  """RWKV-7 time mixing (module docstring), on ``kernels.dplr`` through
  ``context_parallel.dplr``. State: ``{"S": [B, H, N, N], "shift": [B, D]}`` (the matrix
  state and the previous token's input for the token shift). The LM's value residual goes
  through :meth:`call_with_carry` / :meth:`step_with_carry` (the ``layer_carry`` hook)."""

  Config = RWKV7Config

  def __init__(self, d_model: int, cfg: RWKV7Config | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg = self.Config() if cfg is None else cfg
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d = d_model
    self.dtype = dtype
    h, n = cfg.dims(d_model)
    self.num_heads, self.head_dim = h, n
    ranks = cfg.ranks(d_model)
    depth = float(cfg.init_depth)
    pd = param_dtype
    hn = ("heads", "head_dim")

    def p(init, shape, axes, tag="no_decay"):
      return param(rngs, init, shape, axes, pd, tag=tag)

    for name, power in _LERPS:
      setattr(self, f"x_{name}", p(_lerp_init(d, power * (1.0 - depth)), (d,), ("embed",)))
    kw = dict(dtype=dtype, param_dtype=pd, rngs=rngs)
    self.receptance = Linear(d, (h, n), ("embed",) + hn, init=_uniform(0.5 * d ** -0.5), **kw)
    self.key = Linear(d, (h, n), ("embed",) + hn, init=_uniform(0.05 * d ** -0.5), **kw)
    self.value = Linear(d, (h, n), ("embed",) + hn, init=_uniform(0.5 * d ** -0.5), **kw)
    down = zeros_init if cfg.zero_init else dense_init(d)
    for name in ("w", "a", "v", "g"):
      r = ranks[name]
      setattr(self, f"{name}1", p(down, (d, r), ("embed", None)))
      setattr(self, f"{name}2", p(_orthogonal(0.1), (r, h, n), (None,) + hn))
    pos, lin, zig = _channel_profiles(h, n)
    www = -6.0 + 6.0 * jnp.power(pos, 1.0 + depth ** 0.3)
    self.w0 = p(_const((www + 0.5 + 2.5 * zig).reshape(h, n)), (h, n), hn)
    self.a0 = p(_const((-0.19 + 0.3 * zig + 0.4 * lin).reshape(h, n)), (h, n), hn)
    self.v0 = p(_const((0.73 - 0.4 * lin).reshape(h, n)), (h, n), hn)
    self.k_k = p(_const((0.71 - 0.1 * lin).reshape(h, n)), (h, n), hn)
    self.k_a = p(_const(1.02), (h, n), hn)
    self.r_k = p(_const(-0.04), (h, n), hn)
    self.ln_scale = p(_const(1.0), (h, n), hn)
    self.ln_bias = p(zeros_init, (h, n), hn)
    self.out = param(rngs, zeros_init if cfg.zero_init else dense_init(h * n), (h, n, d),
                     hn + ("embed",), pd)

  # -- the value-residual carry (the LM's ``layer_carry`` hook) ----------------------

  @classmethod
  def init_layer_carry(cls, configs, *, d_model: int, batch: int, length: int, dtype):
    """The carry the LM threads through its layer stack for this class: ``v`` (the first
    layer's values, [B, T, H * N], filled by that layer) and ``set`` (False until then).
    ``configs``: the field dicts of every RWKV-7 name in the pattern; they must agree on
    the value width H * N."""
    widths = sorted({math.prod(cls.Config(**c).dims(d_model)) for c in configs})
    if len(widths) != 1:
      raise ConfigError("model.mixers", "every rwkv7 layer mixes its values towards the "
                        "first one's (value residual): their num_heads * head_dim must "
                        f"agree (got {', '.join(map(str, widths))})")
    return {"v": jnp.zeros((batch, length, widths[0]), dtype), "set": jnp.zeros((), bool)}

  def _fresh_carry(self, x):
    return self.init_layer_carry([dataclasses.asdict(self.cfg)], d_model=self.d_model,
                                 batch=x.shape[0], length=x.shape[1], dtype=self.dtype)

  # -- the mixer contract -------------------------------------------------------------

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    return self.call_with_carry(x, self._fresh_carry(x), segment_ids)[0]

  def call_with_carry(self, x, carry, segment_ids=None):
    """(y, carry): the layer given the value-residual carry of the layers before it."""
    self._check_x(x)
    x = x.astype(self.dtype)
    y, _, carry = self._core(x, token_shift(x, segment_ids), carry,
                             doc_starts(segment_ids), None)
    return y, carry

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    n = self.head_dim
    return {"S": jnp.zeros((batch, self.num_heads, n, n), dtype),
            "shift": jnp.zeros((batch, self.d_model), dtype)}

  def step(self, x: jax.Array, state):
    y, state, _ = self.step_with_carry(x, state, self._fresh_carry(x))
    return y, state

  def step_with_carry(self, x, state, carry):
    """(y, state, carry): ``step`` given the value-residual carry of the layers before it."""
    self._check_x(x)
    x = x.astype(self.dtype)
    y, sf, carry = self._core(x, _shift_step(x, state["shift"]), carry, None, state["S"])
    new = {"S": sf.astype(state["S"].dtype), "shift": x[:, -1].astype(state["shift"].dtype)}
    return y, new, carry

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    return batch * (self.num_heads * self.head_dim ** 2 + self.d_model)

  # -- the layer ----------------------------------------------------------------------

  def _lora(self, x, name: str, act=None) -> jax.Array:
    """x [B, T, D] -> act(x A) B [B, T, H, N], fp32."""
    w1 = getattr(self, f"{name}1")[...].astype(self.dtype)
    w2 = getattr(self, f"{name}2")[...].astype(self.dtype)
    z = dense(x, w1)
    if act is not None:
      z = act(z)
    return dense(z, w2).astype(jnp.float32)

  def _core(self, x, prev, carry, reset, s0):
    """x, prev [B, T, D] (prev: each token's predecessor) -> (y, final S, carry)."""
    f32 = jnp.float32
    b, t, _ = x.shape
    h, n = self.num_heads, self.head_dim
    xx = prev.astype(self.dtype) - x
    xr, xw, xk, xv, xa, xg = (x + xx * getattr(self, f"x_{name}")[...].astype(self.dtype)
                              for name, _ in _LERPS)
    r = self.receptance(xr)
    k = self.key(xk).astype(f32)
    v = self.value(xv)
    log_w = -_DECAY_SCALE * jax.nn.sigmoid(self.w0[...].astype(f32)
                                           + self._lora(xw, "w", jnp.tanh))
    # Value residual: the first layer (carry not set) keeps its v and hands it on.
    v_first = carry["v"].reshape(b, t, h, n).astype(v.dtype)
    mix = jax.nn.sigmoid(self.v0[...].astype(f32) + self._lora(xv, "v"))
    v_res = (v + (v_first - v) * mix.astype(v.dtype)).astype(v.dtype)
    is_set = carry["set"]
    carry = {"v": jnp.where(is_set, v_first, v).reshape(carry["v"].shape).astype(
        carry["v"].dtype), "set": jnp.ones((), bool)}
    v = jnp.where(is_set, v_res, v)
    iclr = jax.nn.sigmoid(self.a0[...].astype(f32) + self._lora(xa, "a"))
    g = self._lora(xg, "g", jax.nn.sigmoid)
    kappa = _l2normalize(k * self.k_k[...].astype(f32))
    k = k * (1.0 + (iclr - 1.0) * self.k_a[...].astype(f32))
    cdt = self.dtype
    o, sf = context_parallel.dplr(
        r, k.astype(cdt), v, (-iclr * kappa).astype(cdt), kappa.astype(cdt), log_w,
        initial_state=None if s0 is None else s0.astype(f32), reset=reset,
        chunk_size=self.cfg.chunk_size, impl=self.cfg.impl)
    o = _group_norm(o, self.ln_scale[...].astype(f32), self.ln_bias[...].astype(f32),
                    n * self.cfg.norm_eps)
    bonus = jnp.sum(r.astype(f32) * k * self.r_k[...].astype(f32), axis=-1, keepdims=True)
    o = (o + bonus * v.astype(f32)) * g
    return self._project_out(o), sf, carry


# ----------------------------------------------------------------------------------
# Channel mixing (the LM's ``model.mlp = "rwkv"``)
# ----------------------------------------------------------------------------------


class RWKV7ChannelMix(nnx.Module):
  """RWKV-7's channel mix: ``relu(x_k W_k)^2 W_v`` with ``x_k = x + (x' - x) * mu_k`` (x' the
  previous token, zero at a document start). ``__call__(x, segment_ids)``; ``step(x, last)``
  with ``last`` [B, D] the previous call's last input; ``init_state(batch, dtype)``."""

  def __init__(self, d_model: int, hidden: int, *, init_depth: float = 0.5,
               zero_init: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.d_model = d_model
    self.dtype = dtype
    self.x_k = param(rngs, _lerp_init(d_model, (1.0 - init_depth) ** 4), (d_model,),
                     ("embed",), param_dtype, tag="no_decay")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.key = Linear(d_model, hidden, ("embed", "mlp"), init=_uniform(0.5 * d_model ** -0.5),
                      **kw)
    self.value = Linear(hidden, d_model, ("mlp", "embed"),
                        init=zeros_init if zero_init else dense_init(hidden), **kw)

  def _mix(self, x, prev):
    x = x.astype(self.dtype)
    xk = x + (prev.astype(self.dtype) - x) * self.x_k[...].astype(self.dtype)
    return self.value(jnp.square(jax.nn.relu(self.key(xk))))

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    return self._mix(x, token_shift(x.astype(self.dtype), segment_ids))

  def init_state(self, batch: int, dtype=jnp.float32) -> jax.Array:
    return jnp.zeros((batch, self.d_model), dtype)

  def step(self, x: jax.Array, last: jax.Array) -> tuple[jax.Array, Any]:
    return self._mix(x, _shift_step(x.astype(self.dtype), last)), x[:, -1].astype(last.dtype)

  def state_size(self, batch: int) -> int:
    return batch * self.d_model
