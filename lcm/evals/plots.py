"""Plots of a run's metrics (matplotlib, Agg backend: works headless and in Colab)."""

from __future__ import annotations

import os

from lcm import metrics as metrics_lib


def plot_training_curves(workdir: str, out: str | None = None) -> str:
  """Train loss / accuracy and eval accuracy vs step from ``workdir/metrics.jsonl``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  last = {}
  for r in rows:  # a resumed run re-logs some steps: the last write wins
    last[(r["split"], r["step"])] = r
  train = sorted((s, r) for (sp, s), r in last.items() if sp == "train")
  evals = sorted((s, r) for (sp, s), r in last.items() if sp == "eval")
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
  ax1.plot([s for s, _ in train], [r["loss"] for _, r in train], label="train")
  if evals:
    ax1.plot([s for s, _ in evals], [r["loss"] for _, r in evals], "o-", label="eval")
  ax1.set_yscale("log")
  ax1.set_xlabel("step")
  ax1.set_ylabel("loss (answer positions)")
  ax1.legend()
  ax2.plot([s for s, _ in train], [r["accuracy"] for _, r in train], label="train", alpha=0.6)
  if evals:
    ax2.plot([s for s, _ in evals], [r["accuracy"] for _, r in evals], "o-", label="eval")
  ax2.set_ylim(0, 1.02)
  ax2.set_xlabel("step")
  ax2.set_ylabel("accuracy")
  ax2.legend()
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  out = out or os.path.join(workdir, "curves.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def plot_loss_by_position(workdir: str, out: str | None = None, *,
                          runs: dict[str, str] | None = None) -> str:
  """Eval loss vs position inside the document (``loss_by_position.json`` of one run, or of
  several: ``runs = {label: workdir}``): a falling curve means the layer uses context."""
  import json  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  runs = runs or {os.path.basename(os.path.abspath(workdir)): workdir}
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for label, wd in runs.items():
    with open(os.path.join(wd, "loss_by_position.json"), encoding="utf-8") as f:
      d = json.load(f)
    loss, count = np.asarray(d["loss"]), np.asarray(d["count"])
    # Count-weighted means over log-spaced position bins (single positions are noisy).
    edges = np.unique(np.geomspace(1, len(loss) + 1, num=24).astype(int))
    xs, ys = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
      c = count[lo - 1:hi - 1]
      if c.sum() > 0:
        xs.append(np.sqrt(lo * (hi - 1)) if hi - 1 > lo else lo)
        ys.append(float((loss[lo - 1:hi - 1] * c).sum() / c.sum()))
    ax.plot(xs, ys, "o-", ms=3, label=label)
  ax.set_xscale("log")
  ax.set_xlabel("position in document (tokens of context + 1)")
  ax.set_ylabel("eval loss (nats / token)")
  ax.legend()
  fig.tight_layout()
  out = out or os.path.join(workdir, "loss_by_position.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
