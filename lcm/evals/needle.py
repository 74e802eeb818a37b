"""Needle in a haystack: passkey retrieval accuracy of a trained LM by length and depth.

    model, config = lcm.generate.load_model("runs/passkey_attention")
    grid = needle_grid(model, config.data, lengths=[256, 512, 1024], depths=[0, .5, 1])
    plot_heatmap(grid, "needle.png", title="attention")

The model is evaluated on the passkey task (:mod:`lcm.data.tasks.passkey`) at lengths it may
never have been trained on; examples come from the held-out stream
(``pipeline.eval_seed(seed)``). One forward pass per batch (teacher forcing) gives the
``K`` digit predictions at the answer positions; an example is *retrieved* when all ``K``
are right (the same event as a correct greedy decode of the passkey).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lcm.data import pipeline
from lcm.data.tasks.passkey import passkey_example

__all__ = ["passkey_accuracy", "needle_grid", "plot_heatmap", "plot_by_length"]

_FORWARDS: dict[Any, Any] = {}


def _forward(model: nnx.Module, k: int):
  """jit(params, inputs) -> argmax predictions at the last ``k`` positions (cached)."""
  graphdef, params = nnx.split(model)
  key = (graphdef, k)
  if key not in _FORWARDS:
    def fwd(p, inputs):
      logits = nnx.merge(graphdef, p)(inputs)
      return jnp.argmax(logits[:, -k:], axis=-1)
    _FORWARDS[key] = jax.jit(fwd)
  return _FORWARDS[key], params


def passkey_accuracy(model: nnx.Module, data_cfg: Any, *, seq_len: int, depth: float = -1.0,
                     num_examples: int = 64, batch_size: int = 16,
                     seed: int = 0) -> dict[str, float]:
  """Retrieval rate and digit accuracy of ``model`` on passkey examples of ``seq_len``.

  ``data_cfg`` supplies ``vocab_size`` and ``passkey_len`` (a training config's ``data``);
  ``depth`` places the needle (negative: uniform per example).
  """
  cfg = dataclasses.replace(pipeline.passkey_config(data_cfg), seq_len=int(seq_len),
                            needle_depth=float(depth),
                            max_tail=0).validate("data")  # the question ends the sequence
  k = cfg.passkey_len
  fwd, params = _forward(model, k)
  stream = pipeline.eval_seed(seed)
  retrieved, digits, n = 0, 0, 0
  for start in range(0, num_examples, batch_size):
    rows = [passkey_example(i, seed=stream, **dataclasses.asdict(cfg))
            for i in range(start, min(start + batch_size, num_examples))]
    inputs = np.stack([r["inputs"] for r in rows])
    answers = np.stack([r["targets"][-k:] for r in rows])
    pred = np.asarray(fwd(params, jnp.asarray(inputs)))
    hit = pred == answers
    retrieved += int(hit.all(axis=1).sum())
    digits += int(hit.sum())
    n += len(rows)
  return {"retrieved": retrieved / n, "digit_accuracy": digits / (n * k), "examples": n}


def needle_grid(model: nnx.Module, data_cfg: Any, *, lengths: Sequence[int],
                depths: Sequence[float], num_examples: int = 32, batch_size: int = 16,
                seed: int = 0, progress: bool = False) -> dict[str, Any]:
  """``retrieved[i][j]`` at ``depths[i]`` and ``lengths[j]`` (and the digit accuracies)."""
  cells = [(i, j) for i in range(len(depths)) for j in range(len(lengths))]
  if progress:
    import tqdm  # pylint: disable=import-outside-toplevel
    cells = tqdm.tqdm(cells, desc="needle", leave=False)
  retrieved = np.zeros((len(depths), len(lengths)))
  digit = np.zeros_like(retrieved)
  for i, j in cells:
    r = passkey_accuracy(model, data_cfg, seq_len=lengths[j], depth=depths[i],
                         num_examples=num_examples, batch_size=batch_size, seed=seed)
    retrieved[i, j], digit[i, j] = r["retrieved"], r["digit_accuracy"]
  return {"lengths": [int(x) for x in lengths], "depths": [float(x) for x in depths],
          "retrieved": retrieved.tolist(), "digit_accuracy": digit.tolist(),
          "examples_per_cell": int(num_examples)}


def plot_heatmap(grid: dict[str, Any], path: str, *, title: str = "",
                 train_len: int | None = None) -> None:
  """Depth (rows) x length (columns) heatmap of the retrieval rate."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  r = np.asarray(grid["retrieved"])
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * r.shape[1], 1.0 + 0.55 * r.shape[0]))
  im = ax.imshow(r, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(r.shape[1]), [str(x) for x in grid["lengths"]])
  ax.set_yticks(range(r.shape[0]), [f"{d:.2f}" for d in grid["depths"]])
  for i in range(r.shape[0]):
    for j in range(r.shape[1]):
      ax.text(j, i, f"{r[i, j]:.2f}", ha="center", va="center", fontsize=7)
  ax.set_xlabel("sequence length" + (f" (trained at {train_len})" if train_len else ""))
  ax.set_ylabel("needle depth")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_by_length(curves: dict[str, dict[int, float]], path: str, *,
                   train_len: int | None = None, title: str = "") -> None:
  """Retrieval rate vs length, one line per model (log-x)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, pts in curves.items():
    xs = sorted(pts)
    ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
  if train_len:
    ax.axvline(train_len, color="gray", ls="--", lw=1, label="training length")
  ax.set_xscale("log", base=2)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel("sequence length")
  ax.set_ylabel("passkey retrieved")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
