"""RetNet multi-scale retention (Sun et al. 2023, "Retentive Network: A Successor to
Transformer for Large Language Models"); layer details as fla-org/flash-linear-attention
``fla/layers/multiscale_retention.py``.

``S_t = gamma_h S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (q_t / sqrt(Dk))`` with the fixed
per-head decays ``gamma_h = 1 - 2^(-5-h)``, RoPE on q and k, per-head RMSNorm * swish(g).
Kernel: ``kernels.chunked_scan.linear_recurrence`` with a constant per-head log decay.
Shapes: q/k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]`` (Dv = Dk * expand_v), state
``[B, H, Dk, Dv]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers.attention import apply_rope
from layers.common import GatedRMSNorm, Linear, RMSNorm, check, segment_positions
from layers.common import check_bool, check_d_model, check_positive, is_num
from layers.common import doc_starts
from layers.linear_attention.common import (Mixer, check_kernel_opts, expanded_dim,
                                            resolve_head_dim)

__all__ = ["RetNet", "RetNetConfig", "retnet_log_decays"]


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
    dk = resolve_head_dim(d_model, self.num_heads, self.head_dim)
    expanded_dim(dk, self.expand_v, "expand_v", "head_dim * expand_v")
    check(is_num(self.rope_theta) and self.rope_theta >= 0, "rope_theta",
          f"must be a finite number >= 0, 0 disables RoPE (got {self.rope_theta!r})")
    if self.rope_theta > 0:
      check(dk % 2 == 0, "head_dim", f"must be even when RoPE is on (got head_dim={dk}); "
            "set an even head_dim or rope_theta=0")
    check_bool(self.use_output_gate, "use_output_gate")
    check_positive(self.norm_eps, "norm_eps")
    check_kernel_opts(self)


def retnet_log_decays(num_heads: int) -> jax.Array:
  """log(gamma_h) with gamma_h = 1 - 2^(-5-h), h = 0..H-1 (RetNet's fixed per-head decays),
  as ``log1p(-2^(-5-h))`` in fp32 (exact even where 1 - 2^(-5-h) rounds to 1)."""
  h = jnp.arange(num_heads, dtype=jnp.float32)
  return jnp.log1p(-jnp.exp2(-5.0 - h))


class RetNet(Mixer):
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
