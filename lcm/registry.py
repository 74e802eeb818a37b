"""Mixer registry: name -> layer class. The only place in lcm that knows every layer.

Every registered class follows the mixer contract (docs/design.md) and is built the same way::

    cls.Config                 a frozen dataclass of hyper-parameters with defaults,
    cls.Config.validate(d_model)   raises layers.common.ConfigError(field, message),
    cls(d_model, cfg, *, dtype, param_dtype, rngs)

Layer modules are imported lazily (``importlib``) the first time a name is used, so adding a
layer family is one line in ``_TABLE``: ``name: (module path, class name, default overrides)``.
The default overrides give one class several registered names (``swa`` is ``attention`` with a
window).

    from lcm import registry
    registry.names()                                    # ['attention', 'swa', ...]
    mixer = registry.create("swa", d_model=64, rngs=nnx.Rngs(0), window=128)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from layers.common import ConfigError

# name -> (module, class, default overrides of the class's Config)
_TABLE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "attention": ("layers.attention", "Attention", {}),
    "swa": ("layers.attention", "Attention", {"window": 64}),
    "landmark": ("layers.landmark", "Landmark", {}),
    "s4d": ("layers.ssm.s4d", "S4D", {}),
    "mamba": ("layers.ssm.mamba", "Mamba", {}),
    "mamba2": ("layers.ssm.mamba2", "Mamba2", {}),
    "linear_attention": ("layers.linear_attention.linear_attention", "LinearAttention", {}),
    "retnet": ("layers.linear_attention.retnet", "RetNet", {}),
    "gla": ("layers.linear_attention.gla", "GLA", {}),
    "deltanet": ("layers.linear_attention.deltanet", "DeltaNet", {}),
    "gated_deltanet": ("layers.linear_attention.deltanet", "GatedDeltaNet", {}),
    "based": ("layers.linear_attention.based", "Based", {}),
    "jrt": ("layers.linear_attention.jrt", "JRT", {}),
    "rwkv7": ("layers.linear_attention", "RWKV7", {}),
    "titans_lmm": ("layers.neural_memory.lmm", "TitansLMM", {}),
    "titans_mac": ("layers.neural_memory.mac", "TitansMAC", {}),
    "titans_mag": ("layers.neural_memory.window", "TitansMAG", {}),
    "titans_mal": ("layers.neural_memory.window", "TitansMAL", {}),
    "memory_caching": ("layers.memory_mixtures.memory_caching", "MemoryCaching", {}),
    "mom": ("layers.memory_mixtures.mom", "MoM", {}),
}
_BUILTIN = frozenset(_TABLE)


def register(name: str, module: str, class_name: str,
             defaults: Mapping[str, Any] | None = None) -> None:
  """Adds a mixer under ``name`` (e.g. one defined outside lcm, or a test's stand-in).

  ``module`` is imported lazily like the built-in entries; an existing name is an error.
  """
  if not isinstance(name, str) or not name:
    raise ConfigError("mixer", f"must be a non-empty string (got {name!r})")
  if name in _TABLE:
    raise ConfigError("mixer", f"{name!r} is already registered")
  _TABLE[name] = (module, class_name, dict(defaults or {}))


def unregister(name: str) -> None:
  """Removes a name added with ``register`` (built-in names may not be removed)."""
  if name in _BUILTIN:
    raise ConfigError("mixer", f"{name!r} is built in and cannot be unregistered")
  _TABLE.pop(name, None)


def names() -> list[str]:
  """All registered mixer names, in registration order."""
  return list(_TABLE)


def _entry(name: str) -> tuple[str, str, dict[str, Any]]:
  if not isinstance(name, str) or name not in _TABLE:
    raise ConfigError("mixer", f"unknown mixer {name!r}; choose one of: {', '.join(names())}")
  return _TABLE[name]


def get(name: str) -> type:
  """The layer class registered as ``name``."""
  module, cls_name, _ = _entry(name)
  return getattr(importlib.import_module(module), cls_name)


def _config_defaults(name: str) -> dict[str, Any]:
  _, _, defaults = _entry(name)
  cls = get(name)
  base = {f.name: getattr(cls.Config(), f.name) for f in dataclasses.fields(cls.Config)}
  base.update(defaults)
  return base


def config_fields(name: str) -> dict[str, Any]:
  """The mixer's Config fields and their defaults (after this registry's per-name defaults)."""
  return dict(_config_defaults(name))


def _build_config(name: str, d_model: int, overrides: Mapping[str, Any], prefix: str):
  cls = get(name)
  fields = _config_defaults(name)
  for key in overrides:
    if key not in fields:
      raise ConfigError(f"{prefix}{key}", f"unknown field for mixer '{name}'; allowed: "
                        f"{', '.join(fields)}")
  cfg = cls.Config(**{**fields, **dict(overrides)})
  try:
    cfg.validate(d_model)
  except ConfigError as e:
    # Prefix the mixer's own fields; anything else (d_model) is named as the layer named it.
    field = f"{prefix}{e.field}" if e.field in fields else e.field
    message = str(e)[len(e.field) + 2:] if str(e).startswith(f"{e.field}: ") else str(e)
    raise ConfigError(field, message) from None
  return cls, cfg


def config(name: str, d_model: int, overrides: Mapping[str, Any], *, prefix: str = ""):
  """The mixer's validated Config (defaults updated by ``overrides``)."""
  return _build_config(name, d_model, overrides, prefix)[1]


def validate(name: str, d_model: int, overrides: Mapping[str, Any], *, prefix: str = "",
             seq_len: int | None = None) -> None:
  """Checks a mixer name, its override keys and values without building anything.

  Unknown name -> ConfigError("mixer", ...); unknown override key -> ConfigError(prefix + key,
  ...); a bad value -> the Config's own error with its field prefixed by ``prefix``.
  A Config that constrains the training length (a block or chunk size that must divide it)
  defines ``validate_seq_len(seq_len)``, raising ConfigError("seq_len", ...); it is called
  when ``seq_len`` is given, and its error names ``data.seq_len``.
  """
  _, cfg = _build_config(name, d_model, overrides, prefix)
  if seq_len is not None and hasattr(cfg, "validate_seq_len"):
    try:
      cfg.validate_seq_len(seq_len)
    except ConfigError as e:
      message = str(e)[len(e.field) + 2:] if str(e).startswith(f"{e.field}: ") else str(e)
      raise ConfigError("data.seq_len", f"{message} (mixer '{name}')") from None


def create(name: str, *, d_model: int, rngs: nnx.Rngs, dtype=jnp.float32,
           param_dtype=jnp.float32, **overrides: Any) -> nnx.Module:
  """Builds mixer ``name`` with its defaults, updated by ``overrides`` (its Config fields)."""
  cls, cfg = _build_config(name, d_model, overrides, "")
  return cls(d_model, cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
