"""State tuning: train only the initial recurrent states of a trained model (lcm/state_tuning.py).

    python -m experiments.state_tuning --init_from=runs/base --workdir=runs/tuned
    python -m experiments.state_tuning --init_from=runs/base --workdir=runs/tuned \\
        --config=configs/state_tuning.py:mqar_hidden --config.train.steps=300 --leaves=matrix

--init_from is the workdir of a finished `python -m experiments.train` run; its weights stay
fixed (bit for bit) and only the per-layer initial states are trained, by the ordinary trainer
(AdamW, logging, Orbax checkpoints, resumption, the workdir lock: docs/operations.md). The
config (default configs/state_tuning.py) gives the tuning data, optimizer and evaluation; its
model section is always --init_from's, and its data.vocab_size / seq_len / num_kv_pairs /
power_a / random_non_queries default to --init_from's unless set with --config.data.<field>.
Rerunning the same command resumes; a finished tuning is reported, not rerun.

Bad input ends in one line on stderr (`lcm: --init_from: ...`), exit status 2; --debug
re-raises with the traceback. Exit status: 0 tuned (or finished earlier, or stopped by a
signal with a checkpoint); 1 the run failed; 2 bad input; 3 the workdir is in use.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments import train as train_cli
from lcm import provenance, state_tuning, train

DEFAULT_CONFIG = os.path.join(provenance.ROOT, "configs", "state_tuning.py")


def _define_flags(fv: flags.FlagValues = flags.FLAGS, argv: Sequence[str] | None = None) -> dict:
  """The command's flags, in ``fv``; ``argv`` is where the config flag finds its overrides
  (default sys.argv)."""
  holders = {
      "init_from": flags.DEFINE_string(
          "init_from", None, "Workdir of a finished training run whose model is tuned (its "
          "weights stay fixed).", flag_values=fv),
      "workdir": flags.DEFINE_string(
          "workdir", None, "Output directory of the tuning run (created when missing).",
          flag_values=fv),
      "leaves": flags.DEFINE_enum(
          "leaves", "all", state_tuning.LEAVES, "Which state leaves to tune: all (every "
          "recurrent leaf) or matrix (only [H, Dk, Dv]-like matrix states).", flag_values=fv),
      "config": config_flags.DEFINE_config_file(
          "config", None, "configs/state_tuning.py[:task] (the default); override any field "
          "with --config.<field>=<value>", flag_values=fv, lock_config=True,
          sys_argv=None if argv is None else list(argv)),
  }
  fv["config"].parser = train_cli.ConfigFileParser("config", argv)
  flags.mark_flags_as_required(["init_from", "workdir"], flag_values=fv)
  return holders


def _with_default_config(argv: list[str]) -> list[str]:
  """``argv`` with ``--config=<configs/state_tuning.py>`` added when it has none."""
  if any(re.match(r"--?(config|flagfile)(=|$)", a) for a in argv[1:]):
    return argv
  return [argv[0], f"--config={os.path.relpath(DEFAULT_CONFIG)}", *argv[1:]]


def _classify(e: BaseException) -> tuple[int, str] | None:
  if isinstance(e, state_tuning.StateTuningError):
    return 2, f"--{e}"
  if isinstance(e, train.ConfigChangeError):
    return 2, str(e)
  if isinstance(e, train.NonFiniteError):
    return 1, f"{e}; lower train.lr or set train.nan_policy=skip"
  return None


def _check(f: dict, argv: Sequence[str]) -> tuple:
  """Everything cheap, before any weight is loaded: ``(config, explicit override paths)``."""
  init_from, workdir, leaves = f["init_from"].value, f["workdir"].value, f["leaves"].value
  if not init_from.strip():
    raise cli.CommandLineError("--init_from is empty; give the --workdir of a finished "
                               "python -m experiments.train run")
  if not workdir.strip():
    raise cli.CommandLineError("--workdir is empty; give a directory for the tuning run (it "
                               "is created when missing)")
  explicit = tuple(p for p, _ in train_cli.config_overrides(argv))
  for path in explicit:
    if path.startswith("model.") or path == "model":
      raise cli.CommandLineError(f"--config.{path}: the model is --init_from's (state tuning "
                                 "changes no weight and no layer); drop the flag")
  base, step = state_tuning.check_base(init_from)
  config = state_tuning.tuning_config(f["config"].value, base, explicit)
  try:
    state_tuning.abstract_model(config, leaves)
  except state_tuning.StateTuningError as e:
    message = str(e)[len("model: "):]
    raise cli.CommandLineError(f"--init_from={init_from}: its model's {message}"
                               if leaves == "all" else f"--leaves={leaves}: {message}") from None
  state_tuning.check_workdir(workdir, init_from, step, leaves)
  return config, explicit


def cli_main(argv: Sequence[str] | None = None) -> int:
  """The command, in-process: the exit status; bad input is one line on stderr."""
  argv = _with_default_config(list(sys.argv if argv is None else argv))
  holders: dict = {}

  def define(fv):
    holders.update(_define_flags(fv, argv))

  checked = []

  def main(rest):
    del rest
    return _main(holders, *checked)
  return cli.run(argv, doc=__doc__, define=define, main=main,
                 check=lambda: checked.extend(_check(holders, argv)), classify=_classify)


def _main(f: dict, config, explicit: tuple) -> int:
  logging.set_verbosity(logging.WARNING)
  workdir = f["workdir"].value
  out = state_tuning.run(config, workdir, init_from=f["init_from"].value,
                         leaves=f["leaves"].value, explicit=explicit)
  if out.get("finished"):
    print(f"{workdir} is a finished state tuning ({out['steps']} steps); nothing was changed. "
          f"Its summary: {workdir}/summary.json (raise --config.train.steps to train further)")
    return 0
  if out.get("preempted"):
    print(f"lcm: stopped by {out['signal']} after step {out['step']} of {out['steps']}; "
          f"checkpoint {out['checkpoint']}; rerun the same command to resume",
          file=sys.stderr)
    return 0
  print(f"eval_accuracy={out['eval_accuracy']:.4f} eval_loss={out['eval_loss']:.4f} "
        f"steps={out['steps']} tuned_elements={out.get('trainable_params')} "
        f"wall={out['wall_seconds']:.1f}s -> {workdir}/summary.json")
  return 0


if __name__ == "__main__":
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
