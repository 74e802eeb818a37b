"""Provenance of a results file: the command and the git commit that produced it.

Every JSON under ``results/`` carries a ``provenance`` object made by :func:`record`::

    {"command": "python -m experiments.bench kernels --repeats=5 --out=results/bench_kernels",
     "commit": "<40 hex>", "dirty": false, "date": "2026-12-07T14:02:11Z",
     "code": ["kernels/chunked_scan", ...], "outputs": ["results/bench_kernels.png"]}

``code`` names the paths whose changes make the figures stale and ``outputs`` the other files
(plots, tables) the same command wrote; ``python -m experiments.check_results`` (``make
check-results``) compares ``commit`` with the last commit that touched ``code`` and lists every
results file that is stale or that no JSON accounts for.

Training runs (``lcm.train.run``) use the second half of this file: :class:`WorkdirLock`, one
run per workdir (``<workdir>/.lock``, an ``fcntl.flock`` that dies with its process), and
:func:`append_history`, one line of ``<workdir>/history.jsonl`` per (re)start made by
:func:`start_record`; :func:`config_diff` names the fields a restart changed
(docs/operations.md).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import importlib.metadata
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
from typing import Any, Iterable, Mapping

ROOT = pathlib.Path(__file__).resolve().parent.parent

# What most results measure: the model code. Experiments add their own entry point.
DEFAULT_CODE = ("kernels", "layers", "lcm")


def utc_now() -> str:
  """The current UTC time, ``2026-12-07T14:02:11Z``."""
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git(*args: str, cwd: pathlib.Path = ROOT) -> str | None:
  """Output of ``git args`` in the repository (stripped), or None when git cannot answer."""
  try:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                         timeout=60)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def commit() -> str | None:
  """HEAD's commit hash, or None outside a git checkout."""
  return git("rev-parse", "HEAD")


def dirty(paths: Iterable[str] = DEFAULT_CODE) -> bool | None:
  """Whether ``paths`` have uncommitted changes (None when git cannot tell)."""
  out = git("status", "--porcelain", "--", *paths)
  return None if out is None else bool(out)


def command_line(argv: list[str] | None = None) -> str:
  """The command as a user would type it: ``python -m pkg.module args`` for a module run
  from this repository, else the interpreter's argv as given."""
  argv = list(sys.argv if argv is None else argv)
  if not argv:
    return "python"
  head = pathlib.Path(argv[0])
  try:
    rel = head.resolve().relative_to(ROOT)
  except (ValueError, OSError):
    rel = None
  if rel is not None and rel.suffix == ".py":
    parts = list(rel.with_suffix("").parts)
    if parts[-1] in ("__main__", "__init__"):
      parts = parts[:-1]
    return shlex.join(["python", "-m", ".".join(parts), *argv[1:]])
  return shlex.join(["python", *argv])


def _dirty_in(status: str | None, paths: Iterable[str]) -> bool | None:
  """Whether a ``git status --porcelain`` listing names a file under ``paths``."""
  if status is None:
    return None
  changed = [line[3:].split(" -> ")[-1].strip('"') for line in status.splitlines() if line]
  return any(c == p or c.startswith(p.rstrip("/") + "/") for c in changed for p in paths)


# HEAD and the uncommitted files when this module was first imported, i.e. when the run
# started: a results file names the code it was computed with even when commits land
# while a long benchmark runs (``commit_at_write`` then records the later HEAD).
_START = {"commit": commit(), "status": git("status", "--porcelain")}


def record(code: Iterable[str] = DEFAULT_CODE, outputs: Iterable[str | os.PathLike] = (),
           command: str | None = None, **extra: Any) -> dict[str, Any]:
  """The ``provenance`` object of a results file written now, from this checkout: the
  commit the process started from, and ``dirty`` if the ``code`` paths had uncommitted
  changes at the start or have now."""
  code = sorted(set(code))
  out = [_repo_path(p) for p in outputs]
  head = commit()
  now, then = dirty(code), _dirty_in(_START["status"], code)
  rec = {
      "command": command or command_line(),
      "commit": _START["commit"] or head,
      "dirty": None if now is None and then is None else bool(now or then),
      "date": utc_now(),
      "code": code,
      "outputs": sorted(out),
  }
  if _START["commit"] and head != _START["commit"]:
    rec["commit_at_write"] = head
  rec.update(extra)
  return rec


