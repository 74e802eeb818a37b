"""Train one experiment: python -m experiments.train --config=configs/mqar.py:attention --workdir=DIR

Rerunning the same command resumes from the newest checkpoint in DIR.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from layers.common import ConfigError
from lcm import sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<arg>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (metrics, checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  sharding.maybe_initialize_distributed()
  try:
    summary = train.run(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(f"Invalid config: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"eval_accuracy={summary['eval_accuracy']:.4f} eval_loss={summary['eval_loss']:.4f} "
        f"steps={summary['steps']} tokens/s={summary['tokens_per_second']:.0f} "
        f"wall={summary['wall_seconds']:.1f}s -> {_WORKDIR.value}/summary.json")


if __name__ == "__main__":
  app.run(main)
