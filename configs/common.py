"""Shared defaults of the small synthetic-recall configs (mqar, passkey, set disjointness,
joint recall): a 2-layer, d_model 64 LM with a 2x SwiGLU MLP, AdamW lr 3e-3 with 100 warmup
steps, 1500 steps, evaluation and checkpoints every 500 steps on 1024 held-out examples."""

from lcm import config as config_lib


def recall_config(task: str, pattern: str, **data):
  """The base config with ``data.task = task``, ``data.<k> = v`` for ``data``, the mixer
  ``pattern`` and the shared model / optimizer / eval settings above."""
  c = config_lib.base_config()
  c.data.task = task
  for key, value in data.items():
    c.data[key] = value

  c.model.pattern = pattern
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.mlp_ratio = 2.0
  c.model.mixers.attention = {"num_heads": 2}

  c.train.steps = 1500
  c.train.lr = 3e-3
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.1
  c.train.log_every = 25
  c.train.eval_every = 500
  c.train.checkpoint_every = 500

  c.eval.num_examples = 1024
  c.eval.batch_size = 256
  return c
