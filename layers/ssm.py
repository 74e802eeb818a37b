"""State-space token mixers: S4D, Mamba (selective scan) and Mamba2 (SSD).

References (the math and the initialisations; the code is lcm's own):
  * Gu, Gupta, Goel & Re 2022, "On the Parameterization and Initialization of Diagonal State
    Space Models" (S4D; state-spaces/s4 ``models/s4/s4d.py``, inits in
    ``src/models/sequence/kernels/dplr.py``).
  * Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
    (state-spaces/mamba ``mamba_ssm/modules/mamba_simple.py``, ``selective_scan_ref``).
  * Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
    Through Structured State Space Duality" (Mamba2 / SSD; ``mamba2_simple.py``,
    ``ssd_minimal.py``).

Every layer follows the mixer contract (docs/design.md, see ``layers/attention.py``):
``y = m(x, segment_ids)``, ``state = m.init_state(batch, dtype)``, ``y, state = m.step(x,
state)``, ``m.state_size(batch)``. Packed documents: the short convolutions get the
``segment_ids`` (no tap reaches into the previous document) and the scans get
``reset = first token of each document`` (the state is zeroed there), so no information
crosses a document boundary.

Scans: S4D and Mamba run through ``kernels.diag_scan.diagonal_recurrence`` (element-wise
``h_t = exp(log_a_t) h_{t-1} + b_t``), Mamba2 through ``kernels.chunked_scan.linear_recurrence``
(``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``). ``impl`` (config field) picks the
kernel: ``"auto"`` is the XLA chunked form on CPU, Pallas on TPU / GPU (complex S4D: XLA).

Optimizer tags (``optim_tag``, read by ``lcm.train``): ``"ssm"`` (lr capped, no weight
decay) on S4D ``log_dt``, ``log_A_real``, ``A_imag`` and on Mamba / Mamba2 ``A_log``, ``D``,
``dt_bias``. (mamba_ssm only exempts Mamba's ``A_log``/``D``/``dt_bias`` from weight decay and
trains them at the base lr; lcm's ``ssm`` group also caps their lr, at 1e-3 by default: set
``train.param_groups.ssm.lr`` to change it.) Plain projections use lcm's LeCun-normal
``dense_init`` (the references use PyTorch's default ``nn.Linear`` init); the SSM-specific
inits follow the references exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.diag_scan import diagonal_recurrence
from layers import context_parallel
from layers.common import (ConfigError, GatedRMSNorm, Linear, ShortConv, check, ones_init,
                           param)
from layers.common import check_pos_int, is_num

IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")
S4D_INITS = ("lin", "inv")
S4D_PARALLEL = ("fft", "scan")


# ------------------------------------------------------------------------------ helpers


def _check_dt_range(dt_min: Any, dt_max: Any) -> None:
  check(is_num(dt_min) and dt_min > 0, "dt_min", f"must be a number > 0 (got {dt_min!r})")
  check(is_num(dt_max) and dt_max >= dt_min, "dt_max",
        f"must be a number >= dt_min={dt_min} (got {dt_max!r})")


def _check_impl(impl: Any) -> None:
  check(impl in IMPLS, "impl", f"must be one of {', '.join(IMPLS)} (got {impl!r})")


def segment_starts(segment_ids: jax.Array | None) -> jax.Array | None:
  """[B, T] bool, True at the first token of every document (and at t = 0); None -> None."""
  if segment_ids is None:
    return None
  b = segment_ids.shape[0]
  return jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def _log_uniform_dt(key, shape, dt_min: float, dt_max: float, floor: float) -> jax.Array:
  """dt = exp(U[log dt_min, log dt_max]) floored at ``floor`` (mamba_ssm's dt init)."""
  u = jax.random.uniform(key, shape, jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  return jnp.maximum(dt, floor)


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
  """``dt_bias = dt + log(-expm1(-dt))`` (inverse softplus), so softplus(dt_bias) = dt."""
  def init(key, shape, dtype):
    dt = _log_uniform_dt(key, shape, dt_min, dt_max, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def _uniform(lo: float, hi: float):
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, lo, hi).astype(dtype)
  return init


def _const(value: jax.Array):
  def init(key, shape, dtype):
    del key
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), shape).astype(dtype)
  return init


def _check_x(x: jax.Array, d_model: int, name: str) -> None:
  if x.ndim != 3 or x.shape[-1] != d_model:
    raise ValueError(f"{name} expects x of shape [B, T, {d_model}], got {x.shape}")


