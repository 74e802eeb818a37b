"""Needle in a haystack: train mixers on passkey retrieval, test them up to 4x longer.

    python -m experiments.needle                  # titans_mac, mamba2, gated_deltanet, attention
    python -m experiments.needle --mixers=attention,gla --train_len=128 --factors=1,2,4,8

Every mixer gets ``configs/passkey.py:<name>`` (same width, depth, data, optimizer and
steps) trained at ``--train_len``, then is evaluated on held-out examples at
``train_len * factor`` for each of ``--factors`` and at each of ``--depths``. Writes
``<out>.md`` (the Titans-paper Table 2 shape: one row per model, one column per length,
retrieval rate averaged over depths), ``<out>/summary.json`` (the rows, with their
provenance: ``lcm.provenance``), ``<out>/by_length.png`` and a depth x length heatmap per model
``<out>/heatmap_<mixer>.png``. Runs live in ``--runs/<mixer>`` and resume.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags, logging

from configs import passkey as passkey_config
from experiments import cli
from lcm import generate, provenance, train
from lcm.evals import needle

# What the table and plots depend on (lcm.provenance): the model, the configs, this driver.
CODE = ("kernels", "layers", "lcm", "configs", "experiments/needle.py")



def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The flags, in ``fv`` (a fresh one per :func:`cli_main` call; tests import this module
  next to other experiments whose flags share names)."""
  global _MIXERS, _TRAIN_LEN, _FACTORS, _DEPTHS, _STEPS, _D_MODEL, _EXAMPLES, _RUNS, _OUT
  _MIXERS = flags.DEFINE_list("mixers", ["titans_mac", "mamba2", "gated_deltanet",
                                         "attention"], "Mixer patterns to compare.",
                              flag_values=fv)
  _TRAIN_LEN = flags.DEFINE_integer("train_len", 128, "Training sequence length.",
                                    flag_values=fv)
  _FACTORS = flags.DEFINE_list("factors", ["1", "2", "4"], "Test lengths as multiples of it.",
                               flag_values=fv)
  _DEPTHS = flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Needle depths.",
                              flag_values=fv)
  _STEPS = flags.DEFINE_integer("steps", 0, "Training steps (0: the config's).",
                                flag_values=fv)
  _D_MODEL = flags.DEFINE_integer("d_model", 0, "Model width (0: the config's).",
                                  flag_values=fv)
  _EXAMPLES = flags.DEFINE_integer("examples", 64, "Test examples per (depth, length) cell.",
                                   flag_values=fv)
  _RUNS = flags.DEFINE_string("runs", "runs/needle", "Workdirs root.", flag_values=fv)
  _OUT = flags.DEFINE_string("out", "results/needle", "Output prefix (<out>.md and <out>/).",
                             flag_values=fv)


def _check() -> None:
  """Before any training: mixers, counts, factors, depths, every mixer's config and the
  output paths."""
  cli.check_mixers("mixers", _MIXERS.value)
  cli.check_int("train_len", _TRAIN_LEN.value, min_value=1)
  cli.check_int("steps", _STEPS.value, min_value=0, what=" (0: the config's)")
  cli.check_int("d_model", _D_MODEL.value, min_value=0, what=" (0: the config's)")
  cli.check_int("examples", _EXAMPLES.value, min_value=1)
  cli.int_list("factors", _FACTORS.value, min_value=1)
  cli.float_list("depths", _DEPTHS.value, min_value=0.0, max_value=1.0)
  cli.check_configs(
      (f"--mixers={name} with --train_len={_TRAIN_LEN.value} --steps={_STEPS.value} "
       f"--d_model={_D_MODEL.value}",
       mixer_config(name, train_len=_TRAIN_LEN.value, steps=_STEPS.value,
                    d_model=_D_MODEL.value)) for name in _MIXERS.value)
  cli.check_outputs(_RUNS.value, _OUT.value)


def cli_main(argv=None) -> int:
  """``python -m experiments.needle`` in-process: the exit status; bad input is one line on
  stderr (experiments/cli.py)."""
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


