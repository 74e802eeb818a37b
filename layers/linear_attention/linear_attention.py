"""Causal linear attention with a feature map (Katharopoulos et al. 2020, "Transformers are
RNNs: Fast Autoregressive Transformers with Linear Attention").

``o_t = sum_{j<=t} (phi(q_t).phi(k_j)) v_j``, optionally divided by
``phi(q_t).sum_{j<=t} phi(k_j) + eps``; ``phi`` one of ``layers.feature_maps`` (identity,
elu + 1, relu, Based's 2nd-order Taylor map). Kernel: ``kernels.chunked_scan.linear_recurrence``
with no decay; the denominator comes out of the same call (v gets a column of ones).
Shapes: x ``[B, T, D]``, q/k ``[B, T, H, F]``, v ``[B, T, H, Dv]``, state ``[B, H, F', Dv (+1)]``
with F' the feature-map width.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import feature_maps as fm
from layers.common import Linear, RMSNorm
from layers.common import check_bool, check_d_model, check_pos_int
from layers.common import append_ones, doc_starts, normalise
from layers.linear_attention.common import (Mixer, check_feature_map, check_kernel_opts,
                                            resolve_head_dim)

__all__ = ["LinearAttention", "LinearAttentionConfig"]


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
    dv = resolve_head_dim(d_model, self.num_heads, self.head_dim)
    if self.feature_dim is not None:
      check_pos_int(self.feature_dim, "feature_dim")
    del dv
    check_feature_map(self)
    check_bool(self.out_norm, "out_norm")
    check_kernel_opts(self)


class LinearAttention(Mixer):
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
