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

from configs._recall import recall_config


def get_config(arg: str = "mamba2"):
  c = recall_config("joint_recall", arg or "mamba2", vocab_size=128, seq_len=96,
                    num_contexts=4, num_keys=6, num_queries=8, batch_size=64)
  c.model.mixers.swa = {"num_heads": 2, "window": 16}
  c.model.mixers.mamba2 = {"head_dim": 16, "d_state": 16, "chunk_size": 32}
  return c
