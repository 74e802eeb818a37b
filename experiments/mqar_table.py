"""MQAR accuracy of every mixer at the default config -> results/mqar.md (+ a plot).

    python -m experiments.mqar_table                         # every registered mixer
    python -m experiments.mqar_table --mixers=gla,mamba2 --steps=3000 --out=results/mqar_long

Each mixer is trained with ``configs/mqar.py:<name>`` unchanged (2 layers, d_model 64,
seq 64, 4 kv pairs, vocab 256, 1500 steps, evaluation on 1024 held-out examples every 500
steps) except for ``--steps``; the table reports the *best* held-out accuracy over the
evaluations (and the step it came at), the final one, the recurrent state per sequence and
the training throughput. Runs live in ``--runs/<mixer>`` and resume, so an interrupted table
continues where it stopped. Writes ``<out>.md``, ``<out>/summary.json`` (the rows, with their
provenance: ``lcm.provenance``) and ``<out>/accuracy_vs_state.png`` (best accuracy against
state size, the Zoology plot).
"""

from __future__ import annotations

import json
import os

from absl import flags, logging

from configs import mqar
from experiments import cli
from lcm import provenance, registry, train

# What the table depends on (lcm.provenance): the model, the configs, this driver.
CODE = ("kernels", "layers", "lcm", "configs", "experiments/mqar_table.py")



def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The flags, in ``fv`` (a fresh one per :func:`cli_main` call; tests import this module
  next to other experiments whose flags share names)."""
  global _MIXERS, _STEPS, _RUNS, _OUT
  _MIXERS = flags.DEFINE_list("mixers", None, "Mixer patterns (default: every registered "
                              "name).", flag_values=fv)
  _STEPS = flags.DEFINE_integer("steps", 0, "Training steps per mixer (0: the config's 1500).",
                                flag_values=fv)
  _RUNS = flags.DEFINE_string("runs", "runs/mqar_table", "Workdirs root.", flag_values=fv)
  _OUT = flags.DEFINE_string("out", "results/mqar", "Output prefix (<out>.md and <out>/).",
                             flag_values=fv)


def _check() -> None:
  """Before any training: mixers, steps, every mixer's config, the output paths."""
  if _MIXERS.value is not None:
    cli.check_mixers("mixers", _MIXERS.value)
  cli.check_int("steps", _STEPS.value, min_value=0, what=" (0: the config's)")
  cli.check_configs((f"--mixers={name}", mixer_config(name, _STEPS.value))
                    for name in _MIXERS.value or registry.names())
  cli.check_outputs(_RUNS.value, _OUT.value)


def cli_main(argv=None) -> int:
  """``python -m experiments.mqar_table`` in-process: the exit status; bad input is one line on
  stderr (experiments/cli.py)."""
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


def mixer_config(name: str, steps: int = 0):
  c = mqar.get_config(name)
  if steps:
    c.train.steps = steps
    c.train.warmup_steps = min(c.train.warmup_steps, steps // 10)
    c.train.eval_every = c.train.checkpoint_every = max(1, min(500, steps))
  return c


def eval_history(workdir: str) -> list[dict]:
  """The eval records of ``workdir/metrics.jsonl`` (one per evaluation), in step order."""
  rows = []
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if r.get("split") == "eval":
        rows.append(r)
  # A resumed run may have written an evaluation twice; keep the last record per step.
  return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def plot_accuracy_vs_state(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for r in rows:
    ax.scatter(r["state_size"], r["best_accuracy"])
    ax.annotate(r["mixer"], (r["state_size"], r["best_accuracy"]), fontsize=8,
                xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("recurrent state per sequence (elements, all layers; KV cache for attention)")
  ax.set_ylabel("best held-out MQAR accuracy")
  ax.set_ylim(0, 1.05)
  ax.grid(alpha=0.3)
  ax.set_title("MQAR, seq 64, 4 kv pairs, d_model 64, 2 layers")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def table(rows: list[dict], steps: int) -> str:
  lines = [
      "# MQAR at the default config, every mixer",
      "",
      "Made by `python -m experiments.mqar_table` (`configs/mqar.py:<name>`: 2 layers, "
      f"d_model 64, seq 64, 4 kv pairs, vocab 256, {steps} steps, batch 64, AdamW lr 3e-3; "
      "held-out accuracy on 1024 examples of another seed; 2-core CPU).",
      "",
      "| mixer | params | state / seq (elements) | best acc | at step | final acc | "
      "final eval loss | train tok/s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in sorted(rows, key=lambda r: (-r["best_accuracy"], r["state_size"])):
    lines.append(
        f"| {r['mixer']} | {r['num_params']:,} | {r['state_size']:,} | "
        f"{r['best_accuracy']:.4f} | {r['best_step']} | {r['eval_accuracy']:.4f} | "
        f"{r['eval_loss']:.4f} | {r['tokens_per_second']:.0f} |")
  return "\n".join(lines)


def write_outputs(rows: list[dict], out: str, steps: int) -> str:
  """Writes ``<out>/accuracy_vs_state.png``, ``<out>.md`` and ``<out>/summary.json`` (the rows
  with their provenance, which names the other two); returns the Markdown."""
  os.makedirs(out, exist_ok=True)
  png, md = os.path.join(out, "accuracy_vs_state.png"), out + ".md"
  plot_accuracy_vs_state(rows, png)
  text = table(rows, steps) + (
      f"\n\n![accuracy vs state]({os.path.basename(out)}/accuracy_vs_state.png)\n")
  with open(md, "w", encoding="utf-8") as f:
    f.write(text)
  with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(provenance.attach(rows, code=CODE, outputs=[md, png]), f, indent=2)
  return text


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  names = _MIXERS.value or registry.names()
  rows = []
  for name in names:
    workdir = os.path.join(_RUNS.value, name.replace(",", "+"))
    c = mixer_config(name, _STEPS.value)
    s = train.run(c, workdir)
    history = eval_history(workdir)
    best = max(history, key=lambda r: r["accuracy"]) if history else {
        "accuracy": s["eval_accuracy"], "step": s["steps"]}
    rows.append({"mixer": name, "workdir": workdir, "best_accuracy": best["accuracy"],
                 "best_step": best["step"],
                 **{k: v for k, v in s.items() if k != "config"}})
    print(f"{name}: best {best['accuracy']:.4f} at step {best['step']}", flush=True)
  steps = _STEPS.value or mqar.get_config().train.steps
  print(write_outputs(rows, _OUT.value, steps))


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
