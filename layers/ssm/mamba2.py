"""Mamba2: state space duality (SSD) (Dao & Gu 2024, "Transformers are SSMs: Generalized
Models and Efficient Algorithms Through Structured State Space Duality"; state-spaces/mamba
``mamba2_simple.py``, ``ssd_minimal.py``; the code is lcm's own).

A scalar decay per head and a matrix state ``S: [N, P]`` per head::

    S_t = exp(dt_t A) S_{t-1} + B_t (dt_t x_t)^T,   A = -exp(A_log),   y_t = S_t^T C_t + D x_t

SSD is ``kernels.chunked_scan.linear_recurrence`` (``q = C``, ``k = B``, ``v = dt x``,
``log_decay = dt A``, ``reset`` at document starts; the short convolutions get the segment
ids, so no information crosses a document boundary), through ``layers.context_parallel``
when a ``sequence`` mesh axis is in context. ``impl="auto"`` follows that kernel's ``AUTO``
table (the chunked ``xla`` form on CPU, Pallas on TPU / GPU). Optimizer tag ``"ssm"`` on
``A_log``, ``D``, ``dt_bias``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.common import PALLAS_IMPLS
from layers import context_parallel
from layers.common import (GatedRMSNorm, Linear, ShortConv, check, check_pos_int, doc_starts,
                           dt_bias_init, is_num, ones_init, param)
from layers.ssm.common import check_dt_range, check_impl, check_x


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  """Hyper-parameters of :class:`Mamba2` (names and defaults as mamba2_simple.py, except
  head_dim 64 as in the issue / Mamba2 paper's small models).

  d_state: N (64). head_dim: P (64); heads H = expand * d_model / P.
  d_conv: width of the causal depthwise convolution over (x, B, C) (4).
  expand: d_inner = expand * d_model (2).
  ngroups: G groups of shared B/C (1); head h uses group ``h // (H / G)``.
  A_init_min, A_init_max: ``A ~ U[A_init_min, A_init_max]`` per head (1, 16), A_log stored.
  dt_min, dt_max, dt_init_floor: dt_bias init, as Mamba.
  norm_eps: epsilon of the gated RMSNorm (1e-5).
  conv_bias, bias: as Mamba. chunk_size, impl: passed to ``linear_recurrence``.
  """

  d_state: int = 64
  head_dim: int = 64
  d_conv: int = 4
  expand: int = 2
  ngroups: int = 1
  A_init_min: float = 1.0
  A_init_max: float = 16.0
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  norm_eps: float = 1e-5
  conv_bias: bool = True
  bias: bool = False
  chunk_size: int = 256
  impl: str = "auto"

  def derived_heads(self, d_model: int) -> tuple[str, int]:
    """The head count (split over the ``tensor`` mesh axis) and the field that sets it:
    H = expand * d_model / head_dim."""
    return "head_dim", self.expand * d_model // self.head_dim

  def validate(self, d_model: int) -> None:
    check_pos_int(d_model, "d_model")
    check_pos_int(self.d_state, "d_state")
    check_pos_int(self.head_dim, "head_dim")
    check_pos_int(self.d_conv, "d_conv")
    check_pos_int(self.expand, "expand")
    d_inner = self.expand * d_model
    check(d_inner % self.head_dim == 0, "head_dim",
          f"must divide d_inner = expand * d_model = {d_inner} (got {self.head_dim})")
    check_pos_int(self.ngroups, "ngroups")
    heads = d_inner // self.head_dim
    check(heads % self.ngroups == 0, "ngroups",
          f"must divide the number of heads {heads} (got {self.ngroups})")
    check(is_num(self.A_init_min) and self.A_init_min > 0, "A_init_min",
          f"must be a number > 0 (got {self.A_init_min!r})")
    check(is_num(self.A_init_max) and self.A_init_max >= self.A_init_min, "A_init_max",
          f"must be a number >= A_init_min={self.A_init_min} (got {self.A_init_max!r})")
    check_dt_range(self.dt_min, self.dt_max)
    check(is_num(self.dt_init_floor) and self.dt_init_floor > 0, "dt_init_floor",
          f"must be a number > 0 (got {self.dt_init_floor!r})")
    check(is_num(self.norm_eps) and self.norm_eps > 0, "norm_eps",
          f"must be a number > 0 (got {self.norm_eps!r})")
    check(isinstance(self.conv_bias, bool), "conv_bias",
          f"must be True or False (got {self.conv_bias!r})")
    check(isinstance(self.bias, bool), "bias", f"must be True or False (got {self.bias!r})")
    check_pos_int(self.chunk_size, "chunk_size")
    check_impl(self.impl)
    if self.impl == "auto" or self.impl in PALLAS_IMPLS:
      check(self.chunk_size % 16 == 0, "chunk_size",
            f"must be a multiple of 16 for the Pallas kernels (impl={self.impl!r} uses them "
            f"on TPU / GPU; got {self.chunk_size}); or set impl='xla'")


class Mamba2(nnx.Module):
  """Mamba-2 block with SSD (Dao & Gu 2024)::

      z, x, B, C, dt = in_proj(u)        [d_inner], [d_inner], [G, N], [G, N], [H]
      x, B, C = silu(conv1d(x, B, C))    causal depthwise, width d_conv
      dt = softplus(dt + dt_bias)        [B, T, H];  A = -exp(A_log) [H] (one scalar per head)
      S_t = exp(dt_t A) S_{t-1} + B_t (dt_t x_t)^T     per head, S: [N, P]
      y = S_t^T C_t + D x;  out = out_proj(rmsnorm(y * silu(z)))   (norm_before_gate=False)

  SSD runs as ``linear_recurrence(q=C, k=B, v=x*dt, log_decay=dt*A)`` with B/C passed as
  their G groups (``C B^T`` once per group), split over a ``sequence`` mesh axis in context
  (``layers.context_parallel``, as the convolutions). The in-projection is three Linears
  (z|x, B|C, dt), the convolution two ShortConvs (x; B|C): one projection / depthwise conv
  (mamba2_simple.py's ``[z, x, B, C, dt]``) split so that each kernel has one logical
  channel axis ("mlp", "state", "heads") to shard. The gated RMSNorm normalises over
  all of d_inner, as Mamba2Simple (the full Mamba2 module normalises per group of
  d_inner / G when G > 1).

  Decode state: ``{"conv": {"x": [B, d_conv-1, d_inner], "bc": [B, d_conv-1, 2 G N]},
  "ssm": [B, H, P, N]}``. The ssm state is stored in mamba_ssm's ``[B, H, P, N]`` layout;
  ``linear_recurrence`` carries ``[B, H, Dk, Dv] = [B, H, N, P]``, so ``step`` transposes
  at the kernel boundary.
  """

  Config = Mamba2Config

  def __init__(self, d_model: int, cfg: Mamba2Config = Mamba2Config(), *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    di, n, p, g = cfg.expand * d_model, cfg.d_state, cfg.head_dim, cfg.ngroups
    self.d_inner, self.num_heads = di, di // p
    h = self.num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.zx_proj = Linear(d_model, (2, di), ("embed", None, "mlp"), use_bias=cfg.bias, **kw)
    self.bc_proj = Linear(d_model, (2, g * n), ("embed", None, "state"), use_bias=cfg.bias,
                          **kw)
    self.dt_proj = Linear(d_model, h, ("embed", "heads"), use_bias=cfg.bias, **kw)
    self.conv_x = ShortConv(di, cfg.d_conv, use_bias=cfg.conv_bias, axis_name="mlp", **kw)
    self.conv_bc = ShortConv(2 * g * n, cfg.d_conv, use_bias=cfg.conv_bias,
                             axis_name="state", **kw)
    self.dt_bias = param(rngs, dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
                         (h,), ("heads",), param_dtype, tag="ssm")
    self.A_log = param(
        rngs, lambda k, s, d: jnp.log(jax.random.uniform(
            k, s, jnp.float32, cfg.A_init_min, cfg.A_init_max)).astype(d),
        (h,), ("heads",), param_dtype, tag="ssm")
    self.D = param(rngs, ones_init, (h,), ("heads",), param_dtype, tag="ssm")
    self.norm = GatedRMSNorm(di, eps=cfg.norm_eps, norm_before_gate=False, axis_name="mlp",
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.out_proj = Linear(di, d_model, ("mlp", "embed"), use_bias=cfg.bias, **kw)

  def _mix(self, u, conv_x, conv_bc, *, reset=None, initial_state=None):
    """u [B, T, D] -> (out [B, T, D], final state [B, H, N, P] fp32 (kernel layout))."""
    cfg = self.cfg
    bsz, t, _ = u.shape
    n, p, g, h = cfg.d_state, cfg.head_dim, cfg.ngroups, self.num_heads
    z, x = self.zx_proj.parts(u)
    bc = self.bc_proj(u).reshape(bsz, t, 2 * g * n)
    x = jax.nn.silu(conv_x(x))
    bc = jax.nn.silu(conv_bc(bc))
    # [B, T, G, N]: linear_recurrence takes grouped q/k (head h reads group h // (H / G)).
    b = bc[..., :g * n].reshape(bsz, t, g, n)
    c = bc[..., g * n:].reshape(bsz, t, g, n)
    dt = jax.nn.softplus(self.dt_proj(u).astype(jnp.float32)
                         + self.dt_bias[...].astype(jnp.float32))  # [B, T, H]
    a = -jnp.exp(self.A_log[...].astype(jnp.float32))  # [H]
    xh = x.reshape(bsz, t, h, p).astype(jnp.float32)
    o, s_final = context_parallel.linear_recurrence(
        c.astype(jnp.float32), b.astype(jnp.float32), xh * dt[..., None],
        log_decay=dt * a, initial_state=initial_state, reset=reset,
        chunk_size=cfg.chunk_size, impl=cfg.impl)
    y = o + self.D[...].astype(jnp.float32)[:, None] * xh
    y = self.norm(y.reshape(bsz, t, self.d_inner), z)
    return self.out_proj(y), s_final

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, T, D]; segment_ids: [B, T] int or None -> [B, T, D]."""
    check_x(x, self.d_model, "Mamba2")
    y, _ = self._mix(x, lambda v: self.conv_x(v, segment_ids),
                     lambda v: self.conv_bc(v, segment_ids),
                     reset=doc_starts(segment_ids))
    return y

  def init_state(self, batch: int, dtype=jnp.float32, *,
                 max_len: int | None = None) -> dict[str, Any]:
    del max_len
    cfg = self.cfg
    return {"conv": {"x": self.conv_x.init_state(batch, dtype),
                     "bc": self.conv_bc.init_state(batch, dtype)},
            "ssm": jnp.zeros((batch, self.num_heads, cfg.head_dim, cfg.d_state), dtype)}

  def step(self, x: jax.Array, state: dict[str, Any]):
    """x: [B, t, D] (t >= 1 tokens of one document per row) -> (y, new state)."""
    check_x(x, self.d_model, "Mamba2")
    new_conv = {}

    def conv(name, module):
      def fn(v):
        y, new_conv[name] = module.step(v, state["conv"][name])
        return y
      return fn

    s0 = jnp.swapaxes(state["ssm"].astype(jnp.float32), -1, -2)  # [B,H,P,N] -> [B,H,N,P]
    y, sf = self._mix(x, conv("x", self.conv_x), conv("bc", self.conv_bc), initial_state=s0)
    ssm = jnp.swapaxes(sf, -1, -2).astype(state["ssm"].dtype)
    return y, {"conv": {"x": new_conv["x"], "bc": new_conv["bc"]}, "ssm": ssm}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    cfg = self.cfg
    conv = (cfg.d_conv - 1) * (self.d_inner + 2 * cfg.ngroups * cfg.d_state)
    return batch * (conv + self.num_heads * cfg.head_dim * cfg.d_state)
