"""lcm.registry: names, construction, and config errors that name the offending field."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from layers.attention import Attention
from layers.common import ConfigError
from lcm import registry


def test_names_and_get():
  names = registry.names()
  assert "attention" in names and "swa" in names
  assert len(set(names)) == len(names)
  assert registry.get("attention") is Attention
  assert registry.get("swa") is Attention


def test_config_fields_apply_registry_defaults():
  att = registry.config_fields("attention")
  swa = registry.config_fields("swa")
  assert set(att) == {"num_heads", "num_kv_heads", "head_dim", "rope_theta", "window", "max_len",
                      "block_size"}
  assert att["window"] is None and att["num_heads"] == 4
  assert swa["window"] == 64
  swa["window"] = 1  # a copy: the registry's table is not modified
  assert registry.config_fields("swa")["window"] == 64


def test_create():
  m = registry.create("swa", d_model=16, rngs=nnx.Rngs(0), num_heads=2, dtype=jnp.bfloat16)
  assert isinstance(m, Attention)
  assert m.cfg.window == 64 and m.num_heads == 2 and m.head_dim == 8
  assert m.dtype == jnp.bfloat16
  m = registry.create("swa", d_model=16, rngs=nnx.Rngs(0), window=3)
  assert m.cfg.window == 3
  m = registry.create("attention", d_model=16, rngs=nnx.Rngs(0))
  assert m.cfg.window is None
  assert m(jnp.ones((1, 3, 16))).shape == (1, 3, 16)


def test_unknown_name():
  with pytest.raises(ConfigError) as e:
    registry.create("nope", d_model=16, rngs=nnx.Rngs(0))
  assert e.value.field == "mixer"
  assert "'nope'" in str(e.value)
  for name in registry.names():
    assert name in str(e.value)
  with pytest.raises(ConfigError) as e:
    registry.get("nope")
  assert e.value.field == "mixer"
  with pytest.raises(ConfigError):
    registry.validate("nope", 16, {})


def test_unknown_override_key():
  with pytest.raises(ConfigError) as e:
    registry.create("attention", d_model=16, rngs=nnx.Rngs(0), n_heads=2)
  assert e.value.field == "n_heads"
  assert "num_heads" in str(e.value)  # lists the allowed fields
  with pytest.raises(ConfigError) as e:
    registry.validate("swa", 16, {"windw": 3}, prefix="model.mixers.swa.")
  assert e.value.field == "model.mixers.swa.windw"
  assert "'swa'" in str(e.value)


INVALID = [
    ({"num_heads": 0}, "num_heads"),
    ({"num_heads": 5}, "num_heads"),  # does not divide d_model=16
    ({"num_heads": 2.0}, "num_heads"),
    ({"num_kv_heads": 3}, "num_kv_heads"),  # does not divide num_heads=4
    ({"num_kv_heads": 0}, "num_kv_heads"),
    ({"head_dim": 0}, "head_dim"),
    ({"head_dim": 5}, "head_dim"),  # odd with RoPE on
    ({"num_heads": 2, "head_dim": None, "rope_theta": -1.0}, "rope_theta"),
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"window": 0}, "window"),
    ({"window": 2.5}, "window"),
    ({"max_len": 0}, "max_len"),
    ({"max_len": True}, "max_len"),
]


@pytest.mark.parametrize("overrides,field", INVALID)
def test_invalid_values_name_the_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    registry.validate("attention", 16, overrides, prefix="model.mixers.attention.")
  assert e.value.field == f"model.mixers.attention.{field}"
  assert str(e.value).startswith(f"model.mixers.attention.{field}: ")
  with pytest.raises(ConfigError) as e:
    registry.create("attention", d_model=16, rngs=nnx.Rngs(0), **overrides)
  assert e.value.field == field


def test_valid_values_pass():
  registry.validate("attention", 16, {"head_dim": 5, "rope_theta": 0})  # odd Dh without RoPE
  registry.validate("attention", 16, {"num_heads": 3, "head_dim": 8})  # head_dim decouples
  registry.validate("swa", 16, {"num_kv_heads": 1, "window": 1, "max_len": 1})


def test_error_message_names_allowed_values():
  with pytest.raises(ConfigError, match=r"num_heads: must divide d_model=16 \(got 5\)"):
    registry.validate("attention", 16, {"num_heads": 5})
  with pytest.raises(ConfigError) as e:
    registry.validate("attention", 0, {})
  assert e.value.field == "d_model"
