"""Length extrapolation: held-out loss / accuracy of a trained run vs sequence length.

    python -m experiments.extrapolation --workdir=runs/needle/attention --lengths=1x,2x,4x
    python -m experiments.extrapolation --workdir=runs/mqar_table/gla --lengths=64,128,512 \\
        --examples=512 --out=results/extrapolation/mqar_gla

``--workdir`` is a finished (or checkpointed) run of ``experiments.train``: its
``config.json`` and newest checkpoint (or ``--step``) are loaded. ``--lengths`` are multiples
of the training length (``2x``) or absolute lengths (``512``), mixed freely. At each length
the run's own task is regenerated with ``data.seq_len`` set to that length and every other
data field unchanged (so MQAR keeps its number of pairs and gets more filler, passkey a
longer haystack, joint recall more left padding; a text corpus is re-packed into longer
rows), on the run's held-out stream (``eval.seed``, the examples the run's own evaluation
used), and scored with the trainer's masked loss (:func:`lcm.train.loss_and_metrics`): at
the training length with ``--examples`` equal to ``eval.num_examples`` the numbers are the
run's final evaluation. Writes ``<out>.json`` (with its provenance: ``lcm.provenance``) and
``<out>.png`` (loss and accuracy vs length, a vertical line at the training length) and prints
a table; ``--out`` defaults to ``results/extrapolation/<run name>``.

Python API: :func:`parse_lengths`, :func:`extrapolate`, :func:`plot`, :func:`table`.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from layers.common import ConfigError
from lcm import provenance

__all__ = ["parse_lengths", "extrapolate", "plot", "table"]

# What the numbers depend on (lcm.provenance): the model code and this driver (the trained
# run itself lives in --workdir, outside the repository).
CODE = ("kernels", "layers", "lcm", "experiments/extrapolation.py")


def parse_lengths(text: str | Sequence[str], train_len: int) -> list[int]:
  """``"1x,2x,512"`` -> ``[train_len, 2 * train_len, 512]`` (order kept, duplicates dropped)."""
  items = text.split(",") if isinstance(text, str) else list(text)
  out: list[int] = []
  for item in (str(s).strip() for s in items):
    if not item:
      continue
    try:
      if item.lower().endswith("x"):
        factor = float(item[:-1])
        n = factor * train_len
        if factor <= 0 or n != int(n):
          raise ValueError
        n = int(n)
      else:
        n = int(item)
    except ValueError:
      raise ConfigError("lengths", f"{item!r} is neither a positive multiple of the training "
                        f"length ({train_len}) like '2x' nor a length like '512'") from None
    if n < 1:
      raise ConfigError("lengths", f"lengths must be >= 1, got {item!r}")
    if n not in out:
      out.append(n)
  if not out:
    raise ConfigError("lengths", "no lengths given")
  return out


def _metrics_fn(model: nnx.Module):
  """jit(params, batch) -> masked nll / correct / count sums (the trainer's eval loss)."""
  from lcm import train  # pylint: disable=import-outside-toplevel
  graphdef, params = nnx.split(model)

  @jax.jit
  def fn(p, batch):
    logits = nnx.merge(graphdef, p)(batch["inputs"], batch.get("segment_ids"))
    _, aux = train.loss_and_metrics(logits, batch)
    return aux
  return fn, params


def _run_step(workdir: str) -> int | None:
  from lcm import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def extrapolate(workdir: str, lengths: str | Sequence[Any], *, num_examples: int = 0,
                batch_size: int = 0, step: int | None = None, eval_seed: int | None = None,
                progress: bool = False) -> dict[str, Any]:
  """Held-out loss and accuracy of the run in ``workdir`` at each of ``lengths``.

  ``lengths``: a string / list for :func:`parse_lengths` (``"1x,2x"``, ``[64, 128]``).
  ``num_examples`` (0: the run's ``eval.num_examples``) examples per length from the run's
  held-out stream (``eval_seed`` overrides ``eval.seed``), in batches of ``batch_size``
  (0: ``eval.batch_size``; reduced to a divisor of ``num_examples``). Returns a dict with
  ``lengths``, ``loss``, ``accuracy``, ``tokens`` (scored targets) per length and the run's
  ``train_len``, ``step``, ``task`` and own final evaluation (``run_eval_*``, if any).
  """
  from lcm import generate  # pylint: disable=import-outside-toplevel
  from lcm.data import pipeline  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  step = _run_step(workdir) if step is None else step
  model, config = generate.load_model(workdir, step=step)
  train_len = int(config.data.seq_len)
  lengths = parse_lengths(lengths if isinstance(lengths, str) else [str(x) for x in lengths],
                          train_len)
  n = int(num_examples or config.eval.num_examples)
  bs = math.gcd(n, int(batch_size or config.eval.batch_size))
  seed = int(config.eval.seed if eval_seed is None else eval_seed)
  fn, params = _metrics_fn(model)
  rows = []
  for length in lengths:
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.seq_len = int(length)
    batches = pipeline.eval_batches(data, seed=seed, num_examples=n, batch_size=bs)
    nll = correct = count = 0.0
    for b in batches:
      aux = jax.device_get(fn(params, {k: jnp.asarray(v) for k, v in b.items()}))
      nll += float(aux["nll_sum"])
      correct += float(aux["correct_sum"])
      count += float(aux["count"])
    denom = max(count, 1.0)
    rows.append({"length": int(length), "loss": nll / denom, "accuracy": correct / denom,
                 "tokens": int(count)})
    if progress:
      print(f"  length {length}: loss {nll / denom:.4f} accuracy {correct / denom:.4f}",
            flush=True)
  out = {
      "workdir": os.path.abspath(workdir), "run": os.path.basename(os.path.normpath(workdir)),
      "step": int(step), "task": str(config.data.task), "pattern": str(config.model.pattern),
      "train_len": train_len, "examples": n, "batch_size": bs, "eval_seed": seed,
      "lengths": [r["length"] for r in rows],
      "multiples": [r["length"] / train_len for r in rows],
      "loss": [r["loss"] for r in rows], "accuracy": [r["accuracy"] for r in rows],
      "tokens": [r["tokens"] for r in rows],
  }
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      s = json.load(f)
    out["run_eval_loss"] = s.get("eval_loss")
    out["run_eval_accuracy"] = s.get("eval_accuracy")
    out["run_eval_examples"] = int(config.eval.num_examples)
  out["seconds"] = round(time.time() - t0, 1)
  return out


def plot(result: dict[str, Any], path: str) -> None:
  """Loss and accuracy vs length (log-2 x axis), a dashed line at the training length."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  xs = result["lengths"]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
  for ax, key, label in ((ax1, "loss", "held-out loss (nats)"), (ax2, "accuracy", "accuracy")):
    ax.plot(xs, result[key], "o-")
    ax.axvline(result["train_len"], color="gray", ls="--", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  ax2.set_ylim(-0.02, 1.02)
  ax1.legend(fontsize=8)
  fig.suptitle(f"{result['run']} ({result['task']}, {result['pattern']}, step "
               f"{result['step']})", fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def table(result: dict[str, Any]) -> str:
  """A Markdown table: length, multiple of the training length, loss, accuracy."""
  lines = ["| length | x train | loss | accuracy | scored tokens |", "|---|---|---|---|---|"]
  for n, m, l, a, t in zip(result["lengths"], result["multiples"], result["loss"],
                           result["accuracy"], result["tokens"]):
    lines.append(f"| {n} | {m:g} | {l:.4f} | {a:.4f} | {t} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  out = _OUT.value or os.path.join(
      "results", "extrapolation", os.path.basename(os.path.normpath(workdir)))
  result = extrapolate(workdir, _LENGTHS.value, num_examples=_EXAMPLES.value,
                       batch_size=_BATCH.value, step=_STEP.value, progress=True)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  plot(result, out + ".png")
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(provenance.attach(result, code=CODE, outputs=[out + ".png"]), f, indent=1)
  print(f"{result['run']}: task {result['task']}, pattern {result['pattern']}, step "
        f"{result['step']}, trained at length {result['train_len']}, {result['examples']} "
        f"held-out examples per length")
  print(table(result) + f"-> {out}.json, {out}.png")


def _define_flags(fv=None) -> None:
  """Flags only when run as a program (tests import this next to other experiments); in
  ``fv`` (default: absl's global flags)."""
  global _WORKDIR, _LENGTHS, _EXAMPLES, _BATCH, _STEP, _OUT
  from absl import flags  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS if fv is None else fv
  _WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (experiments.train).",
                                 flag_values=fv)
  _LENGTHS = flags.DEFINE_list("lengths", ["1x", "2x", "4x"],
                               "Multiples of the training length (2x) or lengths (512).",
                               flag_values=fv)
  _EXAMPLES = flags.DEFINE_integer("examples", 0, "Held-out examples per length (0: the "
                                   "run's eval.num_examples).", flag_values=fv)
  _BATCH = flags.DEFINE_integer("batch_size", 0, "Eval batch (0: the run's eval.batch_size).",
                                flag_values=fv)
  _STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).",
                               flag_values=fv)
  _OUT = flags.DEFINE_string("out", "", "Output prefix (default results/extrapolation/<run>).",
                             flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)


