"""Pieces shared by the linear-attention mixers of this package.

The mixers are built on two scan kernels: ``kernels.chunked_scan.linear_recurrence``
(``S_t = diag(a_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``; linear attention, RetNet, GLA,
Based, JRT, called through :meth:`Mixer._scan`, which splits it over a ``sequence`` mesh
axis in context: ``layers.context_parallel``) and ``kernels.delta_rule.delta_rule``
(DeltaNet, Gated DeltaNet). Neither scales q implicitly: where fla's kernels apply their
default ``scale = Dk^-0.5`` (RetNet, GLA, DeltaNet, Gated DeltaNet) the layer multiplies q by
``Dk^-0.5`` itself.

Here: the config validators (head width, expanded widths, feature maps, kernel options),
:class:`Mixer` (input check, output projection ``[B, T, H, Dv] -> [B, T, D]``, kernel call),
:class:`QKVConv` (SiLU short convolutions on q, k, v) and :class:`MatrixStateMixer` (the
contract methods of the mixers with a ``[B, H, Dk, Dv]`` state, GLA and DeltaNet).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.chunked_scan import IMPLS
from layers import context_parallel
from layers import feature_maps as fm
from layers.common import ShortConv, check, dense_init, param
from layers.common import check_bool, check_pos_int, check_positive, is_num
from layers.common import doc_starts

__all__ = ["check_kernel_opts", "resolve_head_dim", "expanded_dim", "check_feature_map",
           "Mixer", "QKVConv", "MatrixStateMixer"]


# ----------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------


def check_kernel_opts(cfg) -> None:
  check_pos_int(cfg.chunk_size, "chunk_size")
  check(cfg.impl in IMPLS, "impl", f"must be one of {', '.join(IMPLS)} (got {cfg.impl!r})")


def resolve_head_dim(d_model: int, num_heads: int, head_dim: Any,
                     field: str = "head_dim") -> int:
  """Validated per-head width: ``head_dim`` or ``d_model // num_heads``."""
  check_pos_int(num_heads, "num_heads")
  if head_dim is None:
    check(d_model % num_heads == 0, "num_heads",
          f"must divide d_model={d_model} (got {num_heads}); or set {field} explicitly")
    return d_model // num_heads
  check_pos_int(head_dim, field)
  return head_dim


def expanded_dim(base: int, ratio: Any, field: str, what: str) -> int:
  """``base * ratio`` as an integer, or ConfigError(field)."""
  check(is_num(ratio) and ratio > 0, field, f"must be a finite number > 0 (got {ratio!r})")
  value = base * ratio
  check(abs(value - round(value)) < 1e-6 and round(value) >= 1, field,
        f"{what} = {base} * {ratio} = {value} must be a positive integer")
  return int(round(value))


def check_feature_map(cfg) -> None:
  check(cfg.feature_map in fm.FEATURE_MAPS, "feature_map",
        f"must be one of {', '.join(fm.FEATURE_MAPS)} (got {cfg.feature_map!r})")
  check_bool(cfg.taylor_upper, "taylor_upper")
  check_bool(cfg.normalize, "normalize")
  if cfg.normalize:
    check(cfg.feature_map in fm.POSITIVE_FEATURE_MAPS, "normalize",
          f"needs a positive feature map ({', '.join(fm.POSITIVE_FEATURE_MAPS)}); the "
          f"denominator phi(q).sum phi(k) of feature_map={cfg.feature_map!r} can be 0 or "
          "negative. Set normalize=False or change feature_map")
  check_positive(cfg.eps, "eps")


# ----------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------


class Mixer(nnx.Module):
  """Bits every mixer here shares: input checks, the output projection, the kernel call."""

  d_model: int
  dtype: Any

  def _check_x(self, x: jax.Array) -> None:
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"{type(self).__name__} expects x of shape [B, T, {self.d_model}], "
                       f"got {x.shape}")

  def _make_out(self, heads: int, dv: int, param_dtype, rngs: nnx.Rngs) -> None:
    self.out = param(rngs, dense_init(heads * dv), (heads, dv, self.d_model),
                     ("heads", "head_dim", "embed"), param_dtype)

  def _project_out(self, o: jax.Array) -> jax.Array:
    """[B, T, H, Dv] -> [B, T, D]."""
    return jnp.einsum("bthd,hde->bte", o.astype(self.dtype), self.out[...].astype(self.dtype))

  def _scan(self, q, k, v, log_decay, s0, reset):
    """The kernel, split over the ``sequence`` axis when the context mesh has one."""
    s0 = None if s0 is None else s0.astype(jnp.float32)
    return context_parallel.linear_recurrence(
        q, k, v, log_decay, initial_state=s0, reset=reset, chunk_size=self.cfg.chunk_size,
        impl=self.cfg.impl)


class QKVConv(nnx.Module):
  """Three SiLU short convolutions (q, k, v), with a step state per convolution."""

  def __init__(self, widths: tuple[int, int, int], size: int, *, use_bias: bool, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, axis_name="heads", dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.q = ShortConv(widths[0], size, **kw)
    self.k = ShortConv(widths[1], size, **kw)
    self.v = ShortConv(widths[2], size, **kw)

  def __call__(self, q, k, v, segment_ids=None, state=None):
    """q, k, v: [B, T, H, D] -> silu(conv(.)) of each, and the new conv states (or None)."""
    outs, new = [], {}
    for name, x in (("q", q), ("k", k), ("v", v)):
      conv = getattr(self, name)
      flat = x.reshape(x.shape[:2] + (-1,))
      if state is None:
        y = conv(flat, segment_ids)
      else:
        y, new[f"conv_{name}"] = conv.step(flat, state[f"conv_{name}"])
      outs.append(jax.nn.silu(y).reshape(x.shape))
    return (*outs, new if state is not None else None)

  def init_state(self, batch: int, dtype) -> dict[str, jax.Array]:
    return {f"conv_{n}": getattr(self, n).init_state(batch, dtype) for n in ("q", "k", "v")}

  def state_size(self, batch: int) -> int:
    return batch * (self.q.kernel_size - 1) * sum(
        getattr(self, n).channels for n in ("q", "k", "v"))


class MatrixStateMixer(Mixer):
  """The contract methods shared by GLA and DeltaNet: a [B, H, Dk, Dv] state ``S`` plus the
  optional short-convolution state. Subclasses define ``_core(x, segment_ids, reset,
  state) -> (y, final S, conv state)`` and ``num_heads``, ``head_dim``, ``value_dim``,
  ``conv``."""

  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    return self._core(x, segment_ids, doc_starts(segment_ids), None)[0]

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    state = {"S": jnp.zeros((batch, self.num_heads, self.head_dim, self.value_dim), dtype)}
    if self.conv is not None:
      state.update(self.conv.init_state(batch, dtype))
    return state

  def step(self, x: jax.Array, state):
    self._check_x(x)
    y, sf, conv_state = self._core(x, None, None, state)
    new = {"S": sf.astype(state["S"].dtype)}
    if conv_state is not None:
      new.update(conv_state)
    return y, new

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    n = batch * self.num_heads * self.head_dim * self.value_dim
    return n + (self.conv.state_size(batch) if self.conv is not None else 0)
