"""Tests for lcm.data: the MQAR task and the grain pipelines."""

from __future__ import annotations

import types

import ml_collections
import numpy as np
import pytest

from layers.common import ConfigError
from lcm.data import (
    MQARConfig,
    eval_batches,
    eval_seed,
    mqar_example,
    task_example_fn,
    train_dataset,
    train_iterator,
)

SMALL = dict(vocab_size=64, seq_len=32, num_kv_pairs=4)


def data_cfg(**overrides):
  cfg = ml_collections.ConfigDict(
      dict(task="mqar", vocab_size=64, seq_len=32, num_kv_pairs=4, power_a=0.01,
           random_non_queries=True))
  cfg.update(overrides)
  return cfg


def parse(ex, vocab_size, num_kv_pairs):
  """Splits an example into (keys, values, query positions) by reading its context."""
  n = num_kv_pairs
  inputs = ex["inputs"]
  keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
  qpos = np.flatnonzero(ex["loss_mask"])
  return keys, values, qpos


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------- task


def test_example_dtypes_and_shapes():
  ex = mqar_example(0, seed=0, **SMALL)
  assert set(ex) == {"inputs", "targets", "loss_mask"}
  for k, dt in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32)]:
    assert ex[k].dtype == dt and ex[k].shape == (32,), k


def test_deterministic_by_seed_and_index():
  a = mqar_example(7, seed=3, **SMALL)
  b = mqar_example(7, seed=3, **SMALL)
  assert_batches_equal(a, b)
  other_seed = mqar_example(7, seed=4, **SMALL)
  other_index = mqar_example(8, seed=3, **SMALL)
  assert not np.array_equal(a["inputs"], other_seed["inputs"])
  assert not np.array_equal(a["inputs"], other_index["inputs"])
  # Through the config-built function too, and over a whole batch of seeds.
  fn = task_example_fn(data_cfg())
  assert_batches_equal(fn(3, 7), a)
  rows0 = np.stack([fn(0, i)["inputs"] for i in range(16)])
  rows1 = np.stack([fn(1, i)["inputs"] for i in range(16)])
  assert not (rows0 == rows1).all(axis=1).any()


@pytest.mark.parametrize("vocab_size,seq_len,n,a", [
    (64, 32, 4, 0.01),
    (8192, 64, 4, 0.01),   # Zoology's defaults
    (10, 16, 4, 1.0),      # smallest vocab (2N+2) and shortest sequence (4N): every slot used
    (300, 128, 16, 0.5),
])
def test_structure_and_answers(vocab_size, seq_len, n, a):
  half = vocab_size // 2
  for index in range(40):
    ex = mqar_example(index, seed=11, vocab_size=vocab_size, seq_len=seq_len,
                      num_kv_pairs=n, power_a=a)
    keys, values, qpos = parse(ex, vocab_size, n)
    assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
    assert ((keys >= 1) & (keys < half)).all()
    assert ((values >= half) & (values < vocab_size)).all()
    assert ((ex["inputs"] >= 0) & (ex["inputs"] < vocab_size)).all()
    assert ((ex["targets"] >= 0) & (ex["targets"] < vocab_size)).all()
    # Exactly N answer positions, all after the context, on the even query slots.
    assert ex["loss_mask"].sum() == n and set(np.unique(ex["loss_mask"])) <= {0.0, 1.0}
    assert (qpos >= 2 * n).all() and ((qpos - 2 * n) % 2 == 0).all()
    # Each key is queried exactly once and the target there is its paired value.
    kv = dict(zip(keys.tolist(), values.tolist()))
    queried = ex["inputs"][qpos]
    assert sorted(queried.tolist()) == sorted(keys.tolist())
    for p, k in zip(qpos, queried):
      assert ex["targets"][p] == kv[int(k)]
    # Elsewhere the target is the next input token (next-token alignment, full[1:]).
    other = np.setdiff1d(np.arange(seq_len - 1), qpos)
    np.testing.assert_array_equal(ex["targets"][other], ex["inputs"][other + 1])


def test_non_queries_zero_or_random():
  n = 4
  filled = zeros = 0
  for index in range(20):
    ex0 = mqar_example(index, seed=0, random_non_queries=False, **SMALL)
    ex1 = mqar_example(index, seed=0, random_non_queries=True, **SMALL)
    qpos = np.flatnonzero(ex0["loss_mask"])
    filler = np.ones(32, bool)
    filler[:2 * n] = False
    filler[qpos] = False
    assert (ex0["inputs"][filler] == 0).all()
    assert (ex0["inputs"][~filler] != 0).all()
    # As in Zoology, the value is not written after the query: the next input is filler.
    assert (qpos + 1 < 32).all() and (ex0["inputs"][qpos + 1] == 0).all()
    zeros += (ex1["inputs"][filler] == 0).sum()
    filled += filler.sum()
  assert zeros < 0.1 * filled  # random tokens from [0, 64): ~1/64 are zero


