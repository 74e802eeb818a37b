"""What the state-space mixers (S4D, Mamba, Mamba2) share: config checks, initialisers and
the input-shape check. The dt-bias initialiser (``dt = exp(U[log dt_min, log dt_max])``
floored, stored as its inverse softplus) and the document starts that reset the scans
(``reset = first token of each document``) are ``layers.common.dt_bias_init`` /
``layers.common.doc_starts``, shared with the other recurrent mixers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kernels.common import IMPLS
from layers.common import check, is_num


def check_dt_range(dt_min: Any, dt_max: Any) -> None:
  check(is_num(dt_min) and dt_min > 0, "dt_min", f"must be a number > 0 (got {dt_min!r})")
  check(is_num(dt_max) and dt_max >= dt_min, "dt_max",
        f"must be a number >= dt_min={dt_min} (got {dt_max!r})")


def check_impl(impl: Any) -> None:
  check(impl in IMPLS, "impl", f"must be one of {', '.join(IMPLS)} (got {impl!r})")


def uniform_init(lo: float, hi: float):
  """``U[lo, hi)`` drawn in fp32, cast to the parameter dtype."""
  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, lo, hi).astype(dtype)
  return init


def const_init(value: jax.Array):
  """``value`` broadcast to the parameter shape (the key is unused)."""
  def init(key, shape, dtype):
    del key
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), shape).astype(dtype)
  return init


def check_x(x: jax.Array, d_model: int, name: str) -> None:
  """``x`` must be ``[B, T, d_model]``; ``name`` is the layer, for the message."""
  if x.ndim != 3 or x.shape[-1] != d_model:
    raise ValueError(f"{name} expects x of shape [B, T, {d_model}], got {x.shape}")
