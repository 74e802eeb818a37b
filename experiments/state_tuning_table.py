"""State tuning, end to end: a frozen MQAR model learns a hidden dictionary in its initial state.

    python -m experiments.state_tuning_table      # results/state_tuning.{json,md,png}

1. Trains the base model with the ordinary command, ``python -m experiments.train
   --config=configs/mqar.py:gated_deltanet`` at vocab 128, seq 32, 4 kv pairs
   (``--base_steps``, 1000 by default): 2 layers, d_model 64, ordinary MQAR.
2. Tunes its initial states, once per ``--seeds`` (the tuning seed sets the training
   stream), with ``python -m experiments.state_tuning --init_from=<base>
   --config.seed=<seed>`` (configs/state_tuning.py: MQAR with a hidden dictionary of 8 fixed
   pairs, 2 hidden keys asked per sequence beside the 4 context keys; 300 steps of 64 rows,
   AdamW lr 1e-2). The weights stay fixed.
3. Evaluates the frozen model and every tuned one on held-out examples of ``--eval_seed``
   (no tuning or in-training evaluation uses that stream), greedy, teacher-forced: accuracy
   on the hidden-dictionary queries, on the in-context queries of the same sequences, and on
   ordinary MQAR (the base task), also split by whether the queried key is one of the
   dictionary's (ordinary MQAR gives those keys other values in the context).

Runs live in ``--runs`` and resume (a finished run is not rerun). Writes ``<out>.json`` (every
number, the commands, the provenance: ``lcm.provenance``), ``<out>.md`` (the table) and
``<out>.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx

from experiments import cli
from experiments import state_tuning as state_tuning_cli
from experiments import train as train_cli
from lcm import generate, provenance, state_tuning
from lcm.data import pipeline
from lcm.data.tasks import mqar_hidden

# What the figures depend on (lcm.provenance): the model, the configs, these entry points.
CODE = ("kernels", "layers", "lcm", "configs", "experiments/train.py",
        "experiments/state_tuning.py", "experiments/state_tuning_table.py")
BASE_OVERRIDES = ("--config.data.vocab_size=128", "--config.data.seq_len=32",
                  "--config.train.progress=False")
EVAL_BATCH = 256
KINDS = ("hidden", "context", "mqar", "mqar_dict", "mqar_rest")
LABELS = {"hidden": "hidden-dictionary keys (values never in the context)",
          "context": "in-context keys, same sequences",
          "mqar": "ordinary MQAR (the base task), all queries",
          "mqar_dict": "... of which queries of a dictionary key (another value in context)",
          "mqar_rest": "... of which queries of the other keys"}
TICKS = ("hidden-dictionary\nkeys", "in-context keys\n(same sequences)", "ordinary MQAR\n(all)",
         "ordinary MQAR:\ndictionary keys", "ordinary MQAR:\nother keys")


def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  global _FLAGS
  _FLAGS = fv
  flags.DEFINE_string("runs", "runs/state_tuning", "Workdirs root (base/, seed<s>/).",
                      flag_values=fv)
  flags.DEFINE_string("out", "results/state_tuning", "Output prefix (<out>.json/.md/.png).",
                      flag_values=fv)
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Tuning seeds (one tuning run each).",
                    flag_values=fv)
  flags.DEFINE_integer("base_steps", 1000, "Training steps of the base model.",
                       flag_values=fv)
  flags.DEFINE_integer("steps", 0, "Tuning steps (0: configs/state_tuning.py's 300).",
                       flag_values=fv)
  flags.DEFINE_enum("leaves", "all", state_tuning.LEAVES, "Tuned state leaves.",
                    flag_values=fv)
  flags.DEFINE_integer("eval_examples", 2048, f"Held-out sequences per task (a multiple of "
                       f"{EVAL_BATCH}).", flag_values=fv)
  flags.DEFINE_integer("eval_seed", 2_000_003, "Seed of the held-out examples (differs from "
                       "every tuning seed and from the runs' own eval.seed).", flag_values=fv)


def _check() -> None:
  f = _FLAGS
  seeds = cli.int_list("seeds", f.seeds, min_value=0)
  if len(set(seeds)) != len(seeds):
    raise cli.CommandLineError(f"--seeds: {f.seeds} repeats a seed; give distinct seeds")
  cli.check_int("base_steps", f.base_steps, min_value=1)
  cli.check_int("steps", f.steps, min_value=0, what=" (0: the config's)")
  cli.check_int("eval_examples", f.eval_examples, min_value=EVAL_BATCH)
  if f.eval_examples % EVAL_BATCH:
    raise cli.CommandLineError(f"--eval_examples={f.eval_examples}: must be a multiple of "
                               f"{EVAL_BATCH}")
  cli.check_int("eval_seed", f.eval_seed, min_value=0, max_value=2**32 - 1)
  # held out: never a tuning stream, nor the stream the runs evaluate on during training
  streams = set(seeds) | {s + 10 for s in seeds} | {1_000_003, 1_000_013}
  if f.eval_seed in streams or pipeline.eval_seed(f.eval_seed) in streams:
    raise cli.CommandLineError(f"--eval_seed={f.eval_seed}: its examples would share a random "
                               "stream with tuning or the runs' own evaluation; pick another")
  cli.check_outputs(f.runs, f.out, makes_dir=False)


def cli_main(argv=None) -> int:
  """``python -m experiments.state_tuning_table`` in-process: the exit status."""
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest),  # pylint: disable=unnecessary-lambda
                 classify=lambda e: (1, str(e)) if isinstance(e, SubRunError) else None)


# ----------------------------------------------------------------------------- commands


class SubRunError(RuntimeError):
  """A training or tuning command of the table failed."""


def base_argv(workdir: str, steps: int) -> list[str]:
  return ["experiments.train", "--config=configs/mqar.py:gated_deltanet", *BASE_OVERRIDES,
          f"--config.train.steps={steps}", f"--config.train.warmup_steps={min(50, steps // 10)}",
          f"--config.train.eval_every={steps}", f"--config.train.checkpoint_every={steps}",
          f"--workdir={workdir}"]


def tuning_argv(base: str, workdir: str, seed: int, steps: int, leaves: str) -> list[str]:
  extra = [f"--config.train.steps={steps}", f"--config.train.warmup_steps={min(50, steps // 6)}",
           f"--config.train.eval_every={steps}",
           f"--config.train.checkpoint_every={steps}"] if steps else []
  return ["experiments.state_tuning", f"--init_from={base}", f"--workdir={workdir}",
          f"--config.seed={seed}", f"--leaves={leaves}", "--config.train.progress=False",
          *extra]


def _command(argv: list[str]) -> str:
  return "python -m " + " ".join(argv)


def _run(main, argv: list[str]) -> None:
  print(_command(argv), flush=True)
  code = main(argv)
  if code:
    raise SubRunError(f"`{_command(argv)}` exited with status {code} (its error is the line "
                      "above); fix it and rerun: finished runs are kept")


# ----------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnums=2)
def predict(params, tokens, graphdef):
  """Greedy tokens [B, T] of the model ``graphdef`` with ``params`` (compiled once per
  model structure)."""
  return jnp.argmax(nnx.merge(graphdef, params)(tokens), axis=-1)


def accuracy(model, batches: list[dict], masks: list[np.ndarray]) -> tuple[float, int]:
  """(greedy accuracy, count) of ``model`` at the ``masks`` positions of ``batches``."""
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  right = total = 0
  for b, m in zip(batches, masks):
    pred = np.asarray(predict(params, jnp.asarray(b["inputs"]), graphdef))
    right += int((pred == b["targets"])[m].sum())
    total += int(m.sum())
  return right / max(total, 1), total


def eval_sets(hidden_data, base_data, seed: int, n: int) -> dict[str, tuple[list, list]]:
  """kind -> (batches, masks): the held-out examples of ``seed`` of both tasks."""
  task = pipeline.mqar_hidden_config(hidden_data)
  hb = pipeline.eval_batches(hidden_data, seed=seed, num_examples=n, batch_size=EVAL_BATCH)
  hm = [mqar_hidden.hidden_query_mask(b["inputs"], b["loss_mask"], vocab_size=task.vocab_size,
                                      num_hidden=task.num_hidden, hidden_seed=task.hidden_seed)
        for b in hb]
  mb = pipeline.eval_batches(base_data, seed=seed, num_examples=n, batch_size=EVAL_BATCH)
  # ordinary MQAR draws its keys from the whole key range, dictionary keys included (with
  # any value): there the tuned state's prior and the context disagree
  md = [mqar_hidden.hidden_query_mask(b["inputs"], b["loss_mask"], vocab_size=task.vocab_size,
                                      num_hidden=task.num_hidden, hidden_seed=task.hidden_seed)
        for b in mb]
  return {"hidden": (hb, hm), "context": (hb, [(b["loss_mask"] > 0) & ~m
                                               for b, m in zip(hb, hm)]),
          "mqar": (mb, [b["loss_mask"] > 0 for b in mb]), "mqar_dict": (mb, md),
          "mqar_rest": (mb, [(b["loss_mask"] > 0) & ~m for b, m in zip(mb, md)])}


def evaluate(model, sets) -> dict[str, Any]:
  out = {}
  for kind, (batches, masks) in sets.items():
    out[kind], out[f"{kind}_queries"] = accuracy(model, batches, masks)
  return out


# ----------------------------------------------------------------------------- outputs


def run_starts(workdir: str) -> list[dict]:
  """Commit, dirty flag and start time of every start of a run (its history.jsonl): the
  code that trained it, which may predate the commit that evaluates it here."""
  with open(os.path.join(workdir, provenance.HISTORY_FILE), encoding="utf-8") as fh:
    return [{k: h.get(k) for k in ("commit", "dirty", "time", "resumed_from")}
            for h in map(json.loads, fh)]


def summarize(rows: list[dict]) -> dict[str, dict]:
  out = {}
  for kind in KINDS:
    v = np.array([r[kind] for r in rows])
    out[kind] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                 "min": float(v.min()), "max": float(v.max()), "seeds": len(v)}
  return out


def table(report: dict) -> str:
  frozen, summary, s = report["frozen"], report["summary"], report["setup"]
  lines = [
      "# State tuning: a frozen MQAR model learns a hidden dictionary in its initial state",
      "",
      f"Made by `{report['provenance']['command']}` (2-core CPU). Base: `{s['base_command']}` "
      f"(gated_deltanet, 2 layers, d_model 64, trained on ordinary MQAR). Tuning: "
      f"`{s['tuning_commands'][0]}` and the same with seeds {', '.join(map(str, s['seeds']))}:"
      f" only the {s['tuned_elements']:,} initial-state elements are trained "
      f"(leaves={s['leaves']}; {s['frozen_params']:,} frozen weights, unchanged), "
      f"{s['tuning_steps']} steps. Task: {s['task']['num_hidden']} hidden key -> value pairs "
      f"fixed across all sequences (hidden_seed {s['task']['hidden_seed']}), "
      f"{s['task']['hidden_queries']} asked per sequence next to the "
      f"{s['task']['num_kv_pairs']} context pairs; chance = 1/{s['task']['vocab_size'] // 2}."
      f" Held out: {s['eval_examples']} sequences per task from eval seed {s['eval_seed']} "
      "(never used for tuning), greedy.",
      "",
      f"| queries | frozen model | state-tuned: mean ± std over {len(s['seeds'])} seeds | "
      "min - max | queries per cell |",
      "|---|---|---|---|---|",
  ]
  for kind in KINDS:
    m = summary[kind]
    lines.append(f"| {LABELS[kind]} | {frozen[kind]:.4f} | {m['mean']:.4f} ± {m['std']:.4f} "
                 f"| {m['min']:.4f} - {m['max']:.4f} | {frozen[f'{kind}_queries']:,} |")
  lines += ["", "Per seed:", "", "| seed | " + " | ".join(KINDS) + " | tuning wall s |",
            "|---|" + "---|" * (len(KINDS) + 1)]
  for r in report["tuned"]:
    lines.append(f"| {r['seed']} | " + " | ".join(f"{r[k]:.4f}" for k in KINDS)
                 + f" | {r['wall_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(9, 4.2))
  x = np.arange(len(KINDS))
  ax.bar(x - 0.2, [report["frozen"][k] for k in KINDS], 0.4, label="frozen model")
  ax.bar(x + 0.2, [report["summary"][k]["mean"] for k in KINDS], 0.4,
         yerr=[report["summary"][k]["std"] for k in KINDS], capsize=4,
         label=f"state-tuned (mean ± std, {len(report['tuned'])} seeds)")
  for r in report["tuned"]:
    ax.scatter(x + 0.2, [r[k] for k in KINDS], color="k", s=8, zorder=3)
  ax.set_xticks(x, TICKS, fontsize=8)
  ax.set_ylabel("held-out accuracy")
  ax.set_ylim(0, 1.22)
  ax.set_yticks(np.linspace(0, 1, 6))
  ax.legend(loc="upper center", ncol=2, fontsize=8)
  ax.set_title("State tuning of a frozen gated_deltanet MQAR model")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  f = _FLAGS
  seeds = cli.int_list("seeds", f.seeds, min_value=0)
  base = os.path.join(f.runs, "base")
  _run(train_cli.cli_main, base_argv(base, f.base_steps))
  commands, tuned_dirs = [], []
  for seed in seeds:
    workdir = os.path.join(f.runs, f"seed{seed}")
    argv = tuning_argv(base, workdir, seed, f.steps, f.leaves)
    _run(state_tuning_cli.cli_main, argv)
    commands.append(_command(argv))
    tuned_dirs.append(workdir)

  lm, base_config = generate.load_model(base)
  first, tuned_config = state_tuning.load_tuned(tuned_dirs[0])
  sets = eval_sets(tuned_config.data, base_config.data, f.eval_seed, f.eval_examples)
  frozen = evaluate(lm, sets)
  print(f"frozen: {frozen}", flush=True)
  rows = []
  for seed, workdir in zip(seeds, tuned_dirs):
    model = first if workdir == tuned_dirs[0] else state_tuning.load_tuned(workdir)[0]
    # the tuned checkpoint's weights are the base's, bit for bit
    same = jax.tree.all(jax.tree.map(
        lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(),
        nnx.to_pure_dict(nnx.state(model.lm, nnx.Param)),
        nnx.to_pure_dict(nnx.state(lm, nnx.Param))))
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as fh:
      summary = json.load(fh)
    row = {"seed": seed, "workdir": workdir, **evaluate(model, sets),
           "frozen_weights_unchanged": bool(same), "steps": summary["steps"],
           "wall_seconds": summary["wall_seconds"],
           "in_training_eval_accuracy": summary["eval_accuracy"]}
    print(row, flush=True)
    rows.append(row)

  with open(os.path.join(base, "summary.json"), encoding="utf-8") as fh:
    base_summary = json.load(fh)
  setup = {
      "base_command": _command(base_argv(base, f.base_steps)), "tuning_commands": commands,
      "seeds": seeds, "leaves": f.leaves, "tuning_steps": rows[0]["steps"],
      "tuned_elements": state_tuning.tuned_size(first),
      "frozen_params": int(sum(np.size(x) for x in jax.tree.leaves(
          nnx.to_pure_dict(nnx.state(lm, nnx.Param))))),
      "task": dataclasses.asdict(pipeline.mqar_hidden_config(tuned_config.data)),
      "eval_seed": f.eval_seed, "eval_examples": f.eval_examples,
      "base_eval_accuracy": base_summary["eval_accuracy"],
      "base_wall_seconds": base_summary["wall_seconds"],
      "run_starts": {d: run_starts(d) for d in [base, *tuned_dirs]}}
  report = {"setup": setup, "frozen": frozen, "tuned": rows, "summary": summarize(rows)}
  md, png = f.out + ".md", f.out + ".png"
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  report = provenance.attach(report, code=CODE, outputs=[md, png])
  with open(f.out + ".json", "w", encoding="utf-8") as fh:
    json.dump(report, fh, indent=2)
  plot(report, png)
  with open(md, "w", encoding="utf-8") as fh:
    fh.write(table(report) + f"\n![state tuning]({os.path.basename(png)})\n")
  print(table(report))
  return 0


if __name__ == "__main__":
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