def _check() -> None:
  """Before loading the model: the workdir holds a run with a checkpoint (at --step), the
  lengths parse against its training length, the counts are >= 0, the output is writable."""
  from experiments import cli  # pylint: disable=import-outside-toplevel
  from lcm import generate  # pylint: disable=import-outside-toplevel
  cli.check_int("examples", _EXAMPLES.value, min_value=0, what=" (0: the run's "
                "eval.num_examples)")
  cli.check_int("batch_size", _BATCH.value, min_value=0, what=" (0: the run's "
                "eval.batch_size)")
  if _STEP.value is not None:
    cli.check_int("step", _STEP.value, min_value=0)
  cli.check_run_workdir("workdir", _WORKDIR.value, step=_STEP.value)
  config = generate.load_config(_WORKDIR.value)
  try:
    parse_lengths(_LENGTHS.value, int(config.data.seq_len))
  except ConfigError as e:
    raise cli.CommandLineError(f"--{e}") from None
  if _OUT.value:
    cli.check_out_prefix("out", _OUT.value)


def cli_main(argv=None) -> int:
  """``python -m experiments.extrapolation`` in-process: the exit status; bad input is one
  line on stderr (experiments/cli.py)."""
  from experiments import cli  # pylint: disable=import-outside-toplevel
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.use_absl_handler()
  sys.exit(cli_main(sys.argv))
