"""Gated linear attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training"); layer as fla ``fla/layers/gla.py``.

``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t / sqrt(Dk)`` with the key-wise
forget gate ``log alpha_t = logsigmoid(W2 W1 x_t + b) / gate_logit_normalizer`` (low-rank
W2 W1), per-head RMSNorm * swish(g). Kernel: ``kernels.chunked_scan.linear_recurrence`` with
a ``[B, T, H, Dk]`` log decay. State ``[B, H, Dk, Dv]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import GatedRMSNorm, Linear, RMSNorm, check
from layers.common import check_bool, check_d_model, check_pos_int, check_positive, is_num
from layers.linear_attention.common import (MatrixStateMixer, QKVConv, check_kernel_opts,
                                            expanded_dim)

__all__ = ["GLA", "GLAConfig"]


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
    key = expanded_dim(d_model, self.expand_k, "expand_k", "d_model * expand_k")
    val = expanded_dim(d_model, self.expand_v, "expand_v", "d_model * expand_v")
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
    check_kernel_opts(self)


class GLA(MatrixStateMixer):
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
    self.conv = (QKVConv((h * dk, h * dk, h * dv), cfg.conv_size, use_bias=False, **kw)
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
