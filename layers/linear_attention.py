"""Linear-attention token mixers: linear attention with feature maps, RetNet, GLA, DeltaNet,
Gated DeltaNet, Based and JRT (prefix linear attention).

References (the math and inits; the code is lcm's own):
  * Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with
    Linear Attention" (:class:`LinearAttention`).
  * Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
    Models" (:class:`RetNet`); layer details as fla-org/flash-linear-attention
    ``fla/layers/multiscale_retention.py``.
  * Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training"
    (:class:`GLA`); layer as fla ``fla/layers/gla.py``.
  * Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
    Length" (:class:`DeltaNet`); layer as fla ``fla/layers/delta_net.py``.
  * Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
    (:class:`GatedDeltaNet`); layer and inits as fla ``fla/layers/gated_deltanet.py``.
  * Arora et al. 2024, "Simple linear attention language models balance the
    recall-throughput tradeoff" (:class:`Based`); HazyResearch/based
    ``based/models/mixers/{linear_attention,base_conv}.py``.
  * Arora et al. 2024, "Just read twice: closing the recall gap for recurrent language
    models" (:class:`JRT`); HazyResearch/prefix-linear-attention
    ``based/models/mixers/prefix_linear_attention.py``.

Every mixer follows the contract of DESIGN.md (see ``layers/attention.py`` for the shape):
``Config`` (a frozen dataclass with ``validate(d_model)``), ``__call__(x, segment_ids)``,
``init_state(batch, dtype, *, max_len)``, ``step(x, state)``, ``state_size(batch, *, max_len)``.
Packed documents: the kernels get ``reset`` = document starts, short convolutions get the
segment ids, RoPE positions restart per document; nothing crosses a document boundary.

The cores are the scan kernels: ``kernels.chunked_scan.linear_recurrence`` (linear attention,
RetNet, GLA, Based, JRT) and ``kernels.delta_rule.delta_rule`` (DeltaNet, Gated DeltaNet).
Neither scales q implicitly: where fla's kernels apply their default ``scale = Dk^-0.5``
(RetNet, GLA, DeltaNet, Gated DeltaNet) the layer multiplies q by ``Dk^-0.5`` itself.
Each Config has ``impl`` (the kernel implementation, "auto" by default) and ``chunk_size``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.chunked_scan import IMPLS, linear_recurrence
from layers import feature_maps as fm
from layers.attention import Attention, AttentionConfig, apply_rope
from layers.common import (ConfigError, GatedRMSNorm, Linear, RMSNorm, ShortConv, check,
                           dense_init, param, segment_positions)
from layers.common import check_bool, check_d_model, check_pos_int, check_positive, is_num
from layers.common import (a_log_init, append_ones, doc_starts, dt_bias_init, l2norm,
                           normalise)

__all__ = [
    "LinearAttention", "LinearAttentionConfig", "RetNet", "RetNetConfig", "GLA", "GLAConfig",
    "DeltaNet", "DeltaNetConfig", "GatedDeltaNet", "GatedDeltaNetConfig", "Based",
    "BasedConfig", "JRT", "JRTConfig",
]


# ----------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------


def _check_kernel_opts(cfg) -> None:
  check_pos_int(cfg.chunk_size, "chunk_size")
  check(cfg.impl in IMPLS, "impl", f"must be one of {', '.join(IMPLS)} (got {cfg.impl!r})")


def _head_dim(d_model: int, num_heads: int, head_dim: Any, field: str = "head_dim") -> int:
  """Validated per-head width: ``head_dim`` or ``d_model // num_heads``."""
  check_pos_int(num_heads, "num_heads")
  if head_dim is None:
    check(d_model % num_heads == 0, "num_heads",
          f"must divide d_model={d_model} (got {num_heads}); or set {field} explicitly")
    return d_model // num_heads
  check_pos_int(head_dim, field)
  return head_dim


def _expanded(base: int, ratio: Any, field: str, what: str) -> int:
  """``base * ratio`` as an integer, or ConfigError(field)."""
  check(is_num(ratio) and ratio > 0, field, f"must be a finite number > 0 (got {ratio!r})")
  value = base * ratio
  check(abs(value - round(value)) < 1e-6 and round(value) >= 1, field,
        f"{what} = {base} * {ratio} = {value} must be a positive integer")
  return int(round(value))


