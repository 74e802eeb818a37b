"""Byte-level LM on the stdlib corpus for several mixers at one token budget -> results/lm.md.

    python -m experiments.lm_table                       # the committed table
    python -m experiments.lm_table --mixers=attention,mamba2 --steps=600 --out=results/lm_big

Every mixer gets the same model shape, data order, optimizer and token budget
(``--steps x batch x seq_len``). Runs live in ``--runs/<mixer>`` and resume, so an
interrupted table continues where it stopped. Writes ``<out>.md`` (the table),
``<out>/summary.json`` (the rows, with their provenance: ``lcm.provenance``) and
``<out>/loss_by_position.png`` (eval loss vs position in the document, one curve per mixer).
"""

import json
import os

from absl import flags, logging

from configs import lm
from experiments import cli
from lcm import provenance, train
from lcm.evals import plots

# What the table depends on (lcm.provenance): the model, the configs, this driver.
CODE = ("kernels", "layers", "lcm", "configs", "experiments/lm_table.py")



def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The flags, in ``fv`` (a fresh one per :func:`cli_main` call; tests import this module
  next to other experiments whose flags share names)."""
  global _MIXERS, _STEPS, _D_MODEL, _LAYERS, _SEQ, _BATCH, _RUNS, _OUT
  _MIXERS = flags.DEFINE_list("mixers", ["attention", "swa", "mamba2", "gated_deltanet", "gla",
                                         "mamba", "titans_mac"], "Mixer patterns to compare.",
                              flag_values=fv)
  _STEPS = flags.DEFINE_integer("steps", 300, "Training steps per mixer.", flag_values=fv)
  _D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.", flag_values=fv)
  _LAYERS = flags.DEFINE_integer("num_layers", 2, "Layers.", flag_values=fv)
  _SEQ = flags.DEFINE_integer("seq_len", 256, "Training length.", flag_values=fv)
  _BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch.", flag_values=fv)
  _RUNS = flags.DEFINE_string("runs", "runs/lm_table", "Workdirs root.", flag_values=fv)
  _OUT = flags.DEFINE_string("out", "results/lm", "Output prefix (<out>.md and <out>/).",
                             flag_values=fv)


def _check() -> None:
  """Before any training: mixers, counts, every mixer's config, the output paths."""
  cli.check_mixers("mixers", _MIXERS.value)
  for flag, holder in (("steps", _STEPS), ("d_model", _D_MODEL), ("num_layers", _LAYERS),
                       ("seq_len", _SEQ), ("batch_size", _BATCH)):
    cli.check_int(flag, holder.value, min_value=1)
  cli.check_configs((f"--mixers={name} with these flags", mixer_config(name))
                    for name in _MIXERS.value)
  cli.check_outputs(_RUNS.value, _OUT.value)


def cli_main(argv=None) -> int:
  """``python -m experiments.lm_table`` in-process: the exit status; bad input is one line on
  stderr (experiments/cli.py)."""
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


def mixer_config(name: str):
  c = lm.get_config(name)
  c.model.d_model, c.model.num_layers = _D_MODEL.value, _LAYERS.value
  c.model.mixers.attention = {"num_heads": 2}
  c.data.seq_len, c.data.batch_size = _SEQ.value, _BATCH.value
  c.train.steps = _STEPS.value
  c.train.warmup_steps = min(50, _STEPS.value // 5)
  c.train.eval_every = c.train.checkpoint_every = _STEPS.value
  c.eval.num_examples, c.eval.batch_size = 64, 16
  return c


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = []
  for name in _MIXERS.value:
    workdir = os.path.join(_RUNS.value, name.replace(",", "+"))
    s = train.run(mixer_config(name), workdir)
    rows.append({"mixer": name, "workdir": workdir, **{k: v for k, v in s.items()
                                                        if k != "config"}})
  os.makedirs(_OUT.value, exist_ok=True)
  plots.plot_loss_by_position(_OUT.value, runs={r["mixer"]: r["workdir"] for r in rows})
  tokens = _STEPS.value * _BATCH.value * _SEQ.value
  lines = [
      f"# Byte-level LM on the Python stdlib corpus, {tokens / 1e6:.2f}M training tokens",
      "",
      f"Made by `python -m experiments.lm_table` (d_model {_D_MODEL.value}, "
      f"{_LAYERS.value} layers, seq {_SEQ.value}, batch {_BATCH.value}, {_STEPS.value} "
      "steps, AdamW; 2-core CPU). Validation: 64 rows of held-out files.",
      "",
      "| mixer | params | state / seq (elements) | val bits/byte | val loss | train tok/s |",
      "|---|---|---|---|---|---|",
  ]
  for r in sorted(rows, key=lambda r: r["eval_bits_per_byte"]):
    lines.append(f"| {r['mixer']} | {r['num_params']:,} | {r['state_size']:,} | "
                 f"{r['eval_bits_per_byte']:.3f} | {r['eval_loss']:.3f} | "
                 f"{r['tokens_per_second']:.0f} |")
  lines += ["", f"![loss by position]({os.path.basename(_OUT.value)}/loss_by_position.png)", ""]
  with open(_OUT.value + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  outputs = [_OUT.value + ".md", os.path.join(_OUT.value, "loss_by_position.png")]
  with open(os.path.join(_OUT.value, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(provenance.attach(rows, code=CODE, outputs=outputs), f, indent=2)
  print("\n".join(lines))


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
