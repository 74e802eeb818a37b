"""Validation helpers shared by the Memory Caching and Mixture-of-Memories configs."""

from __future__ import annotations

from typing import Any

from kernels.chunked_scan import IMPLS
from layers.common import ConfigError, check, check_pos_int

__all__ = ["choice", "check_kernel_opts", "error_message"]


def choice(v: Any, allowed, field: str) -> None:
  """ConfigError(field) unless ``v`` is one of the strings ``allowed``."""
  check(isinstance(v, str) and v in allowed, field,
        f"must be one of {', '.join(map(repr, allowed))} (got {v!r})")


def check_kernel_opts(cfg) -> None:
  """The kernel options ``cfg.chunk_size`` (a positive int) and ``cfg.impl`` (one of IMPLS)."""
  check_pos_int(cfg.chunk_size, "chunk_size")
  choice(cfg.impl, IMPLS, "impl")


def error_message(e: ConfigError) -> str:
  """The message of ``e`` without its ``"field: "`` prefix."""
  text = str(e)
  return text[len(e.field) + 2:] if text.startswith(f"{e.field}: ") else text