def _check_feature_map(cfg) -> None:
  check(cfg.feature_map in fm.FEATURE_MAPS, "feature_map",
        f"must be one of {', '.join(fm.FEATURE_MAPS)} (got {cfg.feature_map!r})")
  check_bool(cfg.taylor_upper, "taylor_upper")
  check_bool(cfg.normalize, "normalize")
  if cfg.normalize:
    check(cfg.feature_map in fm.POSITIVE_FEATURE_MAPS, "normalize",
          f"needs a positive feature map ({', '.join(fm.POSITIVE_FEATURE_MAPS)}); the "
          f"denominator phi(q).sum phi(k) of feature_map={cfg.feature_map!r} can be 0 or "
          "negative. Set normalize=False or change feature_map")
  check_positive(cfg.eps, "eps")


# ----------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------






class _Mixer(nnx.Module):
  """Bits every mixer here shares: input checks, the output projection, the kernel call."""

  d_model: int
  dtype: Any

  def _check_x(self, x: jax.Array) -> None:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"{type(self).__name__} expects x of shape [B, T, {self.d_model}], "
                       f"got {x.shape}")

  def _make_out(self, heads: int, dv: int, param_dtype, rngs: nnx.Rngs) -> None:
    self.out = param(rngs, dense_init(heads * dv), (heads, dv, self.d_model),
                     ("heads", "head_dim", "embed"), param_dtype)

  def _project_out(self, o: jax.Array) -> jax.Array:
    """[B, T, H, Dv] -> [B, T, D]."""
    return jnp.einsum("bthd,hde->bte", o.astype(self.dtype), self.out[...].astype(self.dtype))

  def _scan(self, q, k, v, log_decay, s0, reset):
    s0 = None if s0 is None else s0.astype(jnp.float32)
    return linear_recurrence(q, k, v, log_decay, initial_state=s0, reset=reset,
                             chunk_size=self.cfg.chunk_size, impl=self.cfg.impl)


# ----------------------------------------------------------------------------------
# 1. Linear attention with a feature map
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
  """Hyper-parameters of :class:`LinearAttention`.

  num_heads: heads H.
  head_dim: value width per head Dv; None -> d_model // num_heads.
  feature_dim: q/k width per head before the feature map; None -> head_dim.
  feature_map: "identity", "elu" (elu + 1), "relu" or "taylor" (Based's 2nd-order map).
  taylor_upper: Taylor map keeps only the upper triangle of x x^T (same kernel, about half
    the features).
  normalize: divide by phi(q).sum_{j<=t} phi(k_j) (+ eps); needs elu, relu or taylor.
  eps: added to the denominator.
  out_norm: per-head RMSNorm on the output before the output projection (useful without
    ``normalize``).
  chunk_size, impl: passed to ``kernels.chunked_scan.linear_recurrence``.
  """

  num_heads: int = 4
  head_dim: int | None = None
  feature_dim: int | None = None
  feature_map: str = "elu"
  taylor_upper: bool = False
  normalize: bool = True
  eps: float = 1e-6
  out_norm: bool = False
  chunk_size: int = 64
  impl: str = "auto"

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    dv = _head_dim(d_model, self.num_heads, self.head_dim)
    if self.feature_dim is not None:
      check_pos_int(self.feature_dim, "feature_dim")
    del dv
    _check_feature_map(self)
    check_bool(self.out_norm, "out_norm")
    _check_kernel_opts(self)


