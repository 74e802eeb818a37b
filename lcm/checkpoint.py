"""Thin wrapper over Orbax: model + optimizer + step + grain iterator state, saved together.

Crash safety, in three layers:

* Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
  only when every item is complete, so a killed process (SIGKILL, preemption, also in the
  middle of an async write) never leaves a directory that ``all_steps`` would list.
  Old steps (beyond ``keep``) are first renamed into ``<directory>/deleted/`` (Orbax's
  ``todelete_subdir``) and only then removed (at the next save and on close), so a kill
  during that removal never leaves a half-deleted ``<step>`` directory behind either.
* Every step carries a manifest, ``<step>/lcm_manifest.json``: the size and SHA-256 of each
  file Orbax wrote. It is computed in Orbax's post-finalization callback, i.e. inside the
  temporary directory *before* the rename, so a listed step always has its manifest
  (steps written by older versions of this file have none; such a step, or one whose
  manifest was deleted, is loaded with a one-line warning and only read-checked).
  The manifest only detects damage; Orbax still does all reading.
* :meth:`Checkpointer.restore_latest` tries the newest step first. A step whose manifest
  does not match (a truncated, garbled or missing file) or that Orbax fails to read is
  reported with a warning naming the step and the reason, and the previous step is tried.
  Once an older step restores, the newer unusable ones are moved (never deleted) to
  ``<directory>/corrupt/<step>.<time in ns>`` so the resumed run can save those steps again.
  When no step restores (e.g. a model change made every checkpoint incompatible) nothing is
  moved and :class:`CheckpointError` lists every step with its reason.

Nothing here unpickles: Orbax stores arrays with TensorStore (zarr / OCDBT) and metadata as
JSON, grain stores the iterator position as JSON, and the manifest is JSON.

:class:`StopRequest` turns SIGTERM / SIGINT into "checkpoint after this step and stop" for
the training loop (lcm/train.py; docs/operations.md).

Restoration targets an abstract tree that carries the wanted shardings, so a checkpoint
restores onto any mesh. The manifest is written and checked with local file I/O (the
wrapper takes a local directory).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

MANIFEST = "lcm_manifest.json"
# Rewritten by Orbax after its post-finalization callback (commit timestamp, commit marker),
# so they cannot be in the manifest; both are small metadata that restore reads and checks.
_UNHASHED = ("_CHECKPOINT_METADATA", "commit_success.txt", MANIFEST)
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_TRASH = "deleted"  # Orbax's todelete_subdir: retired steps, removed at the next save
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a checkpoint that fails its manifest check."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      h.update(block)
  return h.hexdigest()


def _data_files(step_dir: str) -> list[str]:
  """Paths (relative to ``step_dir``) of the files a manifest covers, sorted."""
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel not in _UNHASHED:
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str, step: int) -> None:
  """Writes ``step_dir/lcm_manifest.json`` (size + SHA-256 per file), atomically."""
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _sha256(os.path.join(step_dir, rel))}
           for rel in _data_files(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"format": 1, "step": int(step), "files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> str | None:
  """None when every file in the manifest has its recorded size and SHA-256 (or there is
  no manifest: an unverified step); otherwise the first problem, in words."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
    items = sorted(files.items())
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"unreadable manifest {MANIFEST} ({type(e).__name__}: {e})"
  for rel, want in items:
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f"file {rel} is missing"
    size = os.path.getsize(full)
    if size != want.get("size"):
      return f"file {rel} has {size} bytes, the manifest says {want.get('size')} (truncated?)"
    if _sha256(full) != want.get("sha256"):
      return f"file {rel} fails its SHA-256 check (corrupted)"
  return None


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Keep-N, optionally async checkpoints under ``directory``, each with a manifest."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               verify: bool = True):
    self.directory = os.path.abspath(directory)
    self.async_save = async_save
    self.verify = verify
    self._saving: int | None = None  # the step whose write is in flight
    self._warned: set[int] = set()  # steps already reported as having no manifest
    # Always Orbax's async checkpointer (its post-finalization callback writes the
    # manifest before the rename); async_save=False waits for each save to finish.
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True,
            todelete_subdir=_TRASH,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._on_finalized)),
        item_names=("state", "data"),
    )
    self._empty_trash()

  # -- manifest

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _on_finalized(self) -> None:
    """Orbax's post-finalization callback: all files of the step in flight are written, the
    temporary directory is not yet renamed. Hashes it there (process 0 only)."""
    step = self._saving
    if step is None or jax.process_index() != 0:
      return
    tmp = sorted(glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*")),
                 key=os.path.getmtime)
    target = tmp[-1] if tmp else self.step_dir(step)
    if os.path.isdir(target):
      write_manifest(target, step)

  def _empty_trash(self) -> None:
    """Removes steps that Orbax retired into ``deleted/`` (no save may be in flight)."""
    trash = os.path.join(self.directory, _TRASH)
    if jax.process_index() != 0 or not os.path.isdir(trash):
      return
    for name in os.listdir(trash):
      shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

  # -- steps

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
    """Saves ``state`` (a pytree of arrays) and the data iterator's position at ``step``."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._mngr.wait_until_finished()  # Orbax waits here too; then the callback's step is ours
    self._empty_trash()
    self._saving = int(step)
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    if not self.async_save:
      self._mngr.wait_until_finished()
    return saved

  def check(self, step: int) -> str | None:
    """None if step's files match its manifest, else the problem. A step without a
    manifest (deleted, or written by an lcm that wrote none) is loaded unverified, with a
    one-line warning (once per step)."""
    d = self.step_dir(step)
    if not os.path.isdir(d):
      return f"directory {d} is missing"
    if not self.verify:
      return None
    if not os.path.exists(os.path.join(d, MANIFEST)) and step not in self._warned:
      self._warned.add(step)
      logging.warning("checkpoint step %d in %s has no %s (deleted, or written before lcm "
                      "wrote manifests): its files cannot be checked for truncation or "
                      "corruption; loading it unverified", step, self.directory, MANIFEST)
    return verify_manifest(d)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores onto ``abstract_state`` (ShapeDtypeStructs with shardings); the iterator
    (if given) is moved to the saved position in place. Raises CheckpointError when the
    step fails its manifest check."""
    problem = self.check(step)
    if problem is not None:
      raise CheckpointError(f"checkpoint step {step} in {self.directory}: {problem}")
    return self._read(step, abstract_state, data_iterator)

  def _read(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_latest(self, abstract_state: Any, data_iterator=None
                     ) -> tuple[int | None, Any, list[tuple[int, str]]]:
    """Restores the newest usable step: ``(step, state, skipped)``; ``(None, None, [])``
    when there is no checkpoint. ``skipped`` lists ``(step, reason)`` of newer steps that
    failed their manifest check or could not be read; each is reported with a warning and
    moved to ``<directory>/corrupt/``. Raises CheckpointError when no step restores."""
    steps = sorted(self.all_steps(), reverse=True)
    skipped: list[tuple[int, str]] = []
    for i, step in enumerate(steps):
      problem = self.check(step)
      if problem is None:
        try:
          state = self._read(step, abstract_state, data_iterator)
        except Exception as e:  # pylint: disable=broad-except
          problem = f"Orbax could not read it ({_first_line(e)})"
        else:
          if skipped:
            self._quarantine([s for s, _ in skipped])
          return step, state, skipped
      nxt = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older step left"
      logging.warning("checkpoint step %d in %s is unusable: %s; %s", step, self.directory,
                      problem, nxt)
      skipped.append((step, problem))
    if not steps:
      return None, None, []
    listing = "; ".join(f"step {s}: {p}" for s, p in skipped)
    raise CheckpointError(
        f"no usable checkpoint in {self.directory} ({listing}). Nothing was moved or "
        "deleted. If the model or optimizer config changed, use a new --workdir.")

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unusable steps to ``<directory>/corrupt/<step>.<time>`` (never deletes)."""
    _sync("lcm_checkpoint_quarantine_start")
    if jax.process_index() == 0:
      dest_root = os.path.join(self.directory, "corrupt")
      os.makedirs(dest_root, exist_ok=True)
      for step in steps:
        dest = os.path.join(dest_root, f"{step}.{time.time_ns()}")
        os.replace(self.step_dir(step), dest)
        logging.warning("moved unusable checkpoint step %d to %s", step, dest)
    _sync("lcm_checkpoint_quarantine_done")
    self._mngr.reload()

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._empty_trash()
    self._mngr.close()


class StopRequest:
  """SIGTERM / SIGINT -> ``signal_name`` is set; the training loop checks :meth:`requested`
  after every step, checkpoints that step and returns. A second signal stops at once
  (KeyboardInterrupt). Handlers are installed only in the main thread and only for one
  process; a multi-process run relies on JAX's preemption sync point (SIGTERM on any host
  stops every host at the same step). The previous handlers come back on exit."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name: str | None = None
    self._old: dict = {}
    self._multi = False

  def __enter__(self) -> "StopRequest":
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():  # None: a handler not set from Python
      signal.signal(sig, signal.SIG_DFL if old is None else old)
    self._old = {}

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None:
      raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name})")
    self.signal_name = signal.Signals(signum).name

  def requested(self, step: int) -> bool:
    if self.signal_name is None and self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal_name = "preemption notice (SIGTERM)"
      except RuntimeError:  # no preemption service: nothing to wait for
        self._multi = False
    return self.signal_name is not None


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (a matching tree or prefix)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
