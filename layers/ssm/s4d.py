"""S4D: diagonal state space model (Gu, Gupta, Goel & Re 2022, "On the Parameterization and
Initialization of Diagonal State Space Models"; state-spaces/s4 ``models/s4/s4d.py``, inits
in ``src/models/sequence/kernels/dplr.py``; the code is lcm's own).

H = d_model independent channels, each a complex diagonal SSM of N/2 modes (ZOH, ``B = 1``)::

    dtA = exp(log_dt) * A,   A = -exp(log_A_real) + i A_imag
    s_t = exp(dtA) s_{t-1} + (exp(dtA) - 1) / A * u_t,   y_t = 2 Re(sum_n C_n s_t,n) + D u_t

with ``A_imag`` from S4D-Lin (``pi n``) or S4D-Inv (``N/pi (N/(2n+1) - 1)``). Unpacked
training convolves with the materialised kernel by FFT; packed documents run the recurrence
through ``kernels.diag_scan.diagonal_recurrence`` with ``reset`` at document starts (the
state is zeroed there). ``impl="auto"`` follows that kernel's ``AUTO`` table (on CPU the
per-token reference scan; on TPU / GPU ``xla``, since the Pallas kernels are real-only and
S4D's scan is complex). Optimizer tag ``"ssm"`` on ``log_dt``, ``log_A_real``, ``A_imag``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kernels.common import PALLAS_IMPLS
from layers import context_parallel
from layers.context_parallel import primitives as cp_primitives
from layers.common import ConfigError, Linear, check, check_pos_int, doc_starts, param
from layers.ssm.common import check_dt_range, check_impl, check_x, const_init, uniform_init

S4D_INITS = ("lin", "inv")
S4D_PARALLEL = ("fft", "scan")


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
  impl: ``diagonal_recurrence`` implementation (complex inputs, so no Pallas: ``auto`` takes
    ``xla`` where its ``AUTO`` table names a Pallas kernel).
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
    check_dt_range(self.dt_min, self.dt_max)
    check(self.parallel in S4D_PARALLEL, "parallel",
          f"must be one of {', '.join(S4D_PARALLEL)} (got {self.parallel!r})")
    check_pos_int(self.chunk_size, "chunk_size")
    check_impl(self.impl)
    check(self.impl not in PALLAS_IMPLS, "impl",
          f"S4D's scan is complex-valued: use auto, xla or reference (got {self.impl!r})")


def s4d_imag_init(init: str, n_state: int) -> jax.Array:
  """Imaginary parts of S4D's diagonal A, [N/2] (dplr.py: ``lin`` and ``inv``)."""
  n = jnp.arange(n_state // 2, dtype=jnp.float32)
  if init == "lin":
    return math.pi * n
  if init == "inv":
    return n_state / math.pi * (n_state / (2 * n + 1) - 1)
  raise ConfigError("init", f"must be one of {', '.join(S4D_INITS)} (got {init!r})")


def _fft_causal_conv(u: jax.Array, k: jax.Array) -> jax.Array:
  """Causal convolution of u [B, T, H] with k [H, T] by FFT of length 2T -> [B, T, H] fp32."""
  t = u.shape[1]
  k_f = jnp.fft.rfft(k, n=2 * t, axis=-1)  # [H, T+1]
  u_f = jnp.fft.rfft(u.astype(jnp.float32), n=2 * t, axis=1)  # [B, T+1, H]
  return jnp.fft.irfft(u_f * k_f.T[None], n=2 * t, axis=1)[:, :t]


class S4D(nnx.Module):
  """Diagonal S4 (Gu et al. 2022): H = d_model independent complex diagonal SSMs.

  Per channel h (N/2 modes n, ZOH discretisation, ``B = 1`` as in s4d.py)::

      dtA = exp(log_dt) * A,   A = -exp(log_A_real) + i A_imag
      state:   s_t = exp(dtA) s_{t-1} + (exp(dtA) - 1) / A * u_t          (complex)
      output:  y_t = 2 Re(sum_n C_n s_t,n) + D u_t
      kernel:  K_l = 2 Re(sum_n C_n (exp(dtA) - 1) / A exp(dtA l)),   y = K * u + D u

  then GELU and a position-wise ``Linear(d, 2d)`` + GLU (as s4d.py's output_linear).

  Parallel form: the causal convolution with the materialised kernel by FFT (length 2T, so
  the circular convolution is the linear one). Over a ``sequence`` mesh axis (context
  parallelism) each shard convolves its tokens by FFT and adds the earlier shards' modes
  (``ssm_fft_split``); with segment ids the recurrence is split
  (``layers.context_parallel.diagonal_recurrence``).
  The FFT convolution cannot respect document
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
        rngs, uniform_init(math.log(cfg.dt_min), math.log(cfg.dt_max)), (h,), ("embed",),
        param_dtype, tag="ssm")
    self.log_A_real = param(rngs, const_init(math.log(0.5)), (h, n2), ("embed", "state"),
                            param_dtype, tag="ssm")
    self.A_imag = param(rngs, const_init(s4d_imag_init(cfg.init, cfg.d_state)), (h, n2),
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
    return _fft_causal_conv(u, self.kernel(u.shape[1]))

  def ssm_fft_split(self, u: jax.Array) -> jax.Array:
    """``ssm_fft`` over a ``sequence`` mesh axis (context parallelism): each shard
    convolves its own L tokens by FFT (a zero state at its start) and adds what the earlier
    shards leave in the modes. With ``P[h, n, l] = exp(l dtA)``:

        B_r = b_bar * sum_s P[L - 1 - s] u_s      shard's final state from zero
        log A_r = L dtA                           its decay (the same for every shard)
        h_in = exclusive prefix over shards       (``exclusive_affine_prefix``, complex)
        y_t += 2 Re sum_n C_n exp((t + 1) dtA_n) h_in,n

    so the layer never holds more than one shard's ``[H, N/2, L]`` powers (the unsplit FFT
    holds ``[H, N/2, T]``) and no per-token states."""
    dta, b_bar, c = self.discretize()
    mesh = context_parallel.sequence_mesh(u.shape[1])

    def body(ul, dta, b_bar, c):
      length = ul.shape[1]
      pows = jnp.exp(dta[..., None] * jnp.arange(length, dtype=jnp.float32))  # [H, N/2, L]
      y = _fft_causal_conv(ul, 2.0 * jnp.einsum("hn,hnl->hl", c * b_bar, pows).real)
      u32 = ul.astype(jnp.float32)
      b_r = b_bar * jnp.einsum("blh,hnl->bhn", u32.astype(pows.dtype), pows[..., ::-1])
      log_a = jnp.broadcast_to(length * dta, b_r.shape)
      h_in, _ = context_parallel.exclusive_affine_prefix(log_a, b_r)
      return y + 2.0 * jnp.einsum("bhn,hnl->blh", c * jnp.exp(dta) * h_in, pows).real

    time = cp_primitives.TIME
    return cp_primitives.shard_map(body, mesh, (time, P(), P(), P()), time,
                                   check_vma=False)(u, dta, b_bar, c)

  def ssm_scan(self, u: jax.Array, *, reset=None, initial_state=None):
    """The recurrence: u [B, T, H] -> (y [B, T, H] fp32, final state complex [B, H, N/2])."""
    dta, b_bar, c = self.discretize()
    b = b_bar[None, None] * u.astype(jnp.float32)[..., None]  # [B, T, H, N/2] complex
    s, s_final = context_parallel.diagonal_recurrence(
        dta, b, initial_state=initial_state, reset=reset, chunk_size=self.cfg.chunk_size,
        impl=self.cfg.impl)
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
    check_x(x, self.d_model, "S4D")
    if segment_ids is None and self.cfg.parallel == "fft":
      split = context_parallel.sequence_mesh(x.shape[1]) is not None
      y = self.ssm_fft_split(x) if split else self.ssm_fft(x)
    else:
      y, _ = self.ssm_scan(x, reset=doc_starts(segment_ids))
    return self._output(y, x)

  def init_state(self, batch: int, dtype=jnp.float32, *,
                 max_len: int | None = None) -> dict[str, jax.Array]:
    """Zero state ``{"ssm": [B, H, N/2, 2]}`` (complex modes as real/imag pairs)."""
    del max_len
    return {"ssm": jnp.zeros((batch, self.d_model, self.n_modes, 2), dtype)}

  def step(self, x: jax.Array, state: dict[str, jax.Array]):
    """x: [B, t, D] (t >= 1 tokens of one document per row) -> (y, new state)."""
    check_x(x, self.d_model, "S4D")
    s = state["ssm"].astype(jnp.float32)
    s0 = jax.lax.complex(s[..., 0], s[..., 1])
    y, sf = self.ssm_scan(x, initial_state=s0)
    new = jnp.stack([sf.real, sf.imag], axis=-1).astype(state["ssm"].dtype)
    return self._output(y, x), {"ssm": new}

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    """N real numbers (N/2 complex modes) per channel."""
    del max_len
    return batch * self.d_model * self.cfg.d_state


