"""Helpers shared by the Titans mixers (:mod:`layers.neural_memory`): head-count validation,
config field copies, per-row selection of memory weights and the input-shape check."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kernels.neural_memory import Weights
from layers.common import check, check_pos_int

__all__ = ["check_x", "fields_of", "head_dim_of", "select_rows"]


def head_dim_of(d_model: int, heads: Any, field: str) -> int:
  """Validated head count ``heads`` (must divide ``d_model``) -> the head width."""
  check_pos_int(heads, field)
  check(d_model % heads == 0, field, f"must divide d_model={d_model} (got {heads})")
  return d_model // heads


def fields_of(cfg, cls):
  """An instance of the config dataclass ``cls`` with ``cfg``'s values of ``cls``'s fields
  (e.g. the memory's :class:`TitansLMMConfig` out of a MAC / MAG / MAL config)."""
  return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def select_rows(mask: jax.Array, a: Weights, b: Weights) -> Weights:
  """Per batch row: ``mask`` [B] -> a where True else b (weights [B, H, i, o])."""
  return tuple(jnp.where(mask[:, None, None, None], x, y) for x, y in zip(a, b))


def check_x(mixer, x: jax.Array) -> None:
  """Raise a ValueError unless x is ``[B, T, mixer.d_model]``."""
  if x.ndim != 3 or x.shape[-1] != mixer.d_model:
    raise ValueError(f"{type(mixer).__name__} expects x of shape [B, T, {mixer.d_model}], "
                     f"got {x.shape}")
