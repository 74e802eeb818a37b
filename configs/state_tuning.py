"""State tuning (lcm/state_tuning.py, experiments/state_tuning.py): the tuning run's data,
optimizer and evaluation. The model section is always replaced by --init_from's, and
data.vocab_size / seq_len / num_kv_pairs / power_a / random_non_queries by --init_from's
unless set on the command line.

    python -m experiments.state_tuning --init_from=runs/base --workdir=runs/tuned \\
        [--config=configs/state_tuning.py:mqar_hidden] [--config.train.steps=300]

`arg` is the tuning task (default mqar_hidden: MQAR whose queries also ask keys of a fixed
hidden dictionary, lcm/data/tasks/mqar_hidden.py). Only the initial states are trained: AdamW
at lr 1e-2 (the states start at 0, the frozen model's own initial state), 50 warmup steps,
300 steps of 64 rows, no weight decay; evaluation on 1024 held-out rows every 100 steps.
"""

from configs.common import recall_config


def get_config(arg: str = "mqar_hidden"):
  c = recall_config(arg or "mqar_hidden", "gated_deltanet", vocab_size=128, seq_len=32,
                    num_kv_pairs=4, batch_size=64)
  c.train.steps = 300
  c.train.lr = 1e-2
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.eval.num_examples = 1024
  c.eval.batch_size = 256
  return c
