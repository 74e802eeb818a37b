"""Mamba: selective state space model (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling
with Selective State Spaces"; state-spaces/mamba ``mamba_ssm/modules/mamba_simple.py``,
``selective_scan_ref``; the code is lcm's own).

Input-dependent dt, B, C per token; per inner channel d and state n::

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,   A = -exp(A_log),   y_t = h_t . C_t + D x_t

The selective scan is ``kernels.diag_scan.diagonal_recurrence`` (``log_a = dt A``,
``b = dt B x``, ``reset`` at document starts; the short convolution gets the segment ids, so
no information crosses a document boundary). ``impl="auto"`` follows that kernel's ``AUTO``
table (the per-token reference scan on CPU, Pallas on TPU / GPU). Optimizer tag ``"ssm"`` on
``A_log``, ``D``, ``dt_bias``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel
from layers.common import (Linear, ShortConv, check, check_pos_int, doc_starts, dt_bias_init,
                           is_num, ones_init, param)
from layers.ssm.common import check_dt_range, check_impl, check_x, const_init, uniform_init


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """Hyper-parameters of :class:`Mamba` (names and defaults as mamba_simple.py).

  d_state: N, state size per inner channel (16).
  d_conv: width of the causal depthwise convolution (4).
  expand: d_inner = expand * d_model (2).
  dt_rank: rank of the dt projection; None = ceil(d_model / 16) (mamba's "auto").
  dt_min, dt_max, dt_init_floor: ``dt = max(exp(U[log dt_min, log dt_max]), floor)``,
    ``dt_bias = dt + log(-expm1(-dt))``.
  dt_scale: dt_proj weight ~ U(+-dt_scale * dt_rank^-0.5).
  conv_bias: bias of the depthwise convolution; bias: biases of in_proj / out_proj.
  chunk_size, impl: passed to ``diagonal_recurrence``.
  """

  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | None = None
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  dt_scale: float = 1.0
  conv_bias: bool = True
  bias: bool = False
  chunk_size: int = 128
  impl: str = "auto"

  def validate(self, d_model: int) -> None:
    check_pos_int(d_model, "d_model")
    check_pos_int(self.d_state, "d_state")
    check_pos_int(self.d_conv, "d_conv")
    check_pos_int(self.expand, "expand")
    if self.dt_rank is not None:
      check_pos_int(self.dt_rank, "dt_rank")
    check_dt_range(self.dt_min, self.dt_max)
    check(is_num(self.dt_init_floor) and self.dt_init_floor > 0, "dt_init_floor",
          f"must be a number > 0 (got {self.dt_init_floor!r})")
    check(is_num(self.dt_scale) and self.dt_scale > 0, "dt_scale",
          f"must be a number > 0 (got {self.dt_scale!r})")
    check(isinstance(self.conv_bias, bool), "conv_bias",
          f"must be True or False (got {self.conv_bias!r})")
    check(isinstance(self.bias, bool), "bias", f"must be True or False (got {self.bias!r})")
    check_pos_int(self.chunk_size, "chunk_size")
    check_impl(self.impl)


class Mamba(nnx.Module):
  """Mamba-1 block (Gu & Dao 2023)::

      x, z = in_proj(u)                      [B, T, d_inner] each
      x = silu(conv1d(x))                    causal depthwise, width d_conv
      dt_r, B, C = x_proj(x)                 [dt_rank], [N], [N]
      dt = softplus(dt_proj(dt_r) + dt_bias) [B, T, d_inner]
      h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t   (A = -exp(A_log) [d_inner, N])
      y = (h_t . C_t) + D x;  out = out_proj(y * silu(z))

  The selective scan is ``diagonal_recurrence(log_a = dt A, b = dt B x)`` over
  ``[B, T, d_inner, N]``. Decode state: ``{"conv": [B, d_conv-1, d_inner]`` (the last inputs
  of the convolution, ShortConv's layout), ``"ssm": [B, d_inner, N]}``.
  """

  Config = MambaConfig

  def __init__(self, d_model: int, cfg: MambaConfig = MambaConfig(), *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    di, n = cfg.expand * d_model, cfg.d_state
    self.d_inner = di
    self.dt_rank = cfg.dt_rank or math.ceil(d_model / 16)
    r = self.dt_rank
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_proj = Linear(d_model, (2, di), ("embed", None, "mlp"), use_bias=cfg.bias, **kw)
    self.conv = ShortConv(di, cfg.d_conv, use_bias=cfg.conv_bias, axis_name="mlp", **kw)
    self.x_proj = Linear(di, r + 2 * n, ("mlp", None), **kw)
    std = cfg.dt_scale * r ** -0.5
    self.dt_proj = Linear(r, di, (None, "mlp"), init=uniform_init(-std, std), **kw)
    self.dt_bias = param(rngs, dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
                         (di,), ("mlp",), param_dtype, tag="ssm")
    a_log = jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32))
    self.A_log = param(rngs, const_init(a_log), (di, n), ("mlp", "state"), param_dtype,
                       tag="ssm")
    self.D = param(rngs, ones_init, (di,), ("mlp",), param_dtype, tag="ssm")
    self.out_proj = Linear(di, d_model, ("mlp", "embed"), use_bias=cfg.bias, **kw)

  def _mix(self, u, conv_fn, *, reset=None, initial_state=None):
    """u [B, T, D] -> (out [B, T, D], final ssm state [B, d_inner, N] fp32)."""
    n, r = self.cfg.d_state, self.dt_rank
    xz = self.in_proj(u)
    x, z = xz[:, :, 0], xz[:, :, 1]
    x = jax.nn.silu(conv_fn(x))
    dbc = self.x_proj(x)
    dt_r, b, c = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
    dt = jax.nn.softplus(self.dt_proj(dt_r).astype(jnp.float32)
                         + self.dt_bias[...].astype(jnp.float32))  # [B, T, Di]
    a = -jnp.exp(self.A_log[...].astype(jnp.float32))  # [Di, N]
    x32 = x.astype(jnp.float32)
    log_a = dt[..., None] * a
    inp = (dt * x32)[..., None] * b.astype(jnp.float32)[:, :, None, :]
    h, h_final = context_parallel.diagonal_recurrence(
        log_a, inp, initial_state=initial_state, reset=reset, chunk_size=self.cfg.chunk_size,
        impl=self.cfg.impl)
    y = jnp.einsum("btdn,btn->btd", h, c.astype(jnp.float32))
    y = y + self.D[...].astype(jnp.float32) * x32
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype)
    return self.out_proj(y), h_final

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, T, D]; segment_ids: [B, T] int or None -> [B, T, D]."""
    check_x(x, self.d_model, "Mamba")
    y, _ = self._mix(x, lambda v: self.conv(v, segment_ids), reset=doc_starts(segment_ids))
    return y

  def init_state(self, batch: int, dtype=jnp.float32, *,
                 max_len: int | None = None) -> dict[str, jax.Array]:
    del max_len
    return {"conv": self.conv.init_state(batch, dtype),
            "ssm": jnp.zeros((batch, self.d_inner, self.cfg.d_state), dtype)}

  def step(self, x: jax.Array, state: dict[str, jax.Array]):
    """x: [B, t, D] (t >= 1 tokens of one document per row) -> (y, new state)."""
    check_x(x, self.d_model, "Mamba")
    conv_state = {}

    def conv_fn(v):
      y, conv_state["new"] = self.conv.step(v, state["conv"])
      return y

    y, h = self._mix(x, conv_fn, initial_state=state["ssm"].astype(jnp.float32))
    return y, {"conv": conv_state["new"], "ssm": h.astype(state["ssm"].dtype)}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    return batch * self.d_inner * ((self.cfg.d_conv - 1) + self.cfg.d_state)


