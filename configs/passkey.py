"""Passkey retrieval in a noise haystack (lcm.data.tasks.passkey) with any mixer.

    python -m experiments.train --config=configs/passkey.py:mamba2 --workdir=runs/pk_mamba2
    python -m experiments.needle            # train several mixers, then test at 1x..4x length

`arg` is the mixer pattern. Trained at seq 128 with a 4-digit passkey at a uniform random
depth; `experiments.needle` evaluates the trained models at longer lengths and fixed depths.
"""

from configs.common import recall_config


def get_config(arg: str = "attention"):
  c = recall_config("passkey", arg or "attention", vocab_size=32, seq_len=128,
                    passkey_len=4, needle_depth=-1.0, batch_size=32)
  c.train.steps = 1000
  c.eval.num_examples = 256
  c.eval.batch_size = 64
  return c