def attach(report: Mapping[str, Any] | list, **kwargs: Any) -> dict[str, Any]:
  """``report`` with a ``provenance`` entry first (a list becomes ``{"rows": list}``)."""
  body = {"rows": list(report)} if isinstance(report, list) else dict(report)
  body.pop("provenance", None)
  return {"provenance": record(**kwargs), **body}


def rows(report: Mapping[str, Any] | list) -> list:
  """The rows of a results file written by :func:`attach` from a list (or an old bare list)."""
  return list(report) if isinstance(report, list) else list(report["rows"])


def _repo_path(p: str | os.PathLike) -> str:
  path = pathlib.Path(p)
  try:
    return path.resolve().relative_to(ROOT).as_posix()
  except ValueError:
    return path.as_posix()


# ----------------------------------------------------------------------------- training runs

LOCK_FILE = ".lock"
HISTORY_FILE = "history.jsonl"
# The packages whose versions a training history line records.
_PACKAGES = ("lcm", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
             "ml-collections", "numpy")


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirError(ValueError):
  """The workdir cannot hold a run: an empty path, a file, a directory that cannot be
  created or written (read-only, under /proc, ...), or (for readers such as
  ``experiments.generate``) a directory that holds no run."""


def prepare_workdir(workdir: str | os.PathLike) -> str:
  """Checks that ``workdir`` can hold a run and creates it; returns it as a str. Raises
  :class:`WorkdirError` with a one-line reason; nothing is written into an existing
  directory here (the lock file, :class:`WorkdirLock`, is the first file a run writes)."""
  path = os.fspath(workdir)
  if not path.strip():
    raise WorkdirError("--workdir is empty; give a directory for the run's checkpoints and "
                       "metrics (it is created when missing)")
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {path} is a file, not a directory; give a directory (it is "
                       "created when missing) as --workdir")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create workdir {path} ({e.strerror or e}); give a "
                       "writable directory as --workdir") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {path} is not writable; give a writable directory as "
                       "--workdir")
  return path


def one_line(text: Any) -> str:
  """``text`` with every run of whitespace (newlines included) made one space."""
  return " ".join(str(text).split())


# errno values that mean "the disk, not the program": reported in words, exit status 1.
_DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EIO: "input/output error"}


def _chain(exc: BaseException) -> list[BaseException]:
  out, seen = [], set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    out.append(exc)
    exc = exc.__cause__ or exc.__context__
  return out


def describe_failure(exc: BaseException) -> str:
  """One line for an error that is not bad input: a full disk (found anywhere in the
  exception's cause chain, e.g. under Orbax's asyncio errors) in words, anything else as
  ``Type: first line of its message``."""
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
      where = f" writing {e.filename}" if e.filename else ""
      return (f"{_DISK_ERRORS[e.errno]}{where}; free space (or fix the disk) and rerun the "
              "same command: it resumes from the newest complete checkpoint")
    text = str(e)
    if "No space left on device" in text or "ENOSPC" in text:
      return (f"no space left on device ({type(e).__name__}: {one_line(text)[:300]}); free "
              "space and rerun the same command: it resumes from the newest complete "
              "checkpoint")
  lines = str(exc).strip().splitlines()
  first = lines[0][:500] if lines else ""
  return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _holder_text(holder: Mapping[str, Any]) -> str:
  if not holder:
    return "a process that recorded no details"
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f"(started {holder.get('started', '?')})")


