"""Joint recall (lcm.data.tasks.joint_recall): context-dependent multi-query recall.

    python -m experiments.train --config=configs/joint_recall.py:mamba2,swa --workdir=runs/jr
    python -m experiments.sweep --config=configs/joint_recall.py:mamba2 \\
        --grid="model.pattern=mamba2|mamba2,swa|mamba2,attention"

`arg` is the mixer pattern, e.g. an SSM alone (`mamba2`) or a hybrid with sparse attention
(`mamba2,swa`: alternating layers; `mamba2,landmark` once it exists). 4 contexts bind the
same 6 keys to different values; 8 queries (context, key) at the end. The sliding window
(16 tokens) is shorter than the distance from most queries back to their context, so the
window alone cannot answer.
"""

from lcm import config as config_lib


def get_config(arg: str = "mamba2"):
  c = config_lib.base_config()
  c.data.task = "joint_recall"
  c.data.vocab_size = 128
  c.data.seq_len = 96
  c.data.num_contexts = 4
  c.data.num_keys = 6
  c.data.num_queries = 8
  c.data.batch_size = 64

  c.model.pattern = arg or "mamba2"
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.mlp_ratio = 2.0
  c.model.mixers.attention = {"num_heads": 2}
  c.model.mixers.swa = {"num_heads": 2, "window": 16}
  c.model.mixers.mamba2 = {"head_dim": 16, "d_state": 16, "chunk_size": 32}

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
