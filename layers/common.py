"""Pieces shared by several layer families: errors, parameters, norms, MLP, positions.

Conventions every layer follows:
  * Parameters are created with :func:`param`, which records *logical* axis names
    (``out_sharding`` metadata, never mesh axis names) and an optional optimizer tag
    (``optim_tag``: ``"no_decay"``, ``"ssm"``, ...) that ``lcm.train`` reads.
  * Logical axis names: ``batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab,
    state, conv, layers``. The one table mapping them to mesh axes is in ``lcm/sharding.py``.
  * Parameters live in ``param_dtype`` (fp32); compute happens in ``dtype``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from layers import context_parallel

Initializer = Callable[..., jax.Array]


class ConfigError(ValueError):
  """A bad configuration value. ``field`` is the dotted name of the offending field."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"{field}: {message}")


def check(cond: bool, field: str, message: str) -> None:
  """Raises ConfigError(field, message) unless cond."""
  if not cond:
    raise ConfigError(field, message)


# Validators shared by the layer configs' ``validate`` methods (each names its field).


def is_int(v: Any) -> bool:
  """An int that is not a bool."""
  return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
  """A finite int or float that is not a bool."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_pos_int(v: Any, field: str) -> None:
  check(is_int(v) and v >= 1, field, f"must be a positive integer (got {v!r})")


def check_bool(v: Any, field: str) -> None:
  check(isinstance(v, bool), field, f"must be True or False (got {v!r})")


def check_positive(v: Any, field: str) -> None:
  check(is_num(v) and v > 0, field, f"must be a finite number > 0 (got {v!r})")


def check_finite(v: Any, field: str) -> None:
  check(is_num(v), field, f"must be a finite number (got {v!r})")


def check_d_model(d_model: Any) -> None:
  check_pos_int(d_model, "d_model")


def param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: Any = jnp.float32,
    tag: str | None = None,
) -> nnx.Param:
  """An nnx.Param with logical axis names and an optional optimizer tag."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  value = init(rngs.params(), tuple(shape), dtype)
  meta: dict[str, Any] = {"out_sharding": tuple(axes), "eager_sharding": False}
  if tag is not None:
    meta["optim_tag"] = tag
  return nnx.Param(value, **meta)


def dense_init(fan_in: int) -> Initializer:
  """Truncated-normal-ish init with std 1/sqrt(fan_in) (LeCun normal)."""
  std = fan_in ** -0.5

  def init(key, shape, dtype):
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)

  return init


