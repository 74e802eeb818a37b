"""Config validation: every bad value fails before anything is built, naming its field."""

import dataclasses
import subprocess
import sys

import pytest

from configs import mqar
from layers.common import ConfigError
from lcm import config as config_lib
from lcm import registry


def _set(c, path, value):
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


# (field to set, bad value, field the error must name)
INVALID = [
    ("model.pattern", "nosuchmixer", "model.pattern"),
    ("model.pattern", "", "model.pattern"),
    ("model.pattern", "attention,bogus", "model.pattern"),
    ("model.d_model", 63, "model.mixers.attention.num_heads"),  # 63 % 2 heads
    ("model.d_model", 0, "model.d_model"),
    ("model.d_model", 32.5, "model.d_model"),
    ("model.num_layers", -1, "model.num_layers"),
    ("model.dtype", "float16", "model.dtype"),
    ("model.mlp_ratio", -1.0, "model.mlp_ratio"),
    ("model.mixers.attention.num_heads", 0, "model.mixers.attention.num_heads"),
    ("model.mixers.attention.num_kv_heads", 3, "model.mixers.attention.num_kv_heads"),
    ("model.mixers.attention.window", 0, "model.mixers.attention.window"),
    ("model.mixers.attention.rope_theta", -1.0, "model.mixers.attention.rope_theta"),
    ("model.mixers.attention.no_such_field", 1, "model.mixers.attention.no_such_field"),
    ("model.vocab_size", 16, "model.vocab_size"),  # smaller than data.vocab_size
    ("train.steps", -5, "train.steps"),
    ("train.steps", 0, "train.steps"),
    ("train.lr", -1e-3, "train.lr"),
    ("train.lr", float("nan"), "train.lr"),
    ("train.warmup_steps", 10_000, "train.warmup_steps"),
    ("train.weight_decay", -0.1, "train.weight_decay"),
    ("train.b2", 1.0, "train.b2"),
    ("train.grad_clip", -1.0, "train.grad_clip"),
    ("train.nan_policy", "ignore", "train.nan_policy"),
    ("train.checkpoint_every", 0, "train.checkpoint_every"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints"),
    ("train.param_groups.ssm.momentum", 0.9, "train.param_groups.ssm.momentum"),
    ("data.task", "imagenet", "data.task"),
    ("data.batch_size", 0, "data.batch_size"),
    ("data.seq_len", 8, "data.seq_len"),  # too short for 4 kv pairs and their queries
    ("data.num_kv_pairs", 0, "data.num_kv_pairs"),
    ("data.vocab_size", 6, "data.vocab_size"),  # cannot hold 4 distinct keys and values
    ("data.power_a", 0.0, "data.power_a"),
    ("eval.num_examples", 1000, "eval.num_examples"),  # not a multiple of eval.batch_size
    ("eval.seed", 0, "eval.seed"),  # equals the training seed: not held out
    ("mesh.tensor", 0, "mesh.tensor"),
    ("mesh.data", -2, "mesh.data"),
    ("mesh.sequence", 0, "mesh.sequence"),
    ("mesh.sequence", -1, "mesh.sequence"),  # -1 (the remaining devices) is for data / fsdp
    ("mesh.sequence", 3, "data.seq_len"),  # 3 does not divide seq_len 64
    ("seed", -1, "seed"),
]


@pytest.mark.parametrize("path,value,field", INVALID, ids=[f"{p}={v!r}" for p, v, _ in INVALID])
def test_invalid_config_names_field(path, value, field):
  c = mqar.get_config("attention")
  _set(c, path, value)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=1)
  assert e.value.field == field, str(e.value)
  assert str(e.value).startswith(field + ":")


def test_mesh_and_batch_checked_against_devices():
  c = mqar.get_config("attention")
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=4)
  assert e.value.field == "mesh"
  c.data.batch_size = 6  # not divisible by data*fsdp = 4
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  assert e.value.field == "data.batch_size"


def test_tensor_axis_larger_than_a_derived_head_count_is_an_error():
  """mamba2's heads are expand * d_model / head_dim (not a field): mesh.tensor above that
  count would replicate its heads silently."""
  c = mqar.get_config("mamba2")
  c.model.d_model, c.mesh.tensor = 32, 2
  c.model.mixers.mamba2 = {"head_dim": 64}  # 2 * 32 / 64 = 1 head
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  assert e.value.field == "mesh.tensor" and "head_dim = 1" in str(e.value)
  c.model.mixers.mamba2 = {"head_dim": 16}  # 4 heads
  config_lib.validate(c, num_devices=8)


def test_default_configs_are_valid():
  config_lib.validate(mqar.get_config("attention"), num_devices=1)
  config_lib.validate(mqar.get_config("swa"), num_devices=1)
  config_lib.validate(mqar.get_config("swa,attention"), num_devices=1)


def test_cli_reports_config_error_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=configs/mqar.py:nosuchmixer",
       f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "model.pattern" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@dataclasses.dataclass(frozen=True)
class _BlockyConfig:
  block_size: int = 16

  def validate(self, d_model):
    del d_model

  def validate_seq_len(self, seq_len):
    if seq_len % self.block_size:
      raise ConfigError("seq_len", f"must be a multiple of block_size={self.block_size}")


class Blocky:  # a stand-in mixer whose block size must divide the training length
  Config = _BlockyConfig


@pytest.fixture
def blocky():
  registry.register("blocky", __name__, "Blocky")
  yield
  registry.unregister("blocky")


def test_seq_len_must_fit_a_mixers_block_size(blocky):
  del blocky
  c = mqar.get_config("blocky")
  c.data.seq_len = 64
  config_lib.validate(c, num_devices=1)
  c.data.seq_len = 72
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=1)
  assert e.value.field == "data.seq_len" and "block_size=16" in str(e.value)


def test_register_refuses_a_taken_name_and_builtin_removal():
  with pytest.raises(ConfigError, match="already registered"):
    registry.register("attention", __name__, "Blocky")
  with pytest.raises(ConfigError, match="built in"):
    registry.unregister("attention")


@pytest.mark.parametrize("name", registry.names())
def test_every_mixer_has_a_valid_mqar_config(name):
  c = mqar.get_config(name)
  config_lib.validate(c, num_devices=1)
  assert c.model.pattern == name
