"""Zoology at CPU scale: MQAR accuracy vs model width and vs recurrent state size.

    python -m experiments.reproduce_zoology                      # the committed results
    python -m experiments.reproduce_zoology --mixers=attention,mamba2 --widths=32,64,128 \\
        --lrs=1e-3,3e-3 --seq_len=128 --num_kv_pairs=8 --steps=2000 --out=results/zoology_big

Arora et al. 2023 ("Zoology") train every architecture on MQAR at several widths, take the
best of a small learning-rate sweep per (architecture, width), and plot accuracy against
width; the Based paper (Arora et al. 2024) plots recall accuracy against recurrent state
size. Here each (mixer, width, lr) is ``configs/mqar.py:<mixer>`` with ``d_model``, the
learning rate, the sequence length, the number of key-value pairs and the steps overridden
(2 layers, vocab 256, batch 64), run by :mod:`experiments.sweep` (resumable: finished runs in
``--runs`` are reused). Outputs: ``<out>.csv`` and ``<out>.md`` (best over learning rates per
mixer and width, and the state size), ``<out>/all_runs.csv`` / ``.md`` (every run),
``<out>/accuracy_vs_width.png``, ``<out>/accuracy_vs_state.png`` and ``<out>.json`` (the best
rows, ``rows``, and every run, ``all_runs``, with their provenance: ``lcm.provenance``).
Mixers that are not registered (e.g. ``landmark`` before it exists) are reported as missing,
not silently dropped.
"""

from __future__ import annotations

import os

from absl import flags, logging

from configs import mqar
from experiments import cli, sweep
from lcm import registry

# What the figures depend on (lcm.provenance): the model, the configs, these drivers.
CODE = ("kernels", "layers", "lcm", "configs", "experiments/reproduce_zoology.py",
        "experiments/sweep.py")

DEFAULT_MIXERS = ["attention", "based", "mamba", "mamba2", "gla", "deltanet", "gated_deltanet",
                  "titans_lmm", "landmark"]



def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The flags, in ``fv`` (a fresh one per :func:`cli_main` call; tests import this module
  next to other experiments whose flags share names)."""
  global _MIXERS, _WIDTHS, _LRS, _SEEDS, _SEQ, _KV, _STEPS, _RUNS, _OUT
  _MIXERS = flags.DEFINE_list("mixers", DEFAULT_MIXERS, "Mixers to compare.", flag_values=fv)
  _WIDTHS = flags.DEFINE_list("widths", ["32", "64"], "Model widths (d_model).",
                              flag_values=fv)
  _LRS = flags.DEFINE_list("lrs", ["3e-3"], "Learning rates; the best per (mixer, width) "
                           "counts.", flag_values=fv)
  _SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds; with more than one, the table "
                             "gives the mean and range over seeds of the best-over-lr "
                             "accuracy.", flag_values=fv)
  _SEQ = flags.DEFINE_integer("seq_len", 64, "Sequence length.", flag_values=fv)
  _KV = flags.DEFINE_integer("num_kv_pairs", 4, "Key-value pairs per example.", flag_values=fv)
  _STEPS = flags.DEFINE_integer("steps", 1000, "Training steps per run.", flag_values=fv)
  _RUNS = flags.DEFINE_string("runs", "runs/zoology", "Workdirs root.", flag_values=fv)
  _OUT = flags.DEFINE_string("out", "results/zoology", "Output prefix.", flag_values=fv)


def _check() -> None:
  """Before any training: mixers (a name of DEFAULT_MIXERS that is not registered is skipped
  with a note, as documented; any other unknown name is refused), widths, learning rates,
  counts, every grid point's config and the output paths."""
  names = [m.strip() for m in _MIXERS.value]
  known = [m for m in names if m in registry.names()]
  cli.check_mixers("mixers", [m for m in names if m not in DEFAULT_MIXERS] or known or names)
  if not known:
    raise cli.CommandLineError(f"--mixers: none of {', '.join(names) or 'them'} is registered "
                               f"(registered: {', '.join(registry.names())})")
  widths = cli.int_list("widths", _WIDTHS.value, min_value=1)
  lrs = cli.float_list("lrs", _LRS.value, above=0.0)
  cli.int_list("seeds", _SEEDS.value, min_value=0)
  cli.check_int("seq_len", _SEQ.value, min_value=1)
  cli.check_int("num_kv_pairs", _KV.value, min_value=1)
  cli.check_int("steps", _STEPS.value, min_value=1)
  base = base_config(_STEPS.value, _SEQ.value, _KV.value)
  grid = {"model.pattern": known, "model.d_model": widths, "train.lr": lrs[:1]}
  cli.check_configs(
      (f"--mixers / --widths: {point['model.pattern']} at width {point['model.d_model']} "
       f"(--seq_len={_SEQ.value} --num_kv_pairs={_KV.value})",
       sweep.apply_overrides(base, point)) for point in sweep.expand_grid(grid))
  cli.check_outputs(_RUNS.value, _OUT.value)


def cli_main(argv=None) -> int:
  """``python -m experiments.reproduce_zoology`` in-process: the exit status; bad input is one
  line on stderr (experiments/cli.py)."""
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