class LinearAttention(_Mixer):
  """Causal linear attention ``o_t = sum_{j<=t} (phi(q_t).phi(k_j)) v_j`` (optionally divided
  by ``phi(q_t).sum_{j<=t} phi(k_j)``), Katharopoulos et al. 2020.

  The normaliser comes out of the same kernel call: v gets an extra column of ones, whose
  output is the denominator. State: ``{"S": [B, H, F, Dv (+1 with normalize)]}`` with F the
  feature-map width.
  """

  Config = LinearAttentionConfig

  def __init__(self, d_model: int, cfg: LinearAttentionConfig = LinearAttentionConfig(), *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.num_heads = h = cfg.num_heads
    self.head_dim = dv = cfg.head_dim or d_model // h
    self.qk_dim = f = cfg.feature_dim or dv
    self.feature_width = fm.feature_dim(cfg.feature_map, f, upper=cfg.taylor_upper)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (h, f), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (h, f), ("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (h, dv), ("embed", "heads", "head_dim"), **kw)
    self.norm = (RMSNorm(dv, eps=1e-5, axis_name="head_dim", **kw) if cfg.out_norm else None)
    self._make_out(h, dv, param_dtype, rngs)

  def _phi(self, x):
    return fm.apply(self.cfg.feature_map, x, upper=self.cfg.taylor_upper)

  def _core(self, x, reset, s0):
    q, k, v = self._phi(self.q(x)), self._phi(self.k(x)), self.v(x)
    if self.cfg.normalize:
      v = append_ones(v)
    o, sf = self._scan(q, k, v, None, s0, reset)
    if self.cfg.normalize:
      o = normalise(o, self.cfg.eps)
    if self.norm is not None:
      o = self.norm(o)
    return self._project_out(o), sf

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    return self._core(x, doc_starts(segment_ids), None)[0]

  def _state_shape(self, batch: int):
    return (batch, self.num_heads, self.feature_width, self.head_dim + int(self.cfg.normalize))

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len  # a fixed-size state
    return {"S": jnp.zeros(self._state_shape(batch), dtype)}

  def step(self, x: jax.Array, state):
    self._check_x(x)
    y, sf = self._core(x, None, state["S"])
    return y, {"S": sf.astype(state["S"].dtype)}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    return math.prod(self._state_shape(batch))


# ----------------------------------------------------------------------------------
# 2. RetNet (multi-scale retention)
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetNetConfig:
  """Hyper-parameters of :class:`RetNet`.

  num_heads: heads H; head h decays by ``gamma_h = 1 - 2^(-5-h)`` per token (fixed).
  head_dim: q/k width per head Dk; None -> d_model // num_heads.
  expand_v: value width per head Dv = head_dim * expand_v (fla's default 2).
  rope_theta: RoPE base on q and k (fla uses plain RoPE where the paper uses xPos);
    0 disables it.
  use_output_gate: swish output gate, fused with the per-head RMSNorm (fla's
    ``FusedRMSNormGated``); False -> per-head RMSNorm only.
  norm_eps: eps of the per-head norm.
  chunk_size, impl: passed to ``linear_recurrence``.
  """

  num_heads: int = 4
  head_dim: int | None = None
  expand_v: float = 2.0
  rope_theta: float = 10000.0
  use_output_gate: bool = True
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    dk = _head_dim(d_model, self.num_heads, self.head_dim)
    _expanded(dk, self.expand_v, "expand_v", "head_dim * expand_v")
    check(is_num(self.rope_theta) and self.rope_theta >= 0, "rope_theta",
          f"must be a finite number >= 0, 0 disables RoPE (got {self.rope_theta!r})")
    if self.rope_theta > 0:
      check(dk % 2 == 0, "head_dim", f"must be even when RoPE is on (got head_dim={dk}); "
            "set an even head_dim or rope_theta=0")
    check_bool(self.use_output_gate, "use_output_gate")
    check_positive(self.norm_eps, "norm_eps")
    _check_kernel_opts(self)


def retnet_log_decays(num_heads: int) -> jax.Array:
  """log(gamma_h) with gamma_h = 1 - 2^(-5-h), h = 0..H-1 (RetNet's fixed per-head decays),
  as ``log1p(-2^(-5-h))`` in fp32 (exact even where 1 - 2^(-5-h) rounds to 1)."""
  h = jnp.arange(num_heads, dtype=jnp.float32)
  return jnp.log1p(-jnp.exp2(-5.0 - h))


class RetNet(_Mixer):
  """Multi-scale retention (Sun et al. 2023) in fla's layer form:
  ``S_t = gamma_h S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (q_t / sqrt(Dk))`` with RoPE on q, k,
  then per-head RMSNorm * swish(g), output projection.

  Deviations from the paper, following fla (the reference implementation): RoPE instead
  of xPos, RMSNorm instead of GroupNorm (LayerNorm per head), q scaled by Dk^-0.5 (the
  paper scales k). State: ``{"S": [B, H, Dk, Dv], "pos": int32}`` (pos: RoPE offset).
  """

  Config = RetNetConfig

  def __init__(self, d_model: int, cfg: RetNetConfig = RetNetConfig(), *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.num_heads = h = cfg.num_heads
    self.head_dim = dk = cfg.head_dim or d_model // h
    self.value_dim = dv = int(round(dk * cfg.expand_v))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (h, dk), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (h, dk), ("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (h, dv), ("embed", "heads", "head_dim"), **kw)
    if cfg.use_output_gate:
      self.g = Linear(d_model, (h, dv), ("embed", "heads", "head_dim"), **kw)
      self.norm = GatedRMSNorm(dv, eps=cfg.norm_eps, norm_before_gate=True,
                               axis_name="head_dim", **kw)
    else:
      self.g = None
      self.norm = RMSNorm(dv, eps=cfg.norm_eps, axis_name="head_dim", **kw)
    self._make_out(h, dv, param_dtype, rngs)

  def decays(self) -> jax.Array:
    """The per-head decays gamma_h = exp(log_decay_h), [H] fp32."""
    return jnp.exp(retnet_log_decays(self.num_heads))

  def _core(self, x, positions, reset, s0):
    b, t, _ = x.shape
    q = apply_rope(self.q(x), positions, self.cfg.rope_theta)
    k = apply_rope(self.k(x), positions, self.cfg.rope_theta)
    q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
    v = self.v(x)
    g = jnp.broadcast_to(retnet_log_decays(self.num_heads), (b, t, self.num_heads))
    o, sf = self._scan(q, k, v, g, s0, reset)
    o = self.norm(o, self.g(x)) if self.g is not None else self.norm(o)
    return self._project_out(o), sf

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    b, t, _ = x.shape
    pos = segment_positions(segment_ids, b, t)
    return self._core(x, pos, doc_starts(segment_ids), None)[0]

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    return {"S": jnp.zeros((batch, self.num_heads, self.head_dim, self.value_dim), dtype),
            "pos": jnp.zeros((), jnp.int32)}

  def step(self, x: jax.Array, state):
    self._check_x(x)
    t = x.shape[1]
    pos = state["pos"] + jnp.arange(t, dtype=jnp.int32)
    y, sf = self._core(x, pos, None, state["S"])
    return y, {"S": sf.astype(state["S"].dtype), "pos": state["pos"] + t}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    return batch * self.num_heads * self.head_dim * self.value_dim


# ----------------------------------------------------------------------------------
# 3. GLA (gated linear attention)
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GLAConfig:
  """Hyper-parameters of :class:`GLA` (defaults as fla's ``GatedLinearAttention``).

  num_heads: heads H.
  expand_k: total key width = d_model * expand_k (Dk = that / H).
  expand_v: total value width = d_model * expand_v (Dv = that / H).
  gate_low_rank_dim: rank r of the forget-gate projection d_model -> r -> H * Dk.
  gate_logit_normalizer: the forget gate is ``logsigmoid(.) / gate_logit_normalizer``.
  clamp_min: optional lower bound on the log forget gate (None: no clamp).
  use_output_gate: swish output gate fused with the per-head RMSNorm.
  use_short_conv, conv_size: SiLU short convolutions on q, k, v (fla default: off).
  norm_eps: eps of the per-head norm.
  chunk_size, impl: passed to ``linear_recurrence``.
  """

  num_heads: int = 4
  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0
  clamp_min: float | None = None
  use_output_gate: bool = True
  use_short_conv: bool = False
  conv_size: int = 4
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"

  def dims(self, d_model: int) -> tuple[int, int]:
    """(Dk, Dv) per head."""
    check_pos_int(self.num_heads, "num_heads")
    key = _expanded(d_model, self.expand_k, "expand_k", "d_model * expand_k")
    val = _expanded(d_model, self.expand_v, "expand_v", "d_model * expand_v")
    check(key % self.num_heads == 0, "expand_k",
          f"d_model * expand_k = {key} must be divisible by num_heads={self.num_heads}")
    check(val % self.num_heads == 0, "expand_v",
          f"d_model * expand_v = {val} must be divisible by num_heads={self.num_heads}")
    return key // self.num_heads, val // self.num_heads

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    self.dims(d_model)
    check_pos_int(self.gate_low_rank_dim, "gate_low_rank_dim")
    check_positive(self.gate_logit_normalizer, "gate_logit_normalizer")
    if self.clamp_min is not None:
      check(is_num(self.clamp_min) and self.clamp_min < 0, "clamp_min",
            f"must be None or a finite number < 0 (a log forget gate; got {self.clamp_min!r})")
    check_bool(self.use_output_gate, "use_output_gate")
    check_bool(self.use_short_conv, "use_short_conv")
    check_pos_int(self.conv_size, "conv_size")
    check_positive(self.norm_eps, "norm_eps")
    _check_kernel_opts(self)


class _QKVConv(nnx.Module):
  """Three SiLU short convolutions (q, k, v), with a step state per convolution."""

  def __init__(self, widths: tuple[int, int, int], size: int, *, use_bias: bool, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, axis_name="heads", dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.q = ShortConv(widths[0], size, **kw)
    self.k = ShortConv(widths[1], size, **kw)
    self.v = ShortConv(widths[2], size, **kw)

  def __call__(self, q, k, v, segment_ids=None, state=None):
    """q, k, v: [B, T, H, D] -> silu(conv(.)) of each, and the new conv states (or None)."""
    outs, new = [], {}
    for name, x in (("q", q), ("k", k), ("v", v)):
      conv = getattr(self, name)
      flat = x.reshape(x.shape[:2] + (-1,))
      if state is None:
        y = conv(flat, segment_ids)
      else:
        y, new[f"conv_{name}"] = conv.step(flat, state[f"conv_{name}"])
      outs.append(jax.nn.silu(y).reshape(x.shape))
    return (*outs, new if state is not None else None)

  def init_state(self, batch: int, dtype) -> dict[str, jax.Array]:
    return {f"conv_{n}": getattr(self, n).init_state(batch, dtype) for n in ("q", "k", "v")}

  def state_size(self, batch: int) -> int:
    return batch * (self.q.kernel_size - 1) * sum(
        getattr(self, n).channels for n in ("q", "k", "v"))


class _MatrixStateMixer(_Mixer):
  """The contract methods shared by GLA and DeltaNet: a [B, H, Dk, Dv] state ``S`` plus the
  optional short-convolution state. Subclasses define ``_core(x, segment_ids, reset,
  state) -> (y, final S, conv state)`` and ``num_heads``, ``head_dim``, ``value_dim``,
  ``conv``."""

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    return self._core(x, segment_ids, doc_starts(segment_ids), None)[0]

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    state = {"S": jnp.zeros((batch, self.num_heads, self.head_dim, self.value_dim), dtype)}
    if self.conv is not None:
      state.update(self.conv.init_state(batch, dtype))
    return state

  def step(self, x: jax.Array, state):
    self._check_x(x)
    y, sf, conv_state = self._core(x, None, None, state)
    new = {"S": sf.astype(state["S"].dtype)}
    if conv_state is not None:
      new.update(conv_state)
    return y, new

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    n = batch * self.num_heads * self.head_dim * self.value_dim
    return n + (self.conv.state_size(batch) if self.conv is not None else 0)


class GLA(_MatrixStateMixer):
  """Gated linear attention (Yang et al. 2023), fla's layer:
  ``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t / sqrt(Dk)`` with the
  key-wise forget gate ``log alpha_t = logsigmoid(W2 W1 x_t + b) / 16`` (rank-16 W2 W1),
  per-head RMSNorm * swish(g), output projection.
  State: ``{"S": [B, H, Dk, Dv]}`` (+ the three conv states with ``use_short_conv``).
  """

  Config = GLAConfig

  def __init__(self, d_model: int, cfg: GLAConfig = GLAConfig(), *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.num_heads = h = cfg.num_heads
    dk, dv = cfg.dims(d_model)
    self.head_dim, self.value_dim = dk, dv
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (h, dk), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (h, dk), ("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (h, dv), ("embed", "heads", "head_dim"), **kw)
    self.gk_down = Linear(d_model, cfg.gate_low_rank_dim, ("embed", None), **kw)
    self.gk_up = Linear(cfg.gate_low_rank_dim, (h, dk), (None, "heads", "head_dim"),
                        use_bias=True, **kw)
    self.conv = (_QKVConv((h * dk, h * dk, h * dv), cfg.conv_size, use_bias=False, **kw)
                 if cfg.use_short_conv else None)
    if cfg.use_output_gate:
      self.g = Linear(d_model, (h, dv), ("embed", "heads", "head_dim"), **kw)
      self.norm = GatedRMSNorm(dv, eps=cfg.norm_eps, norm_before_gate=True,
                               axis_name="head_dim", **kw)
    else:
      self.g = None
      self.norm = RMSNorm(dv, eps=cfg.norm_eps, axis_name="head_dim", **kw)
    self._make_out(h, dv, param_dtype, rngs)

  def log_forget_gate(self, x: jax.Array) -> jax.Array:
    """[B, T, H, Dk] fp32: logsigmoid(W2 W1 x + b) / gate_logit_normalizer (<= 0)."""
    logits = self.gk_up(self.gk_down(x)).astype(jnp.float32)
    gk = jax.nn.log_sigmoid(logits) / self.cfg.gate_logit_normalizer
    if self.cfg.clamp_min is not None:
      gk = jnp.maximum(gk, self.cfg.clamp_min)
    return gk

  def _core(self, x, segment_ids, reset, state):
    q, k, v = self.q(x), self.k(x), self.v(x)
    conv_state = None
    if self.conv is not None:
      q, k, v, conv_state = self.conv(q, k, v, segment_ids, state)
    q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
    gk = self.log_forget_gate(x)
    s0 = None if state is None else state["S"]
    o, sf = self._scan(q, k, v, gk, s0, reset)
    o = self.norm(o, self.g(x)) if self.g is not None else self.norm(o)
    return self._project_out(o), sf, conv_state


# ----------------------------------------------------------------------------------
# 4./5. DeltaNet and Gated DeltaNet
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig:
  """Hyper-parameters of :class:`DeltaNet` (defaults as fla's ``DeltaNet``).

  num_heads: heads H.
  head_dim: q/k width per head Dk; None -> d_model // num_heads.
  expand_v: value width per head Dv = head_dim * expand_v.
  use_gate: swish output gate fused with the per-head RMSNorm; False -> RMSNorm only.
  use_short_conv, conv_size, conv_bias: SiLU short convolutions on q, k, v (the reference
    says they matter; without them q, k, v get a plain SiLU).
  allow_neg_eigval: beta in (0, 2) instead of (0, 1) (Grazzi et al. 2024).
  norm_eps: eps of the per-head norm.
  chunk_size, impl: passed to ``kernels.delta_rule.delta_rule``.
  """

  num_heads: int = 4
  head_dim: int | None = None
  expand_v: float = 1.0
  use_gate: bool = False
  use_short_conv: bool = True
  conv_size: int = 4
  conv_bias: bool = False
  allow_neg_eigval: bool = False
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"

  def dims(self, d_model: int) -> tuple[int, int]:
    dk = _head_dim(d_model, self.num_heads, self.head_dim)
    return dk, _expanded(dk, self.expand_v, "expand_v", "head_dim * expand_v")

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    self.dims(d_model)
    for f in ("use_gate", "use_short_conv", "conv_bias", "allow_neg_eigval"):
      check_bool(getattr(self, f), f)
    check_pos_int(self.conv_size, "conv_size")
    check_positive(self.norm_eps, "norm_eps")
    _check_kernel_opts(self)


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig(DeltaNetConfig):
  """Hyper-parameters of :class:`GatedDeltaNet` (defaults as fla's ``GatedDeltaNet``):
  the fields of :class:`DeltaNetConfig` (with ``expand_v=2``, ``use_gate=True``) plus the
  decay inits ``A ~ U(0, A_init_max]`` and ``dt ~ exp(U[log dt_min, log dt_max])`` floored
  at ``dt_init_floor``."""

  expand_v: float = 2.0
  use_gate: bool = True
  A_init_max: float = 16.0
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4

  def validate(self, d_model: int) -> None:
    super().validate(d_model)
    check_positive(self.A_init_max, "A_init_max")
    check_positive(self.dt_min, "dt_min")
    check_positive(self.dt_max, "dt_max")
    check(self.dt_max >= self.dt_min, "dt_max",
          f"must be >= dt_min={self.dt_min} (got {self.dt_max!r})")
    check(is_num(self.dt_init_floor) and self.dt_init_floor >= 0, "dt_init_floor",
          f"must be a finite number >= 0 (got {self.dt_init_floor!r})")




class DeltaNet(_MatrixStateMixer):
  """DeltaNet (Yang et al. 2024), fla's layer: q, k, v -> short conv -> SiLU; q, k
  L2-normalised per head and q scaled by Dk^-0.5; ``beta = sigmoid(W_b x)``;
  ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, ``o_t = S_t^T q_t``; per-head
  RMSNorm (or RMSNorm * swish(g) with ``use_gate``), output projection.
  State: ``{"S": [B, H, Dk, Dv]}`` (+ the three conv states with ``use_short_conv``).
  """

  Config = DeltaNetConfig
  _gated = False

  def __init__(self, d_model: int, cfg: DeltaNetConfig | None = None, *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg = self.Config() if cfg is None else cfg
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.num_heads = h = cfg.num_heads
    dk, dv = cfg.dims(d_model)
    self.head_dim, self.value_dim = dk, dv
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (h, dk), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (h, dk), ("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (h, dv), ("embed", "heads", "head_dim"), **kw)
    self.b = Linear(d_model, h, ("embed", "heads"), **kw)
    if self._gated:
      self.a = Linear(d_model, h, ("embed", "heads"), **kw)
      self.A_log = param(rngs, a_log_init(cfg.A_init_max), (h,), ("heads",), param_dtype,
                         tag="ssm")
      self.dt_bias = param(rngs, dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
                           (h,), ("heads",), param_dtype, tag="ssm")
    self.conv = (_QKVConv((h * dk, h * dk, h * dv), cfg.conv_size, use_bias=cfg.conv_bias,
                          **kw) if cfg.use_short_conv else None)
    if cfg.use_gate:
      self.g = Linear(d_model, (h, dv), ("embed", "heads", "head_dim"), **kw)
      self.norm = GatedRMSNorm(dv, eps=cfg.norm_eps, norm_before_gate=True,
                               axis_name="head_dim", **kw)
    else:
      self.g = None
      self.norm = RMSNorm(dv, eps=cfg.norm_eps, axis_name="head_dim", **kw)
    self._make_out(h, dv, param_dtype, rngs)

  def log_decay(self, x: jax.Array) -> jax.Array | None:
    """[B, T, H] fp32 log decay (Gated DeltaNet), None for DeltaNet."""
    return None

  def beta(self, x: jax.Array) -> jax.Array:
    beta = jax.nn.sigmoid(self.b(x).astype(jnp.float32))
    return beta * 2.0 if self.cfg.allow_neg_eigval else beta

  def _core(self, x, segment_ids, reset, state):
    from kernels.delta_rule import delta_rule  # pylint: disable=g-import-not-at-top
    q, k, v = self.q(x), self.k(x), self.v(x)
    conv_state = None
    if self.conv is not None:
      q, k, v, conv_state = self.conv(q, k, v, segment_ids, state)
    else:
      q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
    q = l2norm(q) * jnp.asarray(self.head_dim ** -0.5, q.dtype)
    k = l2norm(k)
    s0 = None if state is None else state["S"].astype(jnp.float32)
    o, sf = delta_rule(q, k, v, self.beta(x).astype(q.dtype), self.log_decay(x),
                       initial_state=s0, reset=reset, chunk_size=self.cfg.chunk_size,
                       impl=self.cfg.impl)
    o = self.norm(o, self.g(x)) if self.g is not None else self.norm(o)
    return self._project_out(o), sf, conv_state


class GatedDeltaNet(DeltaNet):
  """Gated DeltaNet (Yang et al. 2025), fla's layer: DeltaNet with the Mamba2-style decay
  ``log a_t = -exp(A_log) * softplus(W_a x_t + dt_bias)`` (one per head),
  ``S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T``, and the swish output gate
  with the per-head RMSNorm. ``A_log`` and ``dt_bias`` are tagged ``"ssm"`` (no weight
  decay, own learning rate). Inits as fla: ``A ~ U(0, 16)``, ``dt_bias = softplus^-1(dt)``
  with ``dt = exp(U[log 1e-3, log 0.1])`` floored at 1e-4.
  """

  Config = GatedDeltaNetConfig
  _gated = True

  def log_decay(self, x: jax.Array) -> jax.Array:
    a = self.a(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
    return -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)


# ----------------------------------------------------------------------------------
# 6. Based: Taylor linear attention + sliding-window attention + gated short convolution
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BasedConfig:
  """Hyper-parameters of :class:`Based`. ``feature_dim`` and ``window`` set the state size.

  num_heads: heads of the linear-attention branch.
  feature_dim: q/k width per head before the Taylor map (Based: 16 -> 1 + 16 + 256 features).
  head_dim: value width per head of the linear-attention branch; None -> d_model // num_heads.
  taylor_upper: keep only the upper triangle of the Taylor map's x x^T (same kernel).
  eps: added to the linear-attention denominator (Based: 1e-12).
  window: sliding window of the softmax-attention branch.
  window_heads: heads of the softmax-attention branch (must divide d_model).
  window_rope_theta: RoPE base of the softmax-attention branch (0 disables it).
  use_conv: add the BaseConv branch ``out(silu(conv(W1 x)) * W2 x)``.
  conv_size: its kernel width (Based: 3).
  chunk_size, impl: passed to ``linear_recurrence``.
  """

  num_heads: int = 4
  feature_dim: int = 16
  head_dim: int | None = None
  taylor_upper: bool = False
  eps: float = 1e-12
  window: int = 64
  window_heads: int = 4
  window_rope_theta: float = 10000.0
  use_conv: bool = True
  conv_size: int = 3
  chunk_size: int = 64
  impl: str = "auto"

  def attention_config(self) -> AttentionConfig:
    return AttentionConfig(num_heads=self.window_heads, window=self.window,
                           rope_theta=self.window_rope_theta)

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    _head_dim(d_model, self.num_heads, self.head_dim)
    check_pos_int(self.feature_dim, "feature_dim")
    check_bool(self.taylor_upper, "taylor_upper")
    check_positive(self.eps, "eps")
    check_pos_int(self.window, "window")
    check_pos_int(self.window_heads, "window_heads")
    rename = {"num_heads": "window_heads", "window": "window",
              "rope_theta": "window_rope_theta", "head_dim": "window_heads"}
    try:
      self.attention_config().validate(d_model)
    except ConfigError as e:
      message = str(e)[len(e.field) + 2:]
      raise ConfigError(rename.get(e.field, e.field), message) from None
    check_bool(self.use_conv, "use_conv")
    check_pos_int(self.conv_size, "conv_size")
    _check_kernel_opts(self)


class Based(_Mixer):
  """Based (Arora et al. 2024) as one mixer: the sum of three branches,

    * Taylor linear attention: ``phi(q_t).sum_{j<=t} phi(k_j) v_j / phi(q_t).sum phi(k_j)``
      with q, k of width ``feature_dim`` per head (state [H, F, Dv + 1]);
    * sliding-window softmax attention (:class:`layers.attention.Attention` with
      ``window``; a ring KV cache of ``window`` tokens);
    * BaseConv: ``out(silu(conv(W1 x)) * (W2 x))`` with a causal depthwise convolution of
      width ``conv_size`` (state: the last ``conv_size - 1`` inputs).

  Deviation: the Based paper interleaves these as separate layers (mostly BaseConv, with
  some linear-attention and sliding-window layers); here one mixer sums them, so a
  ``"based"`` pattern has all three in every block. State:
  ``{"la": [B, H, F, Dv + 1], "swa": the KV cache, "conv": [B, K-1, D]}``.
  """

  Config = BasedConfig

  def __init__(self, d_model: int, cfg: BasedConfig = BasedConfig(), *,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.num_heads = h = cfg.num_heads
    self.head_dim = dv = cfg.head_dim or d_model // h
    f = cfg.feature_dim
    self.feature_width = fm.feature_dim("taylor", f, upper=cfg.taylor_upper)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (h, f), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (h, f), ("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (h, dv), ("embed", "heads", "head_dim"), **kw)
    self._make_out(h, dv, param_dtype, rngs)
    self.swa = Attention(d_model, cfg.attention_config(), **kw)
    if cfg.use_conv:
      self.conv_in = Linear(d_model, (2, d_model), ("embed", None, "mlp"), use_bias=True, **kw)
      self.conv = ShortConv(d_model, cfg.conv_size, use_bias=False, axis_name="mlp", **kw)
      self.conv_out = Linear(d_model, d_model, ("mlp", "embed"), use_bias=True, **kw)
    else:
      self.conv_in = self.conv = self.conv_out = None

  def _phi(self, x):
    return fm.taylor(x, upper=self.cfg.taylor_upper)

  def _linear(self, x, reset, s0):
    q, k = self._phi(self.q(x)), self._phi(self.k(x))
    v = append_ones(self.v(x))
    o, sf = self._scan(q, k, v, None, s0, reset)
    return self._project_out(normalise(o, self.cfg.eps)), sf

  def _conv_branch(self, x, segment_ids=None, state=None):
    u = self.conv_in(x)
    u1, u2 = u[..., 0, :], u[..., 1, :]
    if state is None:
      c, new = self.conv(u1, segment_ids), None
    else:
      c, new = self.conv.step(u1, state)
    return self.conv_out(jax.nn.silu(c) * u2), new

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    y, _ = self._linear(x, doc_starts(segment_ids), None)
    y = y + self.swa(x, segment_ids=segment_ids)
    if self.conv is not None:
      y = y + self._conv_branch(x, segment_ids)[0]
    return y

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    state = {"la": jnp.zeros((batch, self.num_heads, self.feature_width, self.head_dim + 1),
                             dtype),
             "swa": self.swa.init_state(batch, dtype, max_len=max_len)}
    if self.conv is not None:
      state["conv"] = self.conv.init_state(batch, dtype)
    return state

  def step(self, x: jax.Array, state):
    self._check_x(x)
    y, sf = self._linear(x, None, state["la"])
    y_swa, swa_state = self.swa.step(x, state["swa"])
    new = {"la": sf.astype(state["la"].dtype), "swa": swa_state}
    y = y + y_swa
    if self.conv is not None:
      y_conv, new["conv"] = self._conv_branch(x, state=state["conv"])
      y = y + y_conv
    return y, new

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    n = batch * self.num_heads * self.feature_width * (self.head_dim + 1)
    n += self.swa.state_size(batch, max_len=max_len)
    if self.conv is not None:
      n += batch * (self.cfg.conv_size - 1) * self.d_model
    return n


# ----------------------------------------------------------------------------------
# 7. JRT-RNN: prefix linear attention
# ----------------------------------------------------------------------------------


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
    _head_dim(d_model, self.num_heads, self.head_dim)
    check_pos_int(self.feature_dim, "feature_dim")
    _check_feature_map(self)
    _check_kernel_opts(self)


class JRT(_Mixer):
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
