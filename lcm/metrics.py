"""Metrics: JSONL in the workdir always, TensorBoard event files, a tqdm progress bar."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


def _py(v: Any):
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "dtype"):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  return v


class MetricsWriter:
  """Writes scalars to ``<workdir>/metrics.jsonl`` and TensorBoard (``<workdir>/tb``).

  Only process 0 writes. Appends on resume; rows carry ``step`` and ``split``.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._f = open(self.path, "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, scalars: Mapping[str, Any], split: str = "train") -> None:
    if not self.active:
      return
    row = {"step": int(step), "split": split, "time": time.time()}
    row.update({k: _py(v) for k, v in scalars.items()})
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "split", "time") and isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def close(self) -> None:
    if self.active:
      self._f.close()
      if self._tb is not None:
        self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A tqdm bar over training steps showing loss, accuracy, tokens/s; ETA from tqdm."""

  def __init__(self, total: int, initial: int, *, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self._bar = None
    if self.enabled:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                       mininterval=1.0)

  def update(self, done: int, **postfix) -> None:
    """Moves the bar to step ``done``."""
    if self._bar is not None:
      self._bar.update(done - self._bar.n)
      if postfix:
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                               for k, v in postfix.items()}, refresh=False)

  def write(self, msg: str) -> None:
    if self._bar is not None:
      self._bar.write(msg)
    elif jax.process_index() == 0:
      print(msg, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
