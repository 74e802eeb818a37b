"""Thin wrapper over Orbax: model + optimizer + step + grain iterator state, saved together.

Orbax writes each step to a temporary directory and renames it when complete, so a
killed process never leaves a checkpoint that ``latest_step`` would pick up half-written.
Restoration targets an abstract tree that carries the wanted shardings, so a checkpoint
restores onto any mesh.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Keep-N, optionally async checkpoints under ``directory``."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        item_names=("state", "data"),
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
    """Saves ``state`` (a pytree of arrays) and the data iterator's position at ``step``."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores onto ``abstract_state`` (ShapeDtypeStructs with shardings); the iterator
    (if given) is moved to the saved position in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a matching tree or prefix)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