def base_config(steps: int, seq_len: int, num_kv_pairs: int):
  c = mqar.get_config("attention")
  c.data.seq_len, c.data.num_kv_pairs = seq_len, num_kv_pairs
  c.train.steps = steps
  c.train.warmup_steps = min(c.train.warmup_steps, steps // 10)
  c.train.eval_every = c.train.checkpoint_every = max(1, min(500, steps))
  return c


def best_per_width(rows: list[dict]) -> list[dict]:
  """The best run over learning rates for every (mixer, width[, seed]), in mixer then width
  order."""
  best: dict[tuple, dict] = {}
  for r in rows:
    key = (r["model.pattern"], r["model.d_model"], r.get("seed"))
    if key not in best or (r["best_accuracy"] or 0) > (best[key]["best_accuracy"] or 0):
      best[key] = r
  return list(best.values())


def over_seeds(best: list[dict]) -> list[dict]:
  """One row per (mixer, width): mean, min and max over seeds of the best-over-lr accuracy
  (``best_accuracy`` is the mean, so the plots and tables read it as before)."""
  groups: dict[tuple, list[dict]] = {}
  for r in best:
    if r.get("best_accuracy") is not None:
      groups.setdefault((r["model.pattern"], r["model.d_model"]), []).append(r)
  out = []
  for (mixer, width), rs in groups.items():
    acc = [r["best_accuracy"] for r in rs]
    out.append({**{k: v for k, v in rs[0].items() if k not in ("seed", "workdir")},
                "best_accuracy": sum(acc) / len(acc), "accuracy_min": min(acc),
                "accuracy_max": max(acc), "seeds": len(acc),
                "accuracy_per_seed": [round(a, 4) for a in acc]})
  return out


def plot(best: list[dict], out_dir: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  best = [r for r in best if r.get("best_accuracy") is not None]  # failed runs: no point
  mixers = list(dict.fromkeys(r["model.pattern"] for r in best))
  for xkey, fname, xlabel, log in (
      ("model.d_model", "accuracy_vs_width.png", "model width (d_model)", True),
      ("state_size", "accuracy_vs_state.png",
       "recurrent state per sequence (elements; KV cache for attention)", True)):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in mixers:
      pts = sorted((r[xkey], r["best_accuracy"]) for r in best if r["model.pattern"] == m)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    if log:
      ax.set_xscale("log", base=2 if xkey == "model.d_model" else 10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MQAR accuracy (best over learning rates)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, fname), dpi=120)
    plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  missing = [m for m in _MIXERS.value if m not in registry.names()]
  mixers = [m for m in _MIXERS.value if m not in missing]
  if missing:
    print(f"not registered (skipped): {', '.join(missing)}", flush=True)
  base = base_config(_STEPS.value, _SEQ.value, _KV.value)
  grid = {"model.pattern": mixers, "model.d_model": [int(w) for w in _WIDTHS.value],
          "train.lr": [float(x) for x in _LRS.value]}
  seeds = [int(x) for x in _SEEDS.value]
  if seeds != [0]:
    grid["seed"] = seeds
  rows = sweep.run_grid(base, sweep.expand_grid(grid), _RUNS.value)
  os.makedirs(_OUT.value, exist_ok=True)
  sweep.write_table(rows, os.path.join(_OUT.value, "all_runs"), list(grid))
  best = best_per_width(rows)
  columns = ("best_accuracy", "best_step", "num_params", "state_size", "tokens_per_second")
  if "seed" in grid:
    best = over_seeds(best)
    columns = ("best_accuracy", "accuracy_min", "accuracy_max", "seeds", "num_params",
               "state_size", "tokens_per_second")
  setting = (f"seq {_SEQ.value}, {_KV.value} kv pairs, vocab 256, 2 layers, {_STEPS.value} "
             f"steps, batch 64, lr in {{{', '.join(_LRS.value)}}}"
             + (f", training seeds {{{', '.join(map(str, seeds))}}}: best_accuracy is their "
                "mean, min / max their range" if "seed" in grid else ""))
  note = (f"Made by `python -m experiments.reproduce_zoology` ({setting}; held-out accuracy "
          "on 1024 examples, best over evaluations and learning rates; 2-core CPU)."
          + (f" Not registered, so not run: {', '.join(missing)}." if missing else "")
          + "".join(f" FAILED (run again to retry): {os.path.basename(r['workdir'])}: {r['error']}."
                    for r in rows if r.get("error")))
  text = sweep.write_table(best, _OUT.value, ["model.pattern", "model.d_model", "train.lr"],
                           columns=columns,
                           title="MQAR accuracy vs width (Zoology at CPU scale)", note=note)
  name = os.path.basename(_OUT.value)
  text += (f"\n![accuracy vs width]({name}/accuracy_vs_width.png)\n"
           f"![accuracy vs state]({name}/accuracy_vs_state.png)\n")
  with open(_OUT.value + ".md", "w", encoding="utf-8") as f:
    f.write(text)
  plot(best, _OUT.value, f"MQAR ({setting})")
  all_runs = os.path.join(_OUT.value, "all_runs")
  sweep.write_json(best, _OUT.value, code=CODE, all_runs=rows, outputs=[
      _OUT.value + ".csv", _OUT.value + ".md", all_runs + ".csv", all_runs + ".md",
      os.path.join(_OUT.value, "accuracy_vs_width.png"),
      os.path.join(_OUT.value, "accuracy_vs_state.png")])
  print(text)


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
