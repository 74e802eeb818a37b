"""The passkey task (lcm.data.tasks.passkey) and the needle evaluator (lcm.evals.needle)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import passkey as passkey_config
from layers.common import ConfigError
from lcm import config as config_lib
from lcm.data import pipeline
from lcm.data.tasks import passkey
from lcm.evals import needle

KW = {"vocab_size": 32, "seq_len": 40, "passkey_len": 4}


def test_examples_are_a_pure_function_of_seed_and_index():
  a = passkey.passkey_example(7, seed=3, **KW)
  b = passkey.passkey_example(7, seed=3, **KW)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = passkey.passkey_example(8, seed=3, **KW)
  d = passkey.passkey_example(7, seed=4, **KW)
  assert not np.array_equal(a["inputs"], c["inputs"])
  assert not np.array_equal(a["inputs"], d["inputs"])


@pytest.mark.parametrize("depth", [-1.0, 0.0, 0.5, 1.0])
def test_layout_and_oracle_solves_every_example(depth):
  k, t = KW["passkey_len"], KW["seq_len"]
  for i in range(200):
    ex = passkey.passkey_example(i, seed=0, needle_depth=depth, **KW)
    x, y, m = ex["inputs"], ex["targets"], ex["loss_mask"]
    assert x.shape == y.shape == m.shape == (t,)
    assert x.dtype == np.int32 and m.dtype == np.float32
    assert (x == passkey.NEEDLE).sum() == 1 and (x == passkey.QUERY).sum() == 1
    assert x[t - k] == passkey.QUERY
    np.testing.assert_array_equal(m, np.r_[np.zeros(t - k), np.ones(k)])
    answer = y[-k:]
    assert np.all((answer >= passkey.DIGIT0) & (answer < passkey.HAYSTACK0))
    # teacher forcing: the question repeats the digits already given
    np.testing.assert_array_equal(x[t - k + 1:], answer[:-1])
    # the oracle (copy after the needle marker) is right on every example
    np.testing.assert_array_equal(passkey.passkey_oracle(x, k), answer)
    # next-token targets elsewhere; haystack tokens are never markers or digits
    np.testing.assert_array_equal(y[:-1], x[1:])
    pos = int(np.argmax(x == passkey.NEEDLE))
    hay = np.delete(x, list(range(pos, pos + k + 1)) + list(range(t - k, t)))
    assert np.all(hay >= passkey.HAYSTACK0) and np.all(hay < KW["vocab_size"])
    if depth == 0.0:
      assert pos == 0
    if depth == 1.0:
      assert pos == t - 2 * k - 1  # right before the question


def test_random_depth_covers_the_haystack():
  k, t = KW["passkey_len"], KW["seq_len"]
  pos = [int(np.argmax(passkey.passkey_example(i, seed=1, **KW)["inputs"] == passkey.NEEDLE))
         for i in range(400)]
  assert min(pos) <= 2 and max(pos) >= t - 2 * k - 3


@pytest.mark.parametrize("field, kw", [
    ("passkey_len", {"passkey_len": 0}),
    ("seq_len", {"seq_len": 9}),  # 2 * 4 + 2 = 10 is the shortest
    ("vocab_size", {"vocab_size": 15}),
    ("needle_depth", {"needle_depth": 1.5}),
    ("needle_depth", {"needle_depth": float("nan")}),
])
def test_pathological_configs_name_their_field(field, kw):
  with pytest.raises(ConfigError, match=field):
    passkey.passkey_example(0, seed=0, **{**KW, **kw})
  c = passkey_config.get_config("attention")
  for key, value in kw.items():
    c.data[key] = value
  with pytest.raises(ConfigError, match=f"data.{field}"):
    config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize("num_needles", [1, 3])
def test_max_tail_moves_the_answer_off_the_end(num_needles):
  k, t, tail = KW["passkey_len"], KW["seq_len"], 9
  offsets = set()
  for i in range(200):
    kw = {**KW, "num_needles": num_needles}
    ex = passkey.passkey_example(i, seed=2, max_tail=tail, **kw)
    base = passkey.passkey_example(i, seed=2, **kw)
    x, y, m = ex["inputs"], ex["targets"], ex["loss_mask"]
    assert x.shape == y.shape == m.shape == (t,)
    q = int(np.argmax(x == passkey.QUERY))
    end = q + k + (num_needles > 1)  # the answer is y[end - k:end]
    r = t - end
    assert 0 <= r <= tail
    offsets.add(r)
    np.testing.assert_array_equal(m, (np.arange(t) >= end - k) & (np.arange(t) < end))
    answer = y[m == 1]
    np.testing.assert_array_equal(passkey.passkey_oracle(x, k, num_needles=num_needles), answer)
    np.testing.assert_array_equal(y[:-1], x[1:])
    assert np.all(x[end + 1:] >= passkey.HAYSTACK0)  # x[end] is the last answer token
    assert (x == passkey.NEEDLE).sum() == num_needles and (x == passkey.QUERY).sum() == 1
    if r == 0 and num_needles == 1:  # the same needle and digits as without a tail
      np.testing.assert_array_equal(answer, base["targets"][-k:])
  assert offsets == set(range(tail + 1))


def test_max_tail_is_validated_and_ignored_by_the_evaluator():
  with pytest.raises(ConfigError, match="max_tail"):
    passkey.passkey_example(0, seed=0, max_tail=-1, **KW)
  with pytest.raises(ConfigError, match="max_tail"):  # 40 - 31 = 9 < 10 tokens left
    passkey.passkey_example(0, seed=0, max_tail=31, **KW)
  data = ml_collections.ConfigDict({"task": "passkey", **KW, "max_tail": 8})
  r = needle.passkey_accuracy(_OracleLM(32, 4), data, seq_len=24, num_examples=8,
                              batch_size=4)
  assert r["retrieved"] == 1.0  # the evaluator's question ends the sequence


def test_config_validates_and_pipeline_batches():
  c = passkey_config.get_config("mamba2")
  config_lib.validate(c, num_devices=1)
  it = pipeline.train_iterator(c.data, seed=0, global_batch_size=4)
  batch = next(it)
  assert batch["inputs"].shape == (4, c.data.seq_len)
  assert float(batch["loss_mask"].sum()) == 4 * c.data.passkey_len
  first = batch["inputs"].copy()
  again = next(pipeline.train_iterator(c.data, seed=0, global_batch_size=4))["inputs"]
  np.testing.assert_array_equal(first, again)


class _OracleLM(nnx.Module):
  """Logits that put all mass on the passkey oracle's answer at the last K positions."""

  def __init__(self, vocab: int, k: int, wrong: bool = False):
    self.vocab, self.k, self.wrong = vocab, k, wrong
    self.dummy = nnx.Param(jnp.zeros(()))

  def __call__(self, tokens):
    t = tokens.shape[1]
    start = jnp.argmax(tokens == passkey.NEEDLE, axis=-1)[:, None] + 1
    answer = jnp.take_along_axis(tokens, start + jnp.arange(self.k), axis=-1)
    if self.wrong:
      answer = passkey.DIGIT0 + (answer - passkey.DIGIT0 + 1) % 10
    pred = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1).at[:, t - self.k:].set(answer)
    return jax.nn.one_hot(pred, self.vocab) + 0 * self.dummy


def test_needle_grid_scores_an_exact_retriever_1_and_a_wrong_one_0(tmp_path):
  data = ml_collections.ConfigDict({"task": "passkey", **KW})
  lengths, depths = [24, 48], [0.0, 1.0]
  good = needle.needle_grid(_OracleLM(32, 4), data, lengths=lengths, depths=depths,
                            num_examples=8, batch_size=4)
  assert np.all(np.asarray(good["retrieved"]) == 1.0)
  bad = needle.needle_grid(_OracleLM(32, 4, wrong=True), data, lengths=lengths,
                           depths=depths, num_examples=8, batch_size=4)
  assert np.all(np.asarray(bad["retrieved"]) == 0.0)
  assert np.all(np.asarray(bad["digit_accuracy"]) == 0.0)
  needle.plot_heatmap(good, str(tmp_path / "h.png"), title="oracle", train_len=24)
  assert (tmp_path / "h.png").stat().st_size > 0
