"""State tuning (lcm/state_tuning.py, experiments/state_tuning.py, the trainer's ModelHooks)
and its task, MQAR with a hidden dictionary (lcm/data/tasks/mqar_hidden.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import state_tuning as st_cli
from layers.common import ConfigError
from lcm import config as config_lib
from lcm import generate, model as model_lib, state_tuning, train
from lcm.data.tasks import mqar_hidden as mh

TASK = {"vocab_size": 32, "seq_len": 16, "num_kv_pairs": 2, "num_hidden": 6,
        "hidden_queries": 2, "hidden_seed": 3}


def tiny_config(pattern: str, task: str = "mqar_hidden", steps: int = 3):
  c = config_lib.base_config()
  c.data.task = task
  c.data.vocab_size, c.data.seq_len, c.data.num_kv_pairs, c.data.batch_size = 32, 16, 2, 4
  c.model.pattern, c.model.d_model, c.model.num_layers, c.model.mlp_ratio = pattern, 16, 1, 1.0
  c.model.scan_layers = c.model.remat = False
  if pattern == "rwkv7":  # RWKV-7 time mixing and channel mix (its token shift is state too)
    c.model.mixers.rwkv7 = {"num_heads": 2}
    c.model.mlp = "rwkv"
  c.train.steps, c.train.lr, c.train.warmup_steps = steps, 0.05, 0
  c.train.eval_every = c.train.checkpoint_every = steps
  c.train.progress = False
  c.eval.num_examples, c.eval.batch_size = 4, 4
  c.mesh.data = 1
  return c


def _bytes(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------- the task


def test_hidden_mqar_oracle_solves_every_example():
  hkeys, hvalues = mh.hidden_dictionary(32, 6, 3)
  for seed, index in [(0, 0), (0, 7), (5, 1), (11, 123)]:
    ex = mh.mqar_hidden_example(index, seed=seed, **TASK)
    x, y, m = ex["inputs"], ex["targets"], ex["loss_mask"]
    assert m.sum() == TASK["num_kv_pairs"] + TASK["hidden_queries"]
    np.testing.assert_array_equal(
        mh.mqar_hidden_oracle(x, m, vocab_size=32, num_kv_pairs=2, num_hidden=6, hidden_seed=3),
        y[m > 0])
    hidden = mh.hidden_query_mask(x, m, vocab_size=32, num_hidden=6, hidden_seed=3)
    assert hidden.sum() == TASK["hidden_queries"]
    assert not np.isin(x[0:4:2], hkeys).any()  # hidden keys never appear as context keys
    for p in np.flatnonzero(hidden):  # and their values come from the fixed dictionary
      assert y[p] == hvalues[list(hkeys).index(x[p])]
    np.testing.assert_array_equal(ex["inputs"], mh.mqar_hidden_example(index, seed=seed,
                                                                       **TASK)["inputs"])
  # the dictionary is the hidden seed's alone; another one gives another dictionary
  assert not np.array_equal(mh.hidden_dictionary(32, 6, 4)[0], hkeys)


@pytest.mark.parametrize("field, bad", [("hidden_queries", {"hidden_queries": 7}),
                                        ("num_hidden", {"num_hidden": 0}),
                                        ("vocab_size", {"vocab_size": 16}),
                                        ("seq_len", {"seq_len": 10}),
                                        ("hidden_seed", {"hidden_seed": -1})])
def test_hidden_mqar_bad_config_names_its_field(field, bad):
  with pytest.raises(ConfigError, match=f"^data.{field}:"):
    mh.MQARHiddenConfig(**{**TASK, **bad}).validate("data")


# --------------------------------------------------------------------------- tuning


def random_weights(c) -> dict:
  """Random frozen LM weights (a pure dict; numpy draws: no compile)."""
  cfg = config_lib.resolve(c).model
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: model_lib.LM(cfg, rngs=nnx.Rngs(0))), nnx.Param))
  rng = np.random.default_rng(7)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module", params=["gated_deltanet", "rwkv7"])
def tuned(request):
  """Two trainer steps of state tuning of a random frozen LM: (trainer, frozen weights,
  params before, params after, optimizer state)."""
  c = tiny_config(request.param)
  frozen = random_weights(c)
  trainer = train.Trainer(c, devices=jax.devices()[:1],
                          hooks=state_tuning.hooks(frozen, leaves="all"))
  params, opt = trainer.init_state()
  before = jax.device_get(params)
  it = trainer.train_iterator()
  for _ in range(2):
    params, opt, m = trainer.train_step(params, opt, trainer.global_batch(next(it)))
    assert bool(m["finite"])
  return trainer, jax.device_get(frozen), before, jax.device_get(params), opt


def test_frozen_weights_bitwise_unchanged_and_only_states_move(tuned):
  trainer, frozen, before, after, opt = tuned
  assert _bytes(before["lm"]) == _bytes(frozen)  # init_params put the given weights in
  assert _bytes(after["lm"]) == _bytes(frozen)  # ... and two updates left them bit for bit
  assert all(not np.any(s) for s in before["states"].values())  # start: 0
  # the matrix state moved (a short-conv state may not: conv_q only feeds the first
  # outputs, which carry no loss in MQAR)
  assert np.any(max(after["states"].values(), key=np.ndim))
  # the optimizer holds state for the tuned parameters only
  sizes = sum(int(np.prod(np.shape(s))) for s in before["states"].values())
  assert trainer.num_trainable == sizes < sum(np.size(x) for x in jax.tree.leaves(frozen))
  moments = [x for x in jax.tree.leaves(opt) if np.ndim(x) > 0]
  assert sum(np.size(x) for x in moments) == 2 * sizes  # Adam's mu and nu


def test_tuned_state_drives_the_parallel_and_the_decode_paths(tuned):
  trainer, _, _, after, _ = tuned
  model = nnx.merge(trainer.graphdef, after)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 6)), jnp.int32)
  out = generate.generate(model, prompt, 4)  # greedy: prefill + per-token decode
  full = jnp.concatenate([prompt, out], axis=1)
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))  # the tuning forward
  logits = forward(nnx.to_pure_dict(params), full)
  np.testing.assert_array_equal(np.argmax(logits[:, 5:9], -1), out)
  # the state matters: from zero states (the frozen LM's own) the logits differ
  zero = {**after, "states": jax.tree.map(np.zeros_like, after["states"])}
  assert float(jnp.max(jnp.abs(forward(zero, full) - logits))) > 1e-4


# --------------------------------------------------------------------------- the command


def _fake_run(path, pattern="gated_deltanet", finished=True, steps=3):
  """A workdir that looks like a training run (config.json, an empty checkpoint step and,
  when finished, summary.json): enough for every check that runs before weights load."""
  os.makedirs(os.path.join(path, "checkpoints", str(steps)))
  c = config_lib.resolve(tiny_config(pattern, task="mqar", steps=steps))
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    f.write(c.to_json_best_effort())
  if finished:
    with open(os.path.join(path, "summary.json"), "w", encoding="utf-8") as f:
      json.dump({"steps": steps}, f)
  return str(path)


def _last_line(capsys):
  err = capsys.readouterr().err.strip().splitlines()
  return err[-1] if err else ""


@pytest.mark.parametrize("case, want", [
    ("missing", "lcm: --init_from: {base} does not exist"),
    ("unfinished", "lcm: --init_from: {base} is an unfinished run (newest checkpoint: step 3 "
                   "of 3; no final summary.json)"),
    ("attention", "lcm: --init_from={base}: its model's pattern 'attention' has no recurrent "
                  "state to tune"),
    ("same", "lcm: --workdir: is --init_from"),
    ("model_override", "lcm: --config.model.d_model: the model is --init_from's"),
    ("empty", "lcm: --init_from is empty"),
])
def test_bad_input_is_one_line(tmp_path, capsys, case, want):
  base = str(tmp_path / "base")
  if case == "unfinished":
    _fake_run(base, finished=False)
  elif case == "attention":
    _fake_run(base, pattern="attention")
  elif case != "missing":
    _fake_run(base)
  argv = ["prog", f"--init_from={'' if case == 'empty' else base}",
          f"--workdir={base if case == 'same' else tmp_path / 'tuned'}"]
  if case == "model_override":
    argv.append("--config.model.d_model=8")
  assert st_cli.cli_main(argv) == 2
  line = _last_line(capsys)
  assert line.startswith(want.format(base=base)), line
  assert not os.path.exists(tmp_path / "tuned")  # nothing was written


@pytest.mark.experiment  # two real runs (about a minute of compiles): `pytest -m experiment`
def test_command_tunes_resumes_and_keeps_the_base_weights(tmp_path, capsys):
  base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
  train.run(tiny_config("gated_deltanet", task="mqar", steps=2), base)
  argv = ["prog", f"--init_from={base}", f"--workdir={tuned}", "--config.mesh.data=1",
          "--config.data.batch_size=4", "--config.eval.num_examples=4",
          "--config.eval.batch_size=4", "--config.train.eval_every=2",
          "--config.train.checkpoint_every=2", "--config.train.progress=False",
          "--config.train.warmup_steps=0"]
  assert st_cli.cli_main(argv + ["--config.train.steps=2"]) == 0
  assert st_cli.cli_main(argv + ["--config.train.steps=4"]) == 0  # resumes at step 2
  assert st_cli.cli_main(argv + ["--config.train.steps=4"]) == 0  # finished: untouched
  assert "is a finished state tuning (4 steps)" in capsys.readouterr().out
  history = [json.loads(line) for line in open(os.path.join(tuned, "history.jsonl"))]
  assert [h["resumed_from"] for h in history] == [None, 2]
  meta = json.load(open(os.path.join(tuned, state_tuning.META)))
  assert meta["init_from"] == os.path.realpath(base) and meta["leaves"] == "all"
  model, config = state_tuning.load_tuned(tuned)
  assert config.data.task == "mqar_hidden" and config.data.seq_len == 16  # from the base
  lm, _ = generate.load_model(base)
  assert _bytes(nnx.state(model.lm, nnx.Param)) == _bytes(nnx.state(lm, nnx.Param))
  assert np.any(max((s[...] for s in model.states), key=np.ndim))
  summary = json.load(open(os.path.join(tuned, "summary.json")))
  assert summary["trainable_params"] == state_tuning.tuned_size(model)