def test_power_law_clusters_queries_near_context():
  def mean_gap(a):
    gaps = []
    for index in range(300):
      ex = mqar_example(index, seed=5, vocab_size=256, seq_len=128, num_kv_pairs=4, power_a=a)
      gaps.extend(((np.flatnonzero(ex["loss_mask"]) - 8) // 2).tolist())
    return np.mean(gaps)

  space = (128 - 8) // 2
  uniform = (space - 1) / 2  # mean gap of uniform placement without replacement
  assert mean_gap(0.01) < 0.6 * uniform
  assert abs(mean_gap(1.0) - uniform) < 0.15 * uniform  # power_a = 1 is uniform


# ---------------------------------------------------------------------------- config


def test_config_defaults_match_zoology():
  cfg = MQARConfig()
  assert (cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs, cfg.power_a, cfg.random_non_queries) \
      == (8192, 64, 4, 0.01, True)
  assert cfg.validate() is cfg
  assert_batches_equal(cfg.example(3, seed=1),
                       mqar_example(3, seed=1, vocab_size=8192, seq_len=64, num_kv_pairs=4))


@pytest.mark.parametrize("kwargs,field", [
    (dict(vocab_size=9, num_kv_pairs=4), "data.vocab_size"),   # needs >= 2N+2 = 10
    (dict(vocab_size=0), "data.vocab_size"),
    (dict(seq_len=15, num_kv_pairs=4), "data.seq_len"),        # needs >= 4N = 16
    (dict(seq_len=17, num_kv_pairs=4), "data.seq_len"),        # must be even (Zoology)
    (dict(num_kv_pairs=0), "data.num_kv_pairs"),
    (dict(num_kv_pairs=-1), "data.num_kv_pairs"),
    (dict(power_a=0.0), "data.power_a"),
    (dict(power_a=1.5), "data.power_a"),
    (dict(random_non_queries=1), "data.random_non_queries"),
])
def test_config_validation_names_field(kwargs, field):
  with pytest.raises(ConfigError) as e:
    MQARConfig(**kwargs).validate()
  assert e.value.field == field
  # The same error from the pipeline entry point (a plain attribute object: ConfigDict
  # would itself refuse some of these types).
  fields = dict(task="mqar", vocab_size=8192, seq_len=64)
  with pytest.raises(ConfigError) as e:
    task_example_fn(types.SimpleNamespace(**{**fields, **kwargs}))
  assert e.value.field == field


def test_config_boundaries_are_valid():
  MQARConfig(vocab_size=10, seq_len=16, num_kv_pairs=4, power_a=1.0).validate()


def test_unknown_task_and_attribute_config():
  with pytest.raises(ConfigError, match="choose one of: mqar") as e:
    task_example_fn(data_cfg(task="copy"))
  assert e.value.field == "data.task"
  # Any attribute object works; missing fields take the MQAR defaults.
  fn = task_example_fn(types.SimpleNamespace(task="mqar", seq_len=32))
  assert_batches_equal(fn(2, 9), mqar_example(9, seed=2, vocab_size=8192, seq_len=32,
                                              num_kv_pairs=4))


# ---------------------------------------------------------------------------- pipeline


def test_train_batches_are_examples_by_global_index():
  cfg = data_cfg()
  it = train_iterator(cfg, seed=3, global_batch_size=4)
  fn = task_example_fn(cfg)
  for step in range(3):
    batch = next(it)
    assert batch["inputs"].shape == (4, 32) and batch["inputs"].dtype == np.int32
    assert batch["targets"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    for row in range(4):
      ex = fn(3, step * 4 + row)
      for k in ex:
        np.testing.assert_array_equal(batch[k][row], ex[k])


def test_iterator_state_round_trip():
  cfg = data_cfg()
  it = train_iterator(cfg, seed=1, global_batch_size=4)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  fresh = train_iterator(cfg, seed=1, global_batch_size=4)
  fresh.set_state(state)
  for want in expected:
    assert_batches_equal(next(fresh), want)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_sharding_reproduces_global_batch(process_count):
  # Layout: contiguous blocks. Process p gets rows p*b .. p*b+b-1 of each global batch,
  # so concatenating the per-process batches in process order gives the global batch.
  cfg = data_cfg()
  whole = train_iterator(cfg, seed=2, global_batch_size=8)
  parts = [train_iterator(cfg, seed=2, global_batch_size=8, process_index=p,
                          process_count=process_count) for p in range(process_count)]
  for _ in range(3):
    pieces = [next(it) for it in parts]
    assert pieces[0]["inputs"].shape == (8 // process_count, 32)
    joined = {k: np.concatenate([b[k] for b in pieces]) for k in pieces[0]}
    assert_batches_equal(joined, next(whole))


def test_batch_size_must_divide_by_processes():
  with pytest.raises(ConfigError) as e:
    train_dataset(data_cfg(), seed=0, global_batch_size=6, process_count=4)
  assert e.value.field == "data.batch_size"


def test_eval_set_fixed_and_held_out():
  cfg = data_cfg()
  ev = eval_batches(cfg, seed=0, num_examples=12, batch_size=4)
  assert len(ev) == 3 and all(b["inputs"].shape == (4, 32) for b in ev)
  again = eval_batches(cfg, seed=0, num_examples=12, batch_size=4)
  for a, b in zip(ev, again):
    assert_batches_equal(a, b)
  # A different stream from training with the same seed.
  assert eval_seed(0) != 0
  train = next(train_iterator(cfg, seed=0, global_batch_size=4))
  assert not (ev[0]["inputs"][:, None] == train["inputs"][None]).all(-1).any()
  # Sharded like training: per-process rows concatenate to the global eval batches.
  halves = [eval_batches(cfg, seed=0, num_examples=12, batch_size=4, process_index=p,
                         process_count=2) for p in range(2)]
  for i, b in enumerate(ev):
    joined = {k: np.concatenate([halves[0][i][k], halves[1][i][k]]) for k in b}
    assert_batches_equal(joined, b)


def test_eval_requires_divisible_num_examples():
  with pytest.raises(ConfigError) as e:
    eval_batches(data_cfg(), seed=0, num_examples=10, batch_size=4)
  assert e.value.field == "eval.num_examples"


def test_grain_checkpoint_handlers_exist():
  # lcm.checkpoint saves the iterator state through Orbax with these.
  import grain.checkpoint

  assert hasattr(grain.checkpoint, "CheckpointSave")
  assert hasattr(grain.checkpoint, "CheckpointRestore")
