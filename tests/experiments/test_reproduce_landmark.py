"""experiments/reproduce_landmark.py: the evaluation model is the trained one in retrieval
mode, and equals it while top-k covers every block."""

import jax
import numpy as np
from flax import nnx

from experiments import reproduce_landmark
from lcm import config as config_lib
from layers import landmark_tokens
from lcm import model as model_lib


def _tiny_landmark_lm(top_k):
  """(resolved config, an untrained d_model-16 landmark LM of it, 40 random tokens)."""
  c = reproduce_landmark.mixer_config("landmark", train_len=40, steps=10, batch_size=2,
                                      block_size=4, top_k=top_k)
  c.model.d_model = 16
  config_lib.validate(c, num_devices=1)
  c = config_lib.resolve(c)
  tok = jax.random.randint(jax.random.key(0), (1, 40), 0, c.data.vocab_size)
  return c, model_lib.LM(c.model, rngs=nnx.Rngs(0)), tok


def test_retrieval_model_shares_weights_and_matches_exact_mode_when_k_covers_all():
  c, trained, tok = _tiny_landmark_lm(top_k=2)
  assert c.model.mixers.landmark["exact_len"] >= 40 + 40 // 3  # training is exact
  want = np.asarray(trained(tok))
  every = reproduce_landmark.retrieval_model(trained, c, exact_len=0, top_k=16)
  np.testing.assert_allclose(np.asarray(every(tok)), want, atol=2e-5, rtol=0)
  few = reproduce_landmark.retrieval_model(trained, c, exact_len=0, top_k=1)
  assert np.abs(np.asarray(few(tok)) - want).max() > 1e-3  # retrieval really acts


def test_mixer_config_evaluates_at_the_end_unless_told_otherwise():
  kw = dict(train_len=40, steps=10, batch_size=2, block_size=4, top_k=2)
  c = reproduce_landmark.mixer_config("landmark", **kw)
  assert (c.train.eval_every, c.train.checkpoint_every) == (10, 10)
  c = reproduce_landmark.mixer_config("attention", eval_every=4, **kw)
  assert (c.train.eval_every, c.train.checkpoint_every) == (4, 4)


def test_mixer_config_trains_the_question_at_every_block_offset():
  kw = dict(train_len=40, steps=10, batch_size=2, block_size=4, top_k=2)
  for name in ("landmark", "attention"):  # the baseline gets the same data
    assert reproduce_landmark.mixer_config(name, **kw).data.max_tail == 2  # block_size - 2
  assert reproduce_landmark.mixer_config("landmark", max_tail=0, **kw).data.max_tail == 0
  c = reproduce_landmark.mixer_config("landmark", **kw)
  config_lib.validate(c, num_devices=1)
  from lcm.data import pipeline  # pylint: disable=g-import-not-at-top
  batch = next(pipeline.train_iterator(c.data, seed=0, global_batch_size=64))
  ends = {int(np.flatnonzero(m)[-1]) + 1 for m in batch["loss_mask"]}
  # the answer ends at 40 - r, r in [0, 2]; the query marker at end - passkey_len: with 3
  # real tokens per landmark block it takes every offset within a block
  assert ends == {38, 39, 40}
  assert {(e - c.data.passkey_len) % 3 for e in ends} == {0, 1, 2}


def test_question_offsets_name_the_lengths_whose_answer_crosses_a_block():
  off = lambda n: reproduce_landmark.question_offset(n, 4, 32)
  # 512 (the training length): 12; 2048 / 32768 cross a block boundary (> 31 - 4); 8192 not
  assert [off(n) for n in (512, 2048, 8192, 32768)] == [12, 29, 4, 28]
  assert reproduce_landmark.training_offsets(512, 4, 32, 0) == "12"
  assert reproduce_landmark.training_offsets(512, 4, 32, 2) == "10, 11, 12"
  assert reproduce_landmark.training_offsets(512, 4, 32, 30) == "all"
  # the layout the offset is about: the LM puts a landmark after real token j iff
  # j % (block_size - 1) == block_size - 2, so token j sits at offset j % 31 of its block
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _, _, has_lm, _ = landmark_tokens.landmark_layout(jnp.ones((1, 100), jnp.int32), 1, 100, 31)
  assert np.flatnonzero(np.asarray(has_lm[0])).tolist() == [30, 61, 92]


def test_retrieval_model_can_keep_the_previous_block():
  c, trained, tok = _tiny_landmark_lm(top_k=1)
  plain = reproduce_landmark.retrieval_model(trained, c, exact_len=0, top_k=1)
  kept = reproduce_landmark.retrieval_model(trained, c, exact_len=0, top_k=1,
                                            keep_previous=True)
  assert np.abs(np.asarray(kept(tok)) - np.asarray(plain(tok))).max() > 1e-4
