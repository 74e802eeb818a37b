"""DeltaNet and Gated DeltaNet: linear attention with the delta rule.

  * Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
    Length" (:class:`DeltaNet`); layer as fla ``fla/layers/delta_net.py``:
    ``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, ``o_t = S_t^T q_t``.
  * Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
    (:class:`GatedDeltaNet`); layer and inits as fla ``fla/layers/gated_deltanet.py``:
    ``S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T`` with the Mamba2-style
    decay ``log a_t = -exp(A_log) * softplus(W_a x_t + dt_bias)``.
  * ``allow_neg_eigval``: beta in (0, 2), Grazzi et al. 2024.

q, k L2-normalised per head, q scaled by ``Dk^-0.5``, ``beta = sigmoid(W_b x)``. Kernel:
``kernels.delta_rule.delta_rule``. State ``[B, H, Dk, Dv]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.common import GatedRMSNorm, Linear, RMSNorm, check, param
from layers.common import check_bool, check_d_model, check_pos_int, check_positive, is_num
from layers.common import a_log_init, dt_bias_init, l2norm
from layers.linear_attention.common import (MatrixStateMixer, QKVConv, check_kernel_opts,
                                            expanded_dim, resolve_head_dim)

__all__ = ["DeltaNet", "DeltaNetConfig", "GatedDeltaNet", "GatedDeltaNetConfig"]


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
    dk = resolve_head_dim(d_model, self.num_heads, self.head_dim)
    return dk, expanded_dim(dk, self.expand_v, "expand_v", "head_dim * expand_v")

  def validate(self, d_model: int) -> None:
    check_d_model(d_model)
    self.dims(d_model)
    for f in ("use_gate", "use_short_conv", "conv_bias", "allow_neg_eigval"):
      check_bool(getattr(self, f), f)
    check_pos_int(self.conv_size, "conv_size")
    check_positive(self.norm_eps, "norm_eps")
    check_kernel_opts(self)


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


class DeltaNet(MatrixStateMixer):
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
    self.conv = (QKVConv((h * dk, h * dk, h * dv), cfg.conv_size, use_bias=cfg.conv_bias,
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
    q, k, v = self.q(x), self.k(x), self.v(x)
    conv_state = None
    if self.conv is not None:
      q, k, v, conv_state = self.conv(q, k, v, segment_ids, state)
    else:
      q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
    q = l2norm(q) * jnp.asarray(self.head_dim ** -0.5, q.dtype)
    k = l2norm(k)
    s0 = None if state is None else state["S"].astype(jnp.float32)
    o, sf = context_parallel.delta_rule(q, k, v, self.beta(x).astype(q.dtype),
                                        self.log_decay(x), initial_state=s0, reset=reset,
                                        chunk_size=self.cfg.chunk_size, impl=self.cfg.impl)
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
