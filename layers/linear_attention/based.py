"""Based (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff"); HazyResearch/based
``based/models/mixers/{linear_attention,base_conv}.py``.

One mixer, the sum of three branches: Taylor linear attention
``phi(q_t).sum_{j<=t} phi(k_j) v_j^T / phi(q_t).sum_{j<=t} phi(k_j)`` with the 2nd-order
Taylor map ``phi(x) = [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)]``, so that
``phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)`` (``layers.feature_maps.taylor``;
kernel ``kernels.chunked_scan.linear_recurrence``), sliding-window softmax attention
(``layers.attention.Attention``) and BaseConv ``out(silu(conv(W1 x)) * W2 x)``.
State ``[B, H, F, Dv + 1]`` + a ``window``-token KV cache + ``[B, K-1, D]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers import feature_maps as fm
from layers.attention import Attention, AttentionConfig
from layers.common import ConfigError, Linear, ShortConv
from layers.common import check_bool, check_d_model, check_pos_int, check_positive
from layers.common import append_ones, doc_starts, normalise
from layers.linear_attention.common import Mixer, check_kernel_opts, resolve_head_dim

__all__ = ["Based", "BasedConfig"]


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
    resolve_head_dim(d_model, self.num_heads, self.head_dim)
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
    check_kernel_opts(self)


class Based(Mixer):
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
