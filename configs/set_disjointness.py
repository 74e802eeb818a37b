"""Set disjointness (lcm.data.tasks.set_disjointness, the "Just read twice" recall problem).

    python -m experiments.train --config=configs/set_disjointness.py:jrt --workdir=runs/sd_jrt
    python -m experiments.sweep --config=configs/set_disjointness.py:jrt \\
        --grid="model.pattern=jrt,linear_attention;data.order=short_first,long_first"

`arg` is the mixer pattern. Two sets (4 and 24 elements) sharing one element; the model
names it after the QUERY token; `data.order` puts the short or the long set first. `jrt` and
`linear_attention` get the same feature map and heads, so their recurrent states are equal
(heads x features x head_dim per layer); `jrt`'s prefix covers the whole sequence (the
prompt is everything before the answer), as the paper's prefill of the prompt.
"""

from lcm import config as config_lib


def get_config(arg: str = "jrt"):
  c = config_lib.base_config()
  c.data.task = "set_disjointness"
  c.data.vocab_size = 128
  c.data.seq_len = 64
  c.data.short_size = 4
  c.data.long_size = 24
  c.data.order = "long_first"
  c.data.batch_size = 64

  c.model.pattern = arg or "jrt"
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.mlp_ratio = 2.0
  shared = {"num_heads": 2, "feature_map": "taylor", "feature_dim": 8}
  c.model.mixers.linear_attention = dict(shared)
  c.model.mixers.jrt = {**shared, "prefix_len": 64}
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