def mixer_config(name: str, *, train_len: int, steps: int = 0, d_model: int = 0):
  c = passkey_config.get_config(name)
  c.data.seq_len = train_len
  if steps:
    c.train.steps = steps
    c.train.warmup_steps = min(c.train.warmup_steps, steps // 10)
    c.train.eval_every = c.train.checkpoint_every = steps
  if d_model:
    c.model.d_model = d_model
  return c


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  lengths = [_TRAIN_LEN.value * int(f) for f in _FACTORS.value]
  depths = [float(d) for d in _DEPTHS.value]
  os.makedirs(_OUT.value, exist_ok=True)
  rows = []
  for name in _MIXERS.value:
    workdir = os.path.join(_RUNS.value, name.replace(",", "+"))
    c = mixer_config(name, train_len=_TRAIN_LEN.value, steps=_STEPS.value,
                     d_model=_D_MODEL.value)
    s = train.run(c, workdir)
    model, config = generate.load_model(workdir)
    grid = needle.needle_grid(model, config.data, lengths=lengths, depths=depths,
                              num_examples=_EXAMPLES.value, progress=True)
    needle.plot_heatmap(grid, os.path.join(_OUT.value, f"heatmap_{name.replace(',', '+')}.png"),
                        title=name, train_len=_TRAIN_LEN.value)
    by_length = np.asarray(grid["retrieved"]).mean(axis=0)
    rows.append({"mixer": name, "num_params": s["num_params"], "state_size": s["state_size"],
                 "train_eval_accuracy": s["eval_accuracy"], "grid": grid,
                 "by_length": {str(n): float(v) for n, v in zip(lengths, by_length)}})
    print(f"{name}: " + "  ".join(f"{n}: {v:.2f}" for n, v in zip(lengths, by_length)),
          flush=True)
  needle.plot_by_length({r["mixer"]: {int(k): v for k, v in r["by_length"].items()}
                         for r in rows}, os.path.join(_OUT.value, "by_length.png"),
                        train_len=_TRAIN_LEN.value, title="passkey retrieval vs length")
  c = mixer_config("attention", train_len=_TRAIN_LEN.value, steps=_STEPS.value,
                   d_model=_D_MODEL.value)
  lines = [
      f"# Needle in a haystack (passkey, {c.data.passkey_len} digits, noise haystack)",
      "",
      f"Made by `python -m experiments.needle` (`configs/passkey.py:<name>`: d_model "
      f"{c.model.d_model}, {c.model.num_layers} layers, trained at length {_TRAIN_LEN.value} "
      f"for {c.train.steps} steps, batch {c.data.batch_size}; 2-core CPU). Cells: fraction of "
      f"held-out examples whose whole passkey is retrieved, averaged over needle depths "
      f"{', '.join(_DEPTHS.value)} ({_EXAMPLES.value} examples per depth and length).",
      "",
      "| model | params | state / seq | " + " | ".join(
          f"{n} ({n // _TRAIN_LEN.value}x)" for n in lengths) + " |",
      "|---|---|---|" + "---|" * len(lengths),
  ]
  for r in rows:
    lines.append(f"| {r['mixer']} | {r['num_params']:,} | {r['state_size']:,} | " + " | ".join(
        f"{r['by_length'][str(n)]:.2f}" for n in lengths) + " |")
  base = os.path.basename(_OUT.value)
  lines += ["", f"![retrieval by length]({base}/by_length.png)", ""]
  lines += [f"![{r['mixer']}]({base}/heatmap_{r['mixer'].replace(',', '+')}.png)" for r in rows]
  text = "\n".join(lines) + "\n"
  with open(_OUT.value + ".md", "w", encoding="utf-8") as f:
    f.write(text)
  outputs = [_OUT.value + ".md", os.path.join(_OUT.value, "by_length.png")] + [
      os.path.join(_OUT.value, f"heatmap_{r['mixer'].replace(',', '+')}.png") for r in rows]
  with open(os.path.join(_OUT.value, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(provenance.attach(rows, code=CODE, outputs=outputs), f, indent=2)
  print(text)


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
