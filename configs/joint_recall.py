"""Joint recall (lcm.data.tasks.joint_recall): context-dependent multi-query recall.

    python -m experiments.reproduce_joint_recall      # the table in results/joint_recall.md
    python -m experiments.train --config=configs/joint_recall.py:mamba2,landmark --workdir=runs/jr

`arg` is the mixer pattern: an SSM alone (`mamba2`), or a hybrid with mamba2 in layer 1 and
attention in layer 2: `mamba2,swa` (context-*independent* sparse attention: a fixed window),
`mamba2,landmark` (context-*dependent* sparse attention: each query retrieves the top-k blocks
its landmark scores select; the analogue of the paper's CDSA) and `mamba2,attention` (dense).

The setting (2 contexts bind the same 8 keys to different values: 16 (context, key) pairs;
8 pairs asked; seq 64, vocab 64, d_model 128, 2500 steps) is sized so that mamba2's small
state (d_state 4, head_dim 16: 1,024 SSM elements per layer) cannot hold the pairs and a run
fits a 2-core CPU (~20 min on one core; the landmark hybrid ~35 min). results/joint_recall.md
has the numbers and their reading.

Landmark: blocks of 3 (2 tokens + the landmark the LM inserts after them), trained with the
exact grouped softmax (`exact_len` 96 = the extended row: 64 tokens + 32 landmarks);
`experiments.reproduce_joint_recall` also evaluates the trained model with `exact_len=0`
(every query attends only to its own block and its `top_k` retrieved blocks: 2 tokens + k
landmark-selected blocks of 2). At seq 64 the padding is even, so every (key, value) pair
fills exactly one block; `experiments.reproduce_joint_recall --seq_len=65` shifts every pair
across a block boundary (and raises `exact_len`): the robustness run, 0.574. Session 6 used blocks of 8
(3-4 pairs per block): the hybrid then found the key but chose the context at chance
(0.52). The sliding window (3 tokens: a query's key sees itself, its context id and the
token before) never reaches a context block from a query, so anything `mamba2,swa` gets
right went through mamba2's state.

Earlier settings (results/joint_recall.md has their numbers): 2 contexts x 4 keys at seq 48
(mamba2 alone 0.63, mamba2,attention 0.73 after 1200 steps: the state was not the limit),
and 4 contexts x 6 keys x 8 queries at d_model 64 (nothing learned in 1000 steps).
"""

from configs.common import recall_config


def get_config(arg: str = "mamba2"):
  c = recall_config("joint_recall", arg or "mamba2", vocab_size=64, seq_len=64,
                    num_contexts=2, num_keys=8, num_queries=8, batch_size=64)
  c.model.d_model = 128
  c.model.mixers.swa = {"num_heads": 2, "window": 3}
  c.model.mixers.landmark = {"num_heads": 2, "block_size": 3, "exact_len": 96, "top_k": 2}
  c.model.mixers.mamba2 = {"head_dim": 16, "d_state": 4, "chunk_size": 16}
  c.train.steps = 2500
  c.train.eval_every = 250
  c.train.checkpoint_every = 500
  return c