# ------------------------------------------------------------------------------ S4D


@dataclasses.dataclass(frozen=True)
class S4DConfig:
  """Hyper-parameters of :class:`S4D`.

  d_state: N, the real state size per channel; N/2 complex conjugate-pair modes (even).
  init: ``"lin"`` (S4D-Lin, ``A_n = -1/2 + i pi n``) or ``"inv"`` (S4D-Inv,
    ``A_n = -1/2 + i N/pi (N/(2n+1) - 1)``).
  dt_min, dt_max: ``log_dt ~ U[log dt_min, log dt_max]`` per channel.
  parallel: form of ``__call__`` without segment ids: ``"fft"`` (convolution with the
    materialised kernel, FFT length 2T) or ``"scan"`` (the recurrence). With segment ids the
    recurrence (with resets) is always used.
  chunk_size: chunk of the recurrence (``diagonal_recurrence``).
  impl: ``diagonal_recurrence`` implementation (complex inputs: ``auto`` = ``xla``).
  """

  d_state: int = 64
  init: str = "lin"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  parallel: str = "fft"
  chunk_size: int = 128
  impl: str = "auto"

  def validate(self, d_model: int) -> None:
    check_pos_int(d_model, "d_model")
    check_pos_int(self.d_state, "d_state")
    check(self.d_state % 2 == 0, "d_state",
          f"must be even (N/2 complex conjugate-pair modes; got {self.d_state})")
    check(self.init in S4D_INITS, "init",
          f"must be one of {', '.join(S4D_INITS)} (got {self.init!r})")
    _check_dt_range(self.dt_min, self.dt_max)
    check(self.parallel in S4D_PARALLEL, "parallel",
          f"must be one of {', '.join(S4D_PARALLEL)} (got {self.parallel!r})")
    check_pos_int(self.chunk_size, "chunk_size")
    _check_impl(self.impl)
    check(self.impl not in ("pallas_tpu", "pallas_gpu"), "impl",
          f"S4D's scan is complex-valued: use auto, xla or reference (got {self.impl!r})")


