"""Train one experiment: python -m experiments.train --config=configs/mqar.py:attention --workdir=DIR

Rerunning the same command resumes from the newest checkpoint in DIR. One run per DIR at a
time (DIR/.lock); every start is appended to DIR/history.jsonl; a changed model / data / seed
config is refused unless --allow_config_change; a finished run is reported, not rerun;
SIGTERM / SIGINT checkpoint the current step and exit 0 (docs/operations.md).

Exit status: 0 trained, finished earlier, or stopped by a signal with a checkpoint; 2 invalid
or changed config; 3 the workdir is in use by another run; 130 a second signal.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from layers.common import ConfigError
from lcm import provenance, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<arg>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (metrics, checkpoints).")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Continue the run in --workdir although its model / data / seed config differs from "
    "the new one (the changes are recorded in history.jsonl).")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(msg: str, code: int):
  print("lcm: " + " ".join(str(msg).split()), file=sys.stderr)  # one line
  sys.exit(code)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  sharding.maybe_initialize_distributed()
  workdir = _WORKDIR.value
  try:
    out = train.run(_CONFIG.value, workdir, guard=True,
                    allow_config_change=_ALLOW_CHANGE.value)
  except ConfigError as e:
    _fail(f"Invalid config: {e}", 2)
  except train.ConfigChangeError as e:
    _fail(e, 2)
  except provenance.WorkdirBusyError as e:
    _fail(e, 3)
  except KeyboardInterrupt as e:
    _fail(f"interrupted ({str(e) or 'SIGINT'}) before the current step was checkpointed; "
          "rerun the same command to resume from the last checkpoint", 130)
  if out.get("finished"):
    print(f"{workdir} is a finished run ({out['steps']} steps); nothing was changed. Its "
          f"summary: {workdir}/summary.json (raise --config.train.steps to train further)")
    return
  if out.get("preempted"):
    print(f"lcm: stopped by {out['signal']} after step {out['step']} of {out['steps']}; "
          f"checkpoint {out['checkpoint']}; rerun the same command to resume",
          file=sys.stderr)
    return
  print(f"eval_accuracy={out['eval_accuracy']:.4f} eval_loss={out['eval_loss']:.4f} "
        f"steps={out['steps']} tokens/s={out['tokens_per_second']:.0f} "
        f"wall={out['wall_seconds']:.1f}s -> {workdir}/summary.json")


if __name__ == "__main__":
  app.run(main)
