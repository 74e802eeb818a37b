"""Passkey retrieval in a noise haystack (lcm.data.tasks.passkey) with any mixer.

    python -m experiments.train --config=configs/passkey.py:mamba2 --workdir=runs/pk_mamba2
    python -m experiments.needle            # train several mixers, then test at 1x..4x length

`arg` is the mixer pattern. Trained at seq 128 with a 4-digit passkey at a uniform random
depth; `experiments.needle` evaluates the trained models at longer lengths and fixed depths.
"""

from lcm import config as config_lib


def get_config(arg: str = "attention"):
  c = config_lib.base_config()
  c.data.task = "passkey"
  c.data.vocab_size = 32
  c.data.seq_len = 128
  c.data.passkey_len = 4
  c.data.needle_depth = -1.0
  c.data.batch_size = 32

  c.model.pattern = arg or "attention"
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.mlp_ratio = 2.0
  c.model.mixers.attention = {"num_heads": 2}

  c.train.steps = 1000
  c.train.lr = 3e-3
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.1
  c.train.log_every = 25
  c.train.eval_every = 500
  c.train.checkpoint_every = 500

  c.eval.num_examples = 256
  c.eval.batch_size = 64
  return c