def s4d_imag_init(init: str, n_state: int) -> jax.Array:
  """Imaginary parts of S4D's diagonal A, [N/2] (dplr.py: ``lin`` and ``inv``)."""
  n = jnp.arange(n_state // 2, dtype=jnp.float32)
  if init == "lin":
    return math.pi * n
  if init == "inv":
    return n_state / math.pi * (n_state / (2 * n + 1) - 1)
  raise ConfigError("init", f"must be one of {', '.join(S4D_INITS)} (got {init!r})")


class S4D(nnx.Module):
  """Diagonal S4 (Gu et al. 2022): H = d_model independent complex diagonal SSMs.

  Per channel h (N/2 modes n, ZOH discretisation, ``B = 1`` as in s4d.py)::

      dtA = exp(log_dt) * A,   A = -exp(log_A_real) + i A_imag
      state:   s_t = exp(dtA) s_{t-1} + (exp(dtA) - 1) / A * u_t          (complex)
      output:  y_t = 2 Re(sum_n C_n s_t,n) + D u_t
      kernel:  K_l = 2 Re(sum_n C_n (exp(dtA) - 1) / A exp(dtA l)),   y = K * u + D u

  then GELU and a position-wise ``Linear(d, 2d)`` + GLU (as s4d.py's output_linear).

  Parallel form: the causal convolution with the materialised kernel by FFT (length 2T, so
  the circular convolution is the linear one). The FFT convolution cannot respect document
  boundaries, so with ``segment_ids`` the layer runs the recurrence through
  ``diagonal_recurrence`` with ``reset`` at document starts (O(T N) work, exact isolation).
  ``step`` always runs the recurrence. Decode state: ``{"ssm": [B, H, N/2, 2]}``, the complex
  state as (real, imag) pairs (a real array, so it shards, scans and counts like any state).
  """

  Config = S4DConfig

  def __init__(self, d_model: int, cfg: S4DConfig = S4DConfig(), *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    h, n2 = d_model, cfg.d_state // 2
    self.n_modes = n2
    self.log_dt = param(
        rngs, _uniform(math.log(cfg.dt_min), math.log(cfg.dt_max)), (h,), ("embed",),
        param_dtype, tag="ssm")
    self.log_A_real = param(rngs, _const(math.log(0.5)), (h, n2), ("embed", "state"),
                            param_dtype, tag="ssm")
    self.A_imag = param(rngs, _const(s4d_imag_init(cfg.init, cfg.d_state)), (h, n2),
                        ("embed", "state"), param_dtype, tag="ssm")
    # C ~ complex standard normal (real and imaginary parts N(0, 1/2)), stored as pairs.
    self.C = param(rngs, lambda k, s, d: (jax.random.normal(k, s, jnp.float32)
                                          * math.sqrt(0.5)).astype(d),
                   (h, n2, 2), ("embed", "state", None), param_dtype)
    self.D = param(rngs, lambda k, s, d: jax.random.normal(k, s, jnp.float32).astype(d),
                   (h,), ("embed",), param_dtype)
    self.out = Linear(d_model, (2, d_model), ("embed", None, "mlp"), use_bias=True,
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  # ---------------------------------------------------------------- SSM pieces (fp32)
  def discretize(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dtA, B_bar, C): complex64 [H, N/2] each (ZOH with B = 1)."""
    dt = jnp.exp(self.log_dt[...].astype(jnp.float32))
    a = (-jnp.exp(self.log_A_real[...].astype(jnp.float32))
         + 1j * self.A_imag[...].astype(jnp.float32))
    dta = dt[:, None] * a
    b_bar = (jnp.exp(dta) - 1.0) / a
    c = self.C[...].astype(jnp.float32)
    return dta, b_bar, jax.lax.complex(c[..., 0], c[..., 1])

  def kernel(self, length: int) -> jax.Array:
    """The SSM convolution kernel K [H, length] (fp32)."""
    dta, b_bar, c = self.discretize()
    pows = jnp.exp(dta[..., None] * jnp.arange(length, dtype=jnp.float32))  # [H, N/2, L]
    return 2.0 * jnp.einsum("hn,hnl->hl", c * b_bar, pows).real

  def ssm_fft(self, u: jax.Array) -> jax.Array:
    """y = K * u (causal), u [B, T, H] -> [B, T, H] fp32, by FFT of length 2T."""
    t = u.shape[1]
    k = self.kernel(t)  # [H, T]
    k_f = jnp.fft.rfft(k, n=2 * t, axis=-1)  # [H, T+1]
    u_f = jnp.fft.rfft(u.astype(jnp.float32), n=2 * t, axis=1)  # [B, T+1, H]
    return jnp.fft.irfft(u_f * k_f.T[None], n=2 * t, axis=1)[:, :t]

  def ssm_scan(self, u: jax.Array, *, reset=None, initial_state=None):
    """The recurrence: u [B, T, H] -> (y [B, T, H] fp32, final state complex [B, H, N/2])."""
    dta, b_bar, c = self.discretize()
    b = b_bar[None, None] * u.astype(jnp.float32)[..., None]  # [B, T, H, N/2] complex
    s, s_final = diagonal_recurrence(dta, b, initial_state=initial_state, reset=reset,
                                     chunk_size=self.cfg.chunk_size, impl=self.cfg.impl)
    y = 2.0 * jnp.einsum("bthn,hn->bth", s, c).real
    return y, s_final

  def _output(self, y_ssm: jax.Array, u: jax.Array) -> jax.Array:
    y = y_ssm + self.D[...].astype(jnp.float32) * u.astype(jnp.float32)
    y = jax.nn.gelu(y, approximate=False).astype(self.dtype)
    ag = self.out(y)  # [B, T, 2, D]
    return ag[:, :, 0] * jax.nn.sigmoid(ag[:, :, 1])

  # ---------------------------------------------------------------- contract
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, T, D]; segment_ids: [B, T] int or None -> [B, T, D]."""
    _check_x(x, self.d_model, "S4D")
    if segment_ids is None and self.cfg.parallel == "fft":
      y = self.ssm_fft(x)
    else:
      y, _ = self.ssm_scan(x, reset=segment_starts(segment_ids))
    return self._output(y, x)

  def init_state(self, batch: int, dtype=jnp.float32, *,
                 max_len: int | None = None) -> dict[str, jax.Array]:
    """Zero state ``{"ssm": [B, H, N/2, 2]}`` (complex modes as real/imag pairs)."""
    del max_len
    return {"ssm": jnp.zeros((batch, self.d_model, self.n_modes, 2), dtype)}

  def step(self, x: jax.Array, state: dict[str, jax.Array]):
    """x: [B, t, D] (t >= 1 tokens of one document per row) -> (y, new state)."""
    _check_x(x, self.d_model, "S4D")
    s = state["ssm"].astype(jnp.float32)
    s0 = jax.lax.complex(s[..., 0], s[..., 1])
    y, sf = self.ssm_scan(x, initial_state=s0)
    new = jnp.stack([sf.real, sf.imag], axis=-1).astype(state["ssm"].dtype)
    return self._output(y, x), {"ssm": new}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    """N real numbers (N/2 complex modes) per channel."""
    del max_len
    return batch * self.d_model * self.cfg.d_state


# ------------------------------------------------------------------------------ Mamba


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
    _check_dt_range(self.dt_min, self.dt_max)
    check(is_num(self.dt_init_floor) and self.dt_init_floor > 0, "dt_init_floor",
          f"must be a number > 0 (got {self.dt_init_floor!r})")
    check(is_num(self.dt_scale) and self.dt_scale > 0, "dt_scale",
          f"must be a number > 0 (got {self.dt_scale!r})")
    check(isinstance(self.conv_bias, bool), "conv_bias",
          f"must be True or False (got {self.conv_bias!r})")
    check(isinstance(self.bias, bool), "bias", f"must be True or False (got {self.bias!r})")
    check_pos_int(self.chunk_size, "chunk_size")
    _check_impl(self.impl)


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
    self.dt_proj = Linear(r, di, (None, "mlp"), init=_uniform(-std, std), **kw)
    self.dt_bias = param(rngs, dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
                         (di,), ("mlp",), param_dtype, tag="ssm")
    a_log = jnp.log(jnp.arange(1, n + 1, dtype=jnp.float32))
    self.A_log = param(rngs, _const(a_log), (di, n), ("mlp", "state"), param_dtype, tag="ssm")
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
    h, h_final = diagonal_recurrence(log_a, inp, initial_state=initial_state, reset=reset,
                                     chunk_size=self.cfg.chunk_size, impl=self.cfg.impl)
    y = jnp.einsum("btdn,btn->btd", h, c.astype(jnp.float32))
    y = y + self.D[...].astype(jnp.float32) * x32
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype)
    return self.out_proj(y), h_final

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, T, D]; segment_ids: [B, T] int or None -> [B, T, D]."""
    _check_x(x, self.d_model, "Mamba")
    y, _ = self._mix(x, lambda v: self.conv(v, segment_ids), reset=segment_starts(segment_ids))
    return y

  def init_state(self, batch: int, dtype=jnp.float32, *,
                 max_len: int | None = None) -> dict[str, jax.Array]:
    del max_len
    return {"conv": self.conv.init_state(batch, dtype),
            "ssm": jnp.zeros((batch, self.d_inner, self.cfg.d_state), dtype)}

  def step(self, x: jax.Array, state: dict[str, jax.Array]):
    """x: [B, t, D] (t >= 1 tokens of one document per row) -> (y, new state)."""
    _check_x(x, self.d_model, "Mamba")
    conv_state = {}

    def conv_fn(v):
      y, conv_state["new"] = self.conv.step(v, state["conv"])
      return y

    y, h = self._mix(x, conv_fn, initial_state=state["ssm"].astype(jnp.float32))
    return y, {"conv": conv_state["new"], "ssm": h.astype(state["ssm"].dtype)}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    return batch * self.d_inner * ((self.cfg.d_conv - 1) + self.cfg.d_state)


# ------------------------------------------------------------------------------ Mamba2


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
    _check_dt_range(self.dt_min, self.dt_max)
    check(is_num(self.dt_init_floor) and self.dt_init_floor > 0, "dt_init_floor",
          f"must be a number > 0 (got {self.dt_init_floor!r})")
    check(is_num(self.norm_eps) and self.norm_eps > 0, "norm_eps",
          f"must be a number > 0 (got {self.norm_eps!r})")
    check(isinstance(self.conv_bias, bool), "conv_bias",
          f"must be True or False (got {self.conv_bias!r})")
    check(isinstance(self.bias, bool), "bias", f"must be True or False (got {self.bias!r})")
    check_pos_int(self.chunk_size, "chunk_size")
    _check_impl(self.impl)
    if self.impl in ("auto", "pallas_tpu", "pallas_gpu"):
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
    _check_x(x, self.d_model, "Mamba2")
    y, _ = self._mix(x, lambda v: self.conv_x(v, segment_ids),
                     lambda v: self.conv_bc(v, segment_ids),
                     reset=segment_starts(segment_ids))
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
    _check_x(x, self.d_model, "Mamba2")
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
