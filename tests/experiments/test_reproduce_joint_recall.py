"""experiments/reproduce_joint_recall.py: the answer classification and the evaluation."""

import numpy as np
from flax import nnx

from configs import joint_recall
from experiments import reproduce_joint_recall as rjr
from lcm import config as config_lib
from layers import landmark_tokens
from lcm import model as model_lib
from lcm.data.tasks import joint_recall as jr

KW = {"vocab_size": 64, "seq_len": 64, "num_contexts": 4, "num_keys": 4, "num_queries": 8}


def _tables(inputs, k):
  """(context, key) -> value, parsed independently of the code under test."""
  table = {}
  for p in range(len(inputs)):
    if inputs[p] == jr.CONTEXT:
      for j in range(k):
        table[(int(inputs[p + 1]), int(inputs[p + 2 + 2 * j]))] = int(inputs[p + 3 + 2 * j])
  return table


def test_answer_kinds_on_constructed_answers():
  ex = jr.joint_recall_example(3, seed=0, **KW)
  inputs, k, q = ex["inputs"], KW["num_keys"], KW["num_queries"]
  right = jr.joint_recall_oracle(inputs, k, q)
  np.testing.assert_array_equal(rjr.answer_kinds(inputs, right, k, q), 0)
  table = _tables(inputs, k)
  start = len(inputs) - 3 * q + 1
  asked = [(int(inputs[start + 3 * j]), int(inputs[start + 3 * j + 1])) for j in range(q)]
  other_ctx = [next(v for (c2, k2), v in table.items() if k2 == key and c2 != c)
               for c, key in asked]
  np.testing.assert_array_equal(rjr.answer_kinds(inputs, np.array(other_ctx), k, q), 1)
  # a value of the example that is none of the queried key's values (values repeat
  # across keys, so "a different key's value" alone could be this key's in another context)
  other_val = [next(v for (_, k2), v in table.items()
                    if k2 != key and v not in {w for (_, k3), w in table.items() if k3 == key})
               for _, key in asked]
  np.testing.assert_array_equal(rjr.answer_kinds(inputs, np.array(other_val), k, q), 2)
  absent = next(v for v in range(jr.token_ranges(64)[2][0], 64) if v not in table.values())
  mixed = np.array([right[0], other_ctx[1], other_val[2], absent, jr.PAD] + list(right[5:]))
  np.testing.assert_array_equal(rjr.answer_kinds(inputs, mixed, k, q), [0, 1, 2, 3, 3, 0, 0, 0])


def test_evaluate_counts_every_answer_and_shares_sum_to_one():
  c = joint_recall.get_config("mamba2,landmark")
  c.model.d_model = 16
  c.eval.num_examples, c.eval.batch_size = 16, 8
  config_lib.validate(c, num_devices=1)
  c = config_lib.resolve(c)
  model = model_lib.LM(c.model, rngs=nnx.Rngs(0))
  r = rjr.evaluate(model, c)
  assert r["answers"] == 16 * c.data.num_queries
  assert abs(sum(r[f"share_{k}"] for k in rjr.KINDS) - 1.0) < 1e-9
  assert r["accuracy"] == r["share_right"] and 0.0 <= r["accuracy"] < 0.5  # untrained


def test_attention_kind_names_the_strongest_attention_of_any_pattern():
  assert rjr.attention_kind("mamba2") == "none (SSM alone)"
  assert rjr.attention_kind("mamba2,swa") == "sparse, fixed window (CISA)"
  assert rjr.attention_kind("mamba2,landmark,landmark") == "dense grouped softmax (as trained)"
  assert rjr.attention_kind("mamba2, landmark") == "dense grouped softmax (as trained)"
  assert rjr.attention_kind("swa,attention") == "dense causal"


def test_config_blocks_hold_one_pair_each_at_seq_64_and_split_them_at_65():
  """The reading of results/joint_recall.md relies on this layout fact: with the config's
  landmark blocks (2 tokens + a landmark), seq 64 puts every context (key, value) pair in one
  block, and the robustness run's seq 65 puts every pair across a block boundary."""
  c = joint_recall.get_config("mamba2,landmark")
  every = c.model.mixers.landmark["block_size"] - 1
  d = c.data
  for seq_len, same_block in ((64, True), (65, False)):
    _, _, has_lm, _ = landmark_tokens.landmark_layout(None, 1, seq_len, every)
    block = np.cumsum(np.concatenate([[0], np.asarray(has_lm[0])[:-1]]))  # block of each token
    for index in range(3):
      inputs = jr.joint_recall_example(index, seed=0, vocab_size=d.vocab_size, seq_len=seq_len,
                                       num_contexts=d.num_contexts, num_keys=d.num_keys,
                                       num_queries=d.num_queries)["inputs"]
      for p in np.flatnonzero(inputs == jr.CONTEXT):
        keys = p + 2 + 2 * np.arange(d.num_keys)  # key positions; the value follows each
        assert np.all((block[keys] == block[keys + 1]) == same_block), (seq_len, index, p)


def test_with_seq_len_keeps_training_exact_over_the_extended_row():
  for seq_len in (64, 65, 100):
    c = rjr.with_seq_len(joint_recall.get_config("mamba2,landmark"), seq_len)
    lm = c.model.mixers.landmark
    *_, ext = landmark_tokens.landmark_layout(None, 1, seq_len, lm.block_size - 1)
    assert c.data.seq_len == seq_len and lm.exact_len % lm.block_size == 0
    assert ext <= lm.exact_len < ext + lm.block_size, (seq_len, ext, lm.exact_len)
    config_lib.validate(c, num_devices=1)
