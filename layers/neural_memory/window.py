"""Titans' memory as a gate (MAG) and memory as a layer (MAL): the neural memory next to or
before sliding-window attention with persistent tokens (Behrouz, Zhong & Mirrokni 2025,
"Titans: Learning to Memorize at Test Time", Sec. 4.2 and 4.3).

With ``P`` the persistent tokens (:mod:`layers.neural_memory.prefix_attention`), SWA
sliding-window attention and LMM the neural memory (:mod:`layers.neural_memory.lmm`)::

    MAG (titans_mag):  o = W_o(norm_a(SWA([P] || x)) * sigmoid(norm_m(LMM(x))))
    MAL (titans_mal):  u = x + LMM(x),  o = SWA([P] || u)

MAG runs the attention and the memory branch in parallel, both RMS-normalised with learned
scales, the memory branch as a sigmoid gate; in MAL a residual around the memory keeps the raw
tokens visible to the attention. The memory branch reads the tokens only, not the
persistent prefix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import Linear, RMSNorm, check_pos_int
from layers.neural_memory.common import check_x, fields_of
from layers.neural_memory.lmm import TitansLMM, TitansLMMConfig
from layers.neural_memory.prefix_attention import PrefixAttention, attention_fields

__all__ = ["TitansMAG", "TitansMAGConfig", "TitansMAL", "TitansMALConfig"]

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TitansMAGConfig(TitansLMMConfig):
  """:class:`TitansLMMConfig` fields (the memory branch) plus the attention branch:

  window: sliding window of the attention (the persistent tokens are always visible).
  num_persistent: learnable persistent-memory tokens (0 = none).
  attn_heads: attention heads (must divide d_model; head dim even with RoPE).
  rope_theta: RoPE base of the attention (0 disables it).
  """

  window: int = 64
  num_persistent: int = 4
  attn_heads: int = 4
  rope_theta: float = 10000.0

  def validate(self, d_model: int) -> None:
    super().validate(d_model)
    check_pos_int(self.window, "window")
    attention_fields(self, d_model)


@dataclasses.dataclass(frozen=True)
class TitansMALConfig(TitansMAGConfig):
  """Same fields as :class:`TitansMAGConfig`."""


class _WindowMemory(nnx.Module):
  """MAG / MAL: an LMM plus sliding-window attention with persistent tokens."""

  Config = TitansMAGConfig

  def __init__(self, d_model: int, cfg=None, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    cfg = self.Config() if cfg is None else cfg
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lmm = TitansLMM(d_model, fields_of(cfg, TitansLMMConfig), **kw)
    self.attn = PrefixAttention(d_model, cfg.attn_heads, cfg.num_persistent, cfg.rope_theta,
                                **kw)

  def _check_x(self, x: jax.Array) -> None:
    check_x(self, x)

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    return {"lmm": self.lmm.init_state(batch, dtype),
            "swa": self.attn.window_init_state(batch, dtype, self.cfg.window)}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    return (self.lmm.state_size(batch)
            + 2 * batch * self.cfg.window * self.attn.heads * self.attn.head_dim)


class TitansMAG(_WindowMemory):
  """Memory as a gate: ``o = W_o(norm_a(SWA([P] || x)) * sigmoid(norm_m(LMM(x))))``.

  State: ``{"lmm": the memory's state, "swa": the window's KV cache}``.
  """

  Config = TitansMAGConfig

  def __init__(self, d_model: int, cfg: TitansMAGConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(d_model, cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_attn = RMSNorm(d_model, **kw)
    self.norm_mem = RMSNorm(d_model, **kw)
    self.proj = Linear(d_model, d_model, ("embed", "mlp"), **kw)

  def _combine(self, ya, ym):
    gate = jax.nn.sigmoid(self.norm_mem(ym).astype(_F32))
    return self.proj((self.norm_attn(ya).astype(_F32) * gate).astype(self.dtype))

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    return self._combine(self.attn.window_call(x, segment_ids, self.cfg.window),
                         self.lmm(x, segment_ids))

  def step(self, x: jax.Array, state):
    self._check_x(x)
    ya, swa = self.attn.window_step(x, state["swa"], self.cfg.window)
    ym, lmm = self.lmm.step(x, state["lmm"])
    return self._combine(ya, ym), {"lmm": lmm, "swa": swa}


class TitansMAL(_WindowMemory):
  """Memory as a layer: ``u = x + LMM(x)``, ``o = SWA([P] || u)``.

  State: ``{"lmm": the memory's state, "swa": the window's KV cache}``.
  """

  Config = TitansMALConfig

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    u = x + self.lmm(x, segment_ids).astype(x.dtype)
    return self.attn.window_call(u, segment_ids, self.cfg.window)

  def step(self, x: jax.Array, state):
    self._check_x(x)
    ym, lmm = self.lmm.step(x, state["lmm"])
    y, swa = self.attn.window_step(x + ym.astype(x.dtype), state["swa"], self.cfg.window)
    return y, {"lmm": lmm, "swa": swa}
