"""The evaluation-suite synthetic tasks (lcm.data.tasks): joint_recall, set_disjointness,
selective_copy, sequence_order, phonebook, and the passkey task's multi-needle / needle-kind
extension. Pure numpy: no model, no compile."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import pytest

from layers.common import ConfigError
from lcm import config as config_lib
from lcm.data import pipeline
from lcm.data.tasks import joint_recall as jr
from lcm.data.tasks import passkey as pk
from lcm.data.tasks import phonebook as pb
from lcm.data.tasks import selective_copy as sc
from lcm.data.tasks import sequence_order as so
from lcm.data.tasks import set_disjointness as sd


def _pk_oracle(x, kw):
  return pk.passkey_oracle(x, kw["passkey_len"], num_needles=kw.get("num_needles", 1))


# name -> (example fn, small kwargs, minimum seq_len for those kwargs, oracle(inputs, kw))
TASKS = {
    "joint_recall": (jr.joint_recall_example,
                     dict(vocab_size=32, seq_len=48, num_contexts=3, num_keys=3, num_queries=4),
                     3 * 8 + 12, lambda x, kw: jr.joint_recall_oracle(x, kw["num_keys"],
                                                                      kw["num_queries"])),
    "set_disjointness": (sd.set_disjointness_example,
                         dict(vocab_size=32, seq_len=32, short_size=3, long_size=9,
                              order="short_first"),
                         14, lambda x, kw: sd.set_disjointness_oracle(x)),
    "selective_copy": (sc.selective_copy_example,
                       dict(vocab_size=8, seq_len=40, num_tokens=6),
                       12, lambda x, kw: sc.selective_copy_oracle(x)),
    "sequence_order": (so.sequence_order_example,
                       dict(vocab_size=32, seq_len=48, segment_len=3),
                       15, lambda x, kw: so.sequence_order_oracle(x)),
    "phonebook": (pb.phonebook_example,
                  dict(vocab_size=32, seq_len=48, num_entries=4, name_len=2, number_len=3),
                  4 * 6 + 5, lambda x, kw: pb.phonebook_oracle(x, kw["name_len"],
                                                               kw["number_len"])),
    "passkey_mk": (pk.passkey_example,
                   dict(vocab_size=32, seq_len=48, passkey_len=3, num_needles=4),
                   5 * 5, _pk_oracle),
}
NAMES = sorted(TASKS)


@pytest.mark.parametrize("name", NAMES)
def test_examples_are_a_pure_function_of_seed_and_index(name):
  fn, kw, _, _ = TASKS[name]
  a, b = fn(7, seed=3, **kw), fn(7, seed=3, **kw)
  assert sorted(a) == ["inputs", "loss_mask", "targets"]
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  others = [fn(i, seed=3, **kw)["inputs"] for i in range(8, 12)]
  others += [fn(7, seed=s, **kw)["inputs"] for s in (4, 5)]
  assert all(not np.array_equal(a["inputs"], o) for o in others)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", ["min", "given"])
def test_oracle_solves_every_example_and_targets_match_it(name, length):
  fn, kw, min_len, oracle = TASKS[name]
  kw = dict(kw, seq_len=min_len) if length == "min" else kw
  t = kw["seq_len"]
  batch = []
  for i in range(100):
    ex = fn(i, seed=1, **kw)
    x, y, m = ex["inputs"], ex["targets"], ex["loss_mask"]
    assert x.shape == y.shape == m.shape == (t,)
    assert x.dtype == np.int32 and y.dtype == np.int32 and m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0} and m.sum() >= 1
    assert x.min() >= 0 and x.max() < kw["vocab_size"] and y.max() < kw["vocab_size"]
    np.testing.assert_array_equal(y[:-1], x[1:])  # next-token targets; answers teacher-forced
    np.testing.assert_array_equal(np.atleast_1d(oracle(x, kw)), y[m == 1])
    batch.append(x)
  # the oracles also take a batch
  answers = np.stack([fn(i, seed=1, **kw)["targets"] for i in range(4)])
  masks = np.stack([fn(i, seed=1, **kw)["loss_mask"] for i in range(4)])
  got = np.asarray(oracle(np.stack(batch[:4]), kw)).reshape(4, -1)
  np.testing.assert_array_equal(got, answers[masks == 1].reshape(4, -1))


def test_minimum_lengths_are_the_documented_ones():
  for name in NAMES:
    fn, kw, min_len, _ = TASKS[name]
    fn(0, seed=0, **dict(kw, seq_len=min_len))
    with pytest.raises(ConfigError, match="seq_len"):
      fn(0, seed=0, **dict(kw, seq_len=min_len - 1))


# --- layouts -------------------------------------------------------------------------

def test_joint_recall_layout():
  kw = TASKS["joint_recall"][1]
  c, k, q, t = kw["num_contexts"], kw["num_keys"], kw["num_queries"], kw["seq_len"]
  (i0, i1), (k0, k1), (v0, v1) = jr.token_ranges(kw["vocab_size"])
  assert (i0, i1, k1, v1) == (3, 10, 21, 32)
  for i in range(50):
    ex = jr.joint_recall_example(i, seed=0, **kw)
    x = ex["inputs"]
    pad = t - (c * (2 + 2 * k) + 3 * q)
    assert np.all(x[:pad] == jr.PAD) and np.sum(x == jr.PAD) == pad
    assert np.sum(x == jr.CONTEXT) == c and np.sum(x == jr.QUERY) == 1
    assert x[t - 3 * q] == jr.QUERY
    blocks = x[pad:pad + c * (2 + 2 * k)].reshape(c, 2 + 2 * k)
    ids = blocks[:, 1]
    assert len(set(ids)) == c and np.all((ids >= i0) & (ids < i1))
    keys, values = blocks[:, 2::2], blocks[:, 3::2]
    assert np.all((keys >= k0) & (keys < k1)) and np.all((values >= v0) & (values < v1))
    key_set = set(keys[0])
    assert len(key_set) == k and all(set(row) == key_set for row in keys)  # same keys
    for key in key_set:  # a key's value differs in every context
      vals = values[keys == key]
      assert len(vals) == c and len(set(vals)) == c
    questions = x[t - 3 * q + 1:].tolist() + [int(ex["targets"][-1])]
    pairs = {(questions[3 * j], questions[3 * j + 1]) for j in range(q)}
    assert len(pairs) == q and all(p[0] in ids and p[1] in key_set for p in pairs)
    np.testing.assert_array_equal(np.flatnonzero(ex["loss_mask"]), t - 3 * q + 2 + 3 * np.arange(q))


@pytest.mark.parametrize("order", sd.ORDERS)
def test_set_disjointness_layout_and_order(order):
  kw = dict(TASKS["set_disjointness"][1], order=order)
  s, n, t = kw["short_size"], kw["long_size"], kw["seq_len"]
  for i in range(50):
    ex = sd.set_disjointness_example(i, seed=0, **kw)
    x = ex["inputs"]
    assert np.sum(x == sd.SEP) == 1 and np.sum(x == sd.QUERY) == 1 and x[-1] == sd.QUERY
    sep = int(np.flatnonzero(x == sd.SEP)[0])
    pad = t - (s + n + 2)
    assert np.all(x[:pad] == sd.PAD)
    first, second = x[pad:sep], x[sep + 1:-1]
    assert (len(first), len(second)) == ((s, n) if order == "short_first" else (n, s))
    assert len(set(first)) == len(first) and len(set(second)) == len(second)
    both = set(first) & set(second)
    assert both == {int(ex["targets"][-1])}  # exactly one shared element, and it is asked
    assert np.all(np.concatenate([first, second]) >= sd.ELEMENT0)
    np.testing.assert_array_equal(ex["loss_mask"], np.eye(t, dtype=np.float32)[-1])


def test_selective_copy_layout():
  kw = TASKS["selective_copy"][1]
  k, t = kw["num_tokens"], kw["seq_len"]
  spread = set()
  for i in range(50):
    ex = sc.selective_copy_example(i, seed=0, **kw)
    x = ex["inputs"]
    assert np.sum(x == sc.COPY) == 1 and x[t - k] == sc.COPY
    region = x[:t - k]
    data_pos = np.flatnonzero(region != sc.NOISE)
    assert len(data_pos) == k and np.all(region[data_pos] >= sc.DATA0)
    np.testing.assert_array_equal(ex["targets"][t - k:], region[data_pos])
    np.testing.assert_array_equal(ex["loss_mask"], np.r_[np.zeros(t - k), np.ones(k)])
    spread.update(data_pos.tolist())
  assert min(spread) == 0 and max(spread) == t - k - 1  # data tokens land anywhere


def test_sequence_order_layout_and_balance():
  kw = TASKS["sequence_order"][1]
  n, t = kw["segment_len"], kw["seq_len"]
  d = t - 2 * n - 3
  answers = []
  for i in range(100):
    ex = so.sequence_order_example(i, seed=0, **kw)
    x = ex["inputs"]
    assert np.sum(x == so.SEG) == 2 and x[d] == so.SEG and x[d + 1 + n] == so.SEG
    assert np.sum(x == so.QUERY) == 1 and x[-1] == so.QUERY
    text = x[:d]
    assert np.all(text >= so.TEXT0)
    a, b = x[d + 1:d + 1 + n], x[d + 2 + n:d + 2 + 2 * n]
    win = np.lib.stride_tricks.sliding_window_view(text, n)
    pa, pb_ = (np.flatnonzero(np.all(win == s, axis=1)) for s in (a, b))
    assert len(pa) == 1 and len(pb_) == 1  # each segment occurs exactly once
    assert abs(int(pa[0]) - int(pb_[0])) >= n  # copied from non-overlapping spans
    answer = int(ex["targets"][-1])
    assert answer == (so.FIRST if pa[0] < pb_[0] else so.SECOND)
    answers.append(answer)
  assert 30 <= answers.count(so.FIRST) <= 70


def test_sequence_order_with_one_token_segments_stays_unambiguous():
  kw = dict(vocab_size=64, seq_len=12, segment_len=1)  # 59 symbols >= 4 * 7 text tokens
  for i in range(100):
    x = so.sequence_order_example(i, seed=2, **kw)["inputs"]
    text = x[:7]
    assert np.sum(text == x[8]) == 1 and np.sum(text == x[10]) == 1


def test_phonebook_layout():
  kw = TASKS["phonebook"][1]
  e, n, d, t = kw["num_entries"], kw["name_len"], kw["number_len"], kw["seq_len"]
  for i in range(50):
    ex = pb.phonebook_example(i, seed=0, **kw)
    x = ex["inputs"]
    pad = t - (e * (1 + n + d) + n + d)
    assert np.all(x[:pad] == pb.PAD) and np.sum(x == pb.ENTRY) == e
    book = x[pad:pad + e * (1 + n + d)].reshape(e, 1 + n + d)
    names, numbers = book[:, 1:1 + n], book[:, 1 + n:]
    assert len({tuple(r) for r in names}) == e and np.all(names >= pb.NAME0)
    assert np.all((numbers >= pb.DIGIT0) & (numbers < pb.NAME0))
    q = t - n - d
    assert x[q] == pb.QUERY
    row = [j for j in range(e) if tuple(names[j]) == tuple(x[q + 1:q + 1 + n])]
    assert len(row) == 1
    np.testing.assert_array_equal(ex["targets"][t - d:], numbers[row[0]])
    np.testing.assert_array_equal(ex["loss_mask"], np.r_[np.zeros(t - d), np.ones(d)])


def test_phonebook_names_are_distinct_even_when_the_name_space_is_tight():
  kw = dict(vocab_size=17, seq_len=48, num_entries=8, name_len=1, number_len=2)  # 4 names
  with pytest.raises(ConfigError, match="vocab_size"):
    pb.phonebook_example(0, seed=0, **kw)
  kw = dict(kw, name_len=2)  # 16 names for 8 entries
  for i in range(50):
    x = pb.phonebook_example(i, seed=0, **kw)["inputs"]
    p = np.flatnonzero(x == pb.ENTRY)
    assert len({(x[j + 1], x[j + 2]) for j in p}) == 8


# --- passkey extension ---------------------------------------------------------------

def test_passkey_default_is_bit_identical_to_the_single_needle_task():
  # Produced by the single-needle implementation before num_needles / needle_kind existed.
  ex = pk.passkey_example(3, seed=5, vocab_size=20, seq_len=16, passkey_len=3)
  assert ex["inputs"].tolist() == [13, 13, 15, 15, 13, 19, 1, 12, 10, 5, 19, 19, 13, 2, 12, 10]
  assert ex["targets"].tolist() == [13, 15, 15, 13, 19, 1, 12, 10, 5, 19, 19, 13, 2, 12, 10, 5]
  same = pk.passkey_example(3, seed=5, vocab_size=20, seq_len=16, passkey_len=3,
                            num_needles=1, needle_kind="number")
  for k in ex:
    np.testing.assert_array_equal(ex[k], same[k])
  assert pk.PasskeyConfig().num_needles == 1 and pk.PasskeyConfig().needle_kind == "number"


@pytest.mark.parametrize("kind", pk.NEEDLE_KINDS)
@pytest.mark.parametrize("num_needles", [1, 3])
def test_passkey_kinds_and_needles(kind, num_needles):
  v, t, k = 40, 48, 4
  lo, hi, hay0 = pk.value_alphabet(v, kind)
  assert {"number": (3, 13, 13), "word": (13, 26, 26), "uuid": (3, 19, 19)}[kind] == (lo, hi, hay0)
  seen = set()
  for i in range(60):
    ex = pk.passkey_example(i, seed=0, vocab_size=v, seq_len=t, passkey_len=k,
                            num_needles=num_needles, needle_kind=kind)
    x, y = ex["inputs"], ex["targets"]
    assert np.sum(x == pk.NEEDLE) == num_needles and np.sum(x == pk.QUERY) == 1
    answer = y[-k:]
    assert np.all((answer >= lo) & (answer < hi))
    np.testing.assert_array_equal(pk.passkey_oracle(x, k, num_needles=num_needles), answer)
    starts = np.flatnonzero(x == pk.NEEDLE)
    value_len = k + (num_needles > 1)
    covered = np.concatenate([s + np.arange(1, value_len + 1) for s in starts])
    hay = np.delete(x, np.r_[starts, covered, np.arange(t - value_len, t)])
    assert np.all((hay >= hay0) & (hay < v))  # haystack never uses the value alphabet
    if num_needles > 1:
      keys = x[starts + 1]
      assert len(set(keys)) == num_needles and np.all(keys >= hay0)
      assert x[t - k] in keys  # the question names one of the needles
    seen.update(answer.tolist())
  assert len(seen) >= min(hi - lo, 8)


def test_passkey_multi_needle_depth_places_the_queried_needle():
  kw = dict(vocab_size=32, seq_len=60, passkey_len=3, num_needles=3)
  for i in range(30):
    x = pk.passkey_example(i, seed=0, needle_depth=0.0, **kw)["inputs"]
    assert x[0] == pk.NEEDLE and x[1] == x[60 - 3]  # queried needle first
  first = [int(np.flatnonzero(pk.passkey_example(i, seed=0, **kw)["inputs"] == pk.NEEDLE)[0])
           for i in range(100)]
  assert min(first) == 0 and max(first) > 10  # random depth otherwise


# --- pathological configs --------------------------------------------------------------

BAD = [
    ("joint_recall", "num_contexts", {"num_contexts": 0}),
    ("joint_recall", "num_keys", {"num_keys": 0}),
    ("joint_recall", "num_queries", {"num_queries": 0}),
    ("joint_recall", "num_queries", {"num_queries": 10}),  # > 3 contexts * 3 keys
    ("joint_recall", "seq_len", {"seq_len": 35}),
    ("joint_recall", "vocab_size", {"vocab_size": 16, "num_contexts": 5}),  # 3 ids only
    ("set_disjointness", "short_size", {"short_size": 0}),
    ("set_disjointness", "long_size", {"long_size": 2}),  # < short_size
    ("set_disjointness", "order", {"order": "middle"}),
    ("set_disjointness", "order", {"order": None}),
    ("set_disjointness", "seq_len", {"seq_len": 13}),
    ("set_disjointness", "vocab_size", {"vocab_size": 13}),  # 11 elements needed, 10 given
    ("selective_copy", "num_tokens", {"num_tokens": 0}),
    ("selective_copy", "seq_len", {"seq_len": 11}),
    ("selective_copy", "vocab_size", {"vocab_size": 4}),
    ("sequence_order", "segment_len", {"segment_len": 0}),
    ("sequence_order", "seq_len", {"seq_len": 14}),
    ("sequence_order", "segment_len", {"segment_len": 1}),  # 27 symbols, 43-token text
    ("sequence_order", "vocab_size", {"vocab_size": 6}),
    ("phonebook", "num_entries", {"num_entries": 0}),
    ("phonebook", "name_len", {"name_len": 0}),
    ("phonebook", "number_len", {"number_len": 0}),
    ("phonebook", "seq_len", {"seq_len": 28}),
    ("phonebook", "vocab_size", {"vocab_size": 14}),
    ("passkey_mk", "num_needles", {"num_needles": 0}),
    ("passkey_mk", "seq_len", {"seq_len": 24}),
    ("passkey_mk", "needle_kind", {"needle_kind": "emoji"}),
    ("passkey_mk", "vocab_size", {"vocab_size": 21, "needle_kind": "uuid"}),
    ("passkey_mk", "num_needles", {"num_needles": 5, "vocab_size": 16, "seq_len": 64}),
]


@pytest.mark.parametrize("name, field, bad", BAD, ids=[f"{n}-{f}" for n, f, _ in BAD])
def test_pathological_configs_name_their_field(name, field, bad):
  fn, kw, _, _ = TASKS[name]
  with pytest.raises(ConfigError, match=f"^{field}:"):
    fn(0, seed=0, **{**kw, **bad})
  task = "passkey" if name == "passkey_mk" else name
  c = config_lib.base_config()
  c.data.task = task
  for key, value in {**kw, **bad}.items():
    c.data[key] = value
  with pytest.raises(ConfigError, match=f"^data.{field}:"):
    config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize("task, field", [("set_disjointness", "order"),
                                         ("joint_recall", "num_queries"),
                                         ("phonebook", "name_len"), ("passkey", "needle_kind")])
@pytest.mark.parametrize("value", [[1], {"a": 1}, np.arange(2), 2.0, True])
def test_unhashable_or_mistyped_values_get_a_config_error(task, field, value):
  c = config_lib.base_config()
  c.data.task = task
  c.data[field] = value
  with pytest.raises(ConfigError, match=f"^data.{field}:"):
    config_lib.validate(c, num_devices=1)


# --- pipeline and config -------------------------------------------------------------

@pytest.mark.parametrize("task", ["joint_recall", "set_disjointness", "selective_copy",
                                  "sequence_order", "phonebook"])
def test_registered_in_pipeline_and_config(task):
  assert task in pipeline.TASKS and task in config_lib.TASKS
  # defaults only: the task's dataclass supplies every field
  example = pipeline.task_example_fn(ml_collections.ConfigDict({"task": task}))(0, 5)
  cls = type(pipeline.SYNTHETIC_TASKS[task][0](ml_collections.ConfigDict({"task": task})))
  assert example["inputs"].shape == (cls().seq_len,)
  assert example["loss_mask"].sum() >= 1
  # a base config with this task validates (base vocab 8192, seq_len 64 + task defaults)
  c = config_lib.base_config()
  c.data.task = task
  config_lib.validate(c, num_devices=1)
  for f in dataclasses.fields(cls):  # setting any of the task's fields is allowed
    if f.name not in c.data:
      c.data[f.name] = f.default
  config_lib.validate(c, num_devices=1)
  # and the training pipeline batches it, using the config's seq_len
  batch = next(pipeline.train_iterator(c.data, seed=0, global_batch_size=2))
  assert batch["inputs"].shape == (2, 64) and batch["targets"].dtype == np.int32
  ex = pipeline.task_example_fn(c.data)(0, 1)
  np.testing.assert_array_equal(batch["inputs"][1], ex["inputs"])


def test_passkey_extension_through_the_config():
  c = config_lib.base_config()
  c.data.task = "passkey"
  c.data.vocab_size, c.data.seq_len = 64, 64
  c.data.num_needles, c.data.needle_kind = 3, "uuid"
  config_lib.validate(c, num_devices=1)
  ex = pipeline.task_example_fn(c.data)(0, 0)
  x = ex["inputs"]
  assert np.sum(x == pk.NEEDLE) == 3
  np.testing.assert_array_equal(pk.passkey_oracle(x, 4, num_needles=3), ex["targets"][-4:])