class WorkdirLock:
  """``<workdir>/.lock``: an exclusive ``fcntl.flock`` held for the life of a run.

  :meth:`acquire` never waits: when a live process holds the lock it raises
  :class:`WorkdirBusyError` naming that process (pid, host, start time, command), read from
  the JSON the holder wrote into the file. The kernel drops a flock when its process dies
  (SIGKILL included), so a lock file whose lock nobody holds is stale: :meth:`acquire` takes
  it over and returns what the dead holder had written. :meth:`release` removes the file
  (while still holding the lock; a process that opened the old file sees that it was
  replaced and tries again). Filesystems without flock (some FUSE mounts) give a warning on
  stderr and no lock.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
    self.fd: int | None = None

  def acquire(self, command: str | None = None) -> dict | None:
    """Takes the lock; returns the stale holder's record (``{}`` when it wrote none) or
    None when there was no stale lock. Raises WorkdirBusyError when the lock is held."""
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise WorkdirError(f"cannot create the lock file {self.path} ({e.strerror or e}); "
                           "give a writable directory as --workdir") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          os.close(fd)
          print(f"lcm: WARNING: cannot lock {self.path} ({e.strerror}); running without a "
                "workdir lock: nothing stops a second run on this workdir", file=sys.stderr)
          return None
        holder = _read_holder(fd)
        os.close(fd)
        cmd = str(holder.get("command") or "")
        cmd = cmd if len(cmd) <= 160 else cmd[:157] + "..."
        raise WorkdirBusyError(
            f"workdir {os.path.dirname(self.path) or '.'} is in use by {_holder_text(holder)}"
            f"{': ' + cmd if cmd else ''}. Wait for that run to end (or stop it), or use "
            "another --workdir.") from None
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # the holder we waited on removed this file: lock the new one
    raw = os.read(fd, 1 << 16)
    stale = _parse_holder(raw) if raw else None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now(),
          "command": command or command_line()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    self.fd = fd
    return stale

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      os.unlink(self.path)
    except OSError:
      pass
    os.close(self.fd)  # drops the flock
    self.fd = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _parse_holder(raw: bytes) -> dict:
  try:
    holder = json.loads(raw.decode("utf-8", "replace"))
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _read_holder(fd: int) -> dict:
  try:
    return _parse_holder(os.pread(fd, 1 << 16, 0))
  except OSError:
    return {}


def describe_stale(holder: Mapping[str, Any]) -> str:
  """The one-line report of a stale lock that :meth:`WorkdirLock.acquire` took over."""
  if not holder:
    return "stale lock file (no holder recorded), taking it over"
  return (f"stale lock from pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f"(started {holder.get('started', '?')}; that process is gone), taking it over")


def versions() -> dict[str, str | None]:
  """Installed versions of the packages a run depends on (None when not installed)."""
  out: dict[str, str | None] = {"python": sys.version.split()[0]}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{"model.d_model": 64, ...}`` for a nested dict (a non-dict is one leaf)."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out: dict[str, Any] = {}
  for k, v in tree.items():
    path = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, path))
    else:
      out[path] = v
  return out


_ABSENT = object()


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                sections: Iterable[str] = ("seed", "data", "model")) -> list[str]:
  """``["model.d_model: 64 -> 128", ...]``: the fields under ``sections`` whose values
  differ between two JSON configs (a field only one side has shows ``(absent)``)."""
  def pick(c):
    return flatten({k: c[k] for k in sections if k in c})
  a, b = pick(old), pick(new)
  show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v)
  return [f"{k}: {show(a.get(k, _ABSENT))} -> {show(b.get(k, _ABSENT))}"
          for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def start_record(config: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
  """One line of a training history: UTC time, command and argv, git commit and dirty flag,
  package versions, pid, then ``extra`` (hosts, process count, resumed step, config
  changes) and the full config last."""
  rec = {"time": utc_now(), "command": command_line(), "argv": list(sys.argv),
         "commit": commit(), "dirty": dirty(), "versions": versions(), "pid": os.getpid()}
  rec.update(extra)
  rec["config"] = dict(config)
  return rec


def append_history(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
  """Appends ``record`` as one JSON line to ``<workdir>/history.jsonl`` (fsynced)."""
  with open(os.path.join(os.fspath(workdir), HISTORY_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
