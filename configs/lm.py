"""Byte-level language model on local text; the default corpus is Python's stdlib source.

    python -m experiments.train --config=configs/lm.py:gated_deltanet --workdir=runs/lm_gdn

`arg` is the mixer pattern (a registered name or a comma-separated group). No download:
`data.path="stdlib"` reads `sysconfig.get_paths()["stdlib"]` (~1,700 .py files, ~32 MB),
split train/validation by a stable hash of each file's path. Point `data.path` at any
directory, glob or ArrayRecord files to train on your own text.
"""

from lcm import config as config_lib


def get_config(arg: str = "attention"):
  c = config_lib.base_config()
  c.data.task = "text"
  c.data.path = "stdlib"
  c.data.pattern = "**/*.py"
  c.data.tokenizer = "byte"
  c.data.tokenizer_model = ""
  c.data.validation_fraction = 0.05
  c.data.max_files = 0
  c.data.vocab_size = 256
  c.data.seq_len = 256
  c.data.batch_size = 16

  c.model.pattern = arg or "attention"
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.mlp_ratio = 2.0
  c.model.mixers.attention = {"num_heads": 4}

  c.train.steps = 1000  # 1000 x 16 x 256 = 4.1M tokens
  c.train.lr = 2e-3
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.1
  c.train.log_every = 25
  c.train.eval_every = 500
  c.train.checkpoint_every = 500

  c.eval.num_examples = 128
  c.eval.batch_size = 16
  return c
