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

from configs.common import recall_config


def get_config(arg: str = "jrt"):
  c = recall_config("set_disjointness", arg or "jrt", vocab_size=128, seq_len=64,
                    short_size=4, long_size=24, order="long_first", batch_size=64)
  shared = {"num_heads": 2, "feature_map": "taylor", "feature_dim": 8}
  c.model.mixers.linear_attention = dict(shared)
  c.model.mixers.jrt = {**shared, "prefix_len": 64}
  return c