def ones_init(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def zeros_init(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x [..., d_in] @ w [d_in, *out] -> [..., *out]`` (a ``tensordot``), with a backward
  written as the two plain matmuls ``dx = dy w^T`` and ``dw = x^T dy`` (contracting over
  every leading axis of ``x`` and ``dy``).

  Same values as autodiff of the ``tensordot`` (up to summation order); the reason is
  XLA:CPU. Autodiff's weight gradient is ``dot(dy, x)`` over the token axes followed by a
  transpose; XLA:CPU folds that transpose into the operands and writes the whole
  ``[tokens, out]`` cotangent transposed (a strided copy as large as an activation) before
  the dot. Written as ``x^T dy`` (or ``(dy^T x)^T``), XLA:CPU copies only one operand
  transposed, and the form is chosen so that it is the narrower of ``x`` and ``dy``.
  Measured in one process (session 11, fwd+bwd of ``silu(u W_z) * tanh(u W_x)``, u
  ``[1, 4096, 256]``, W ``[256, 512]`` each): 62 -> 30 ms; the Mamba2 layer: 155 -> 136 ms.
  The forward is the plain ``tensordot``; forward-mode autodiff (``jax.jvp``) of a Linear
  is not available (nothing in lcm uses it).
  """
  return jnp.tensordot(x, w, axes=((x.ndim - 1,), (0,)))


def _dense_fwd(x, w):
  return dense(x, w), (x, w)


def _dense_bwd(res, dy):
  x, w = res
  lead, out = x.ndim - 1, w.ndim - 1
  tokens = tuple(range(lead))
  if x.shape[-1] <= math.prod(w.shape[1:]):  # d_in <= d_out: XLA:CPU transposes x
    dw = jnp.tensordot(x, dy, axes=(tokens, tokens))
  else:  # the narrower dy is transposed (e.g. the out projection of a wider layer)
    dw = jnp.moveaxis(jnp.tensordot(dy, x, axes=(tokens, tokens)), -1, 0)
  dx = jnp.tensordot(dy, w, axes=(tuple(range(lead, lead + out)), tuple(range(1, 1 + out))))
  return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Module):
  """y = x @ W (+ b). ``axes`` names the kernel's (in, out...) axes; out may be multi-dim.

  The matmul is :func:`dense` (a backward that XLA:CPU runs without transposed copies).
  :meth:`parts` splits the first output axis into separate matmuls.
  """

  def __init__(self, d_in: int, out_shape: int | Sequence[int], axes: Sequence[str | None], *,
               use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               init: Initializer | None = None, rngs: nnx.Rngs):
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
    self.out_shape = out_shape
    self.dtype = dtype
    self.kernel = param(rngs, init or dense_init(d_in), (d_in, *out_shape), axes, param_dtype)
    self.bias = (param(rngs, zeros_init, out_shape, axes[1:], param_dtype, tag="no_decay")
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def parts(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """``tuple(self(x)[..., i, ...] for i in range(out_shape[0]))``, each part its own
    matmul with its slice of the kernel. Slicing one matmul's output instead makes the
    backward assemble the parts' cotangents into one ``[..., *out]`` array (a padded copy
    per part, then a sum) before the weight gradient; here only the small weight
    gradients are stacked. Mamba2's ``z | x`` projection: 6 ms less of ~130 (session 11)."""
    w = self.kernel[...].astype(self.dtype)
    b = None if self.bias is None else self.bias[...].astype(self.dtype)
    x = x.astype(self.dtype)
    return tuple(dense(x, w[:, i]) + (0 if b is None else b[i])
                 for i in range(self.out_shape[0]))


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis, computed in fp32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str = "embed",
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, ones_init, (dim,), (axis_name,), param_dtype, tag="no_decay")

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class SwiGLU(nnx.Module):
  """out(silu(x W_gate) * x W_up)."""

  def __init__(self, d_model: int, d_ff: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Linear(d_model, d_ff, ("embed", "mlp"), **kw)
    self.up = Linear(d_model, d_ff, ("embed", "mlp"), **kw)
    self.down = Linear(d_ff, d_model, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def segment_positions(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
  """Position of each token inside its document: [B, T] int32, restarting at 0 where the
  segment id changes. With no segment ids, 0..T-1."""
  idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  if segment_ids is None:
    return idx
  start = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - first


def _uniform_init(bound: float) -> Initializer:
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


def _conv_window(xp: jax.Array, sp: jax.Array | None, segment_ids: jax.Array | None,
                 w: jax.Array, b: jax.Array | None) -> jax.Array:
  """Causal depthwise taps ``w [K, C]`` over ``xp [B, T + K - 1, C]`` (K-1 history tokens
  first) -> [B, T, C]; with segment ids (``sp`` those of ``xp``), tap i (lag K-1-i) only
  sees tokens of the same document."""
  k = w.shape[0]
  t = xp.shape[1] - (k - 1)
  y = 0
  for i in range(k):
    tap = xp[:, i:i + t]
    if segment_ids is not None:
      tap = jnp.where((sp[:, i:i + t] == segment_ids)[..., None], tap, 0)
    y = y + tap * w[i]
  return y if b is None else y + b


class ShortConv(nnx.Module):
  """Causal depthwise 1-D convolution of width ``kernel_size`` over time (Mamba's conv1d,
  the short convolutions of DeltaNet / Based / GLA layers).

  y_t[c] = sum_{j=0}^{K-1} w[K-1-j, c] * x_{t-j}[c] (+ b[c]). With ``segment_ids`` no tap
  reaches into a previous document. ``step`` keeps the last K-1 inputs as its state, so
  parallel and step forms agree exactly. Init as PyTorch's depthwise Conv1d
  (U(-1/sqrt(K), 1/sqrt(K)), fan-in = K).
  """

  def __init__(self, channels: int, kernel_size: int = 4, *, use_bias: bool = True,
               axis_name: str = "mlp", dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.kernel_size = kernel_size
    self.channels = channels
    self.dtype = dtype
    bound = kernel_size ** -0.5
    self.kernel = param(rngs, _uniform_init(bound), (kernel_size, channels),
                        ("conv", axis_name), param_dtype)
    self.bias = (param(rngs, _uniform_init(bound), (channels,), (axis_name,), param_dtype,
                       tag="no_decay") if use_bias else None)

  def _taps(self, window: jax.Array) -> jax.Array:
    """window: [B, T + K - 1, C] (K-1 history tokens first) -> [B, T, C]."""
    b = None if self.bias is None else self.bias[...].astype(self.dtype)
    return _conv_window(window, None, None, self.kernel[...].astype(self.dtype), b)

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """x: [B, T, C]. The K-1 tokens before each one come from zero padding, or, with a
    ``sequence`` mesh in context, as a halo from the previous shard
    (``layers.context_parallel.with_history``)."""
    w = self.kernel[...].astype(self.dtype)
    b = None if self.bias is None else self.bias[...].astype(self.dtype)
    return context_parallel.with_history(_conv_window, x.astype(self.dtype), segment_ids,
                                         self.kernel_size - 1, w, b)

  def init_state(self, batch: int, dtype=jnp.float32) -> jax.Array:
    return jnp.zeros((batch, self.kernel_size - 1, self.channels), dtype)

  def step(self, x: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [B, t, C]; state: the previous K-1 inputs [B, K-1, C]."""
    window = jnp.concatenate([state.astype(self.dtype), x.astype(self.dtype)], axis=1)
    y = self._taps(window)
    return y, window[:, window.shape[1] - (self.kernel_size - 1):].astype(state.dtype)


class GatedRMSNorm(nnx.Module):
  """RMSNorm with a SiLU gate (Mamba2's and FLA's gated norm), in fp32.

  ``norm_before_gate=True``: rmsnorm(x) * silu(z) (FLA ``FusedRMSNormGated``);
  ``False``: rmsnorm(x * silu(z)) (Mamba2's default). Normalises over the last axis:
  reshape to [..., heads, head_dim] first for a per-head (grouped) norm.
  """

  def __init__(self, dim: int, *, eps: float = 1e-5, norm_before_gate: bool = True,
               axis_name: str | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.eps = eps
    self.norm_before_gate = norm_before_gate
    self.dtype = dtype
    self.scale = param(rngs, ones_init, (dim,), (axis_name,), param_dtype, tag="no_decay")

  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    x32, g = x.astype(jnp.float32), jax.nn.silu(z.astype(jnp.float32))
    if not self.norm_before_gate:
      x32 = x32 * g
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.norm_before_gate:
      y = y * g
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


# ----------------------------------------------------------------------------------
# Helpers shared by the recurrent mixers (linear attention, delta rule, memory mixtures)
# ----------------------------------------------------------------------------------


def doc_starts(segment_ids: jax.Array | None) -> jax.Array | None:
  """[B, T] bool, True at the first token of every document (and at t = 0)."""
  if segment_ids is None:
    return None
  b = segment_ids.shape[0]
  return jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum x^2 + eps) over the last axis, in fp32 (fla's l2norm)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)

def append_ones(v: jax.Array) -> jax.Array:
  """[..., Dv] -> [..., Dv + 1]: the extra column accumulates the normaliser sum phi(k)."""
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)

def normalise(o: jax.Array, eps: float) -> jax.Array:
  """[..., Dv + 1] (numerator, denominator) -> numerator / (denominator + eps), fp32."""
  o = o.astype(jnp.float32)
  return o[..., :-1] / (o[..., -1:] + eps)

def a_log_init(a_max: float):
  """log A with A ~ U(0, a_max] (fla: ``A.uniform_(0, 16)``; 0 itself excluded so that
  log A is finite)."""

  def init(key, shape, dtype):
    a = a_max * (1.0 - jax.random.uniform(key, shape, jnp.float32))  # (0, a_max]
    return jnp.log(a).astype(dtype)

  return init

def dt_bias_init(dt_min: float, dt_max: float, floor: float):
  """Inverse softplus of dt = exp(U[log dt_min, log dt_max]) floored at ``floor`` (Mamba)."""

  def init(key, shape, dtype):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init
