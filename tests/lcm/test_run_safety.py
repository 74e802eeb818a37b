"""Run safety of ``python -m experiments.train`` (issue 28, first slice), through the real
command line: one run per workdir (``.lock``), a stale lock of a killed run taken over, one
history line per start, a changed config refused unless ``--allow_config_change``, a
finished run left byte-identical, and SIGTERM -> checkpoint at the step reached -> a resume
bitwise equal to an uninterrupted run (docs/operations.md).

The subprocess runs are shared: the ``contested`` fixture starts two runs on one workdir,
SIGKILLs the one that got the lock and lets a third take the stale lock over and train to
the end; that workdir is then the finished run and the uninterrupted reference of the
SIGTERM test. All runs share a persistent JAX compilation cache (same programs, same
executables), so only the first one compiles.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lcm import metrics, provenance

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 300
TRACEBACK = "Traceback (most recent call last)"
FLAGS = {
    "data.vocab_size": 32, "data.seq_len": 16, "data.num_kv_pairs": 2, "data.batch_size": 8,
    "model.d_model": 16, "model.num_layers": 1, "train.warmup_steps": 1, "train.log_every": 1,
    "train.eval_every": 1000, "train.checkpoint_every": 100, "eval.num_examples": 8,
    "eval.batch_size": 8, "train.progress": False,
}


def _cmd(workdir, *extra, steps=STEPS):
  return [sys.executable, "-m", "experiments.train", "--config=configs/mqar.py:attention",
          f"--workdir={workdir}", f"--config.train.steps={steps}",
          *(f"--config.{k}={v}" for k, v in FLAGS.items()), *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def _start(workdir, env, *extra, **kw):
  return subprocess.Popen(_cmd(workdir, *extra, **kw), cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _run(workdir, env, *extra, **kw):
  return subprocess.run(_cmd(workdir, *extra, **kw), cwd=ROOT, env=env, text=True,
                        capture_output=True, timeout=300)


def _last_line(text):
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _no_traceback(out, err):
  assert TRACEBACK not in out and TRACEBACK not in err, err[-3000:]


def _hashes(directory):
  """SHA-256 of every file under ``directory``, hidden ones included."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = hashlib.sha256(
          pathlib.Path(path).read_bytes()).hexdigest()
  return out


def _history(workdir):
  path = pathlib.Path(workdir) / provenance.HISTORY_FILE
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, procs, what, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    assert all(p.poll() is None for p in procs), f"a run ended while waiting for {what}"
    time.sleep(0.02)
  raise AssertionError(f"timed out waiting for {what}")


def _state(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(str(workdir), "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ck:
    return ck.restore(os.path.abspath(path))


@pytest.fixture(scope="module")
def contested(tmp_path_factory, env):
  """Two runs started together on one workdir; the winner is SIGKILLed once it has recorded
  its start (before its first checkpoint); a third run then trains the workdir to the end."""
  workdir = tmp_path_factory.mktemp("contested")
  procs = [_start(workdir, env), _start(workdir, env)]
  _wait_for(lambda: any(p.poll() is not None for p in procs), [], "one run to stop")
  loser = next(p for p in procs if p.poll() is not None)
  winner = next(p for p in procs if p is not loser)
  winner_running = winner.poll() is None
  loser_out, loser_err = loser.communicate()
  _wait_for(lambda: len(_history(workdir)) == 1, [winner], "the winner's history line")
  lock_text = (workdir / provenance.LOCK_FILE).read_text()
  winner.send_signal(signal.SIGKILL)
  winner.communicate()
  checkpoints_at_kill = os.listdir(workdir / "checkpoints")
  third = _run(workdir, env)
  return {"workdir": workdir, "loser": loser, "loser_out": loser_out, "loser_err": loser_err,
          "winner": winner, "winner_running": winner_running, "lock_text": lock_text,
          "checkpoints_at_kill": checkpoints_at_kill, "third": third}


def test_a_second_run_on_a_workdir_stops_at_once_naming_the_holder(contested):
  loser, winner = contested["loser"], contested["winner"]
  assert contested["winner_running"], "the run holding the lock ended before the other one"
  assert loser.returncode == 3, contested["loser_err"][-2000:]
  _no_traceback(contested["loser_out"], contested["loser_err"])
  line = _last_line(contested["loser_err"])
  assert line.startswith("lcm: workdir ") and "is in use by" in line, line
  assert f"pid {winner.pid} on host {socket.gethostname()} (started 20" in line, line
  holder = json.loads(contested["lock_text"])
  assert holder["pid"] == winner.pid and holder["started"] in line
  assert contested["loser_out"] == ""  # it trained nothing


def test_the_lock_of_a_killed_run_is_detected_and_taken_over(contested):
  third, workdir = contested["third"], contested["workdir"]
  assert contested["checkpoints_at_kill"] == []  # killed before it trained: third = uninterrupted
  assert third.returncode == 0, third.stderr[-3000:]
  _no_traceback(third.stdout, third.stderr)
  assert f"stale lock from pid {contested['winner'].pid} on host" in third.stderr, third.stderr
  assert "taking it over" in third.stderr
  assert not (workdir / provenance.LOCK_FILE).exists()  # released on exit
  assert json.loads((workdir / "summary.json").read_text())["steps"] == STEPS
  history = _history(workdir)  # one line per start that got past the lock and the checks
  assert len(history) == 2 and history[0]["pid"] == contested["winner"].pid
  for h in history:
    assert h["config"]["model"]["d_model"] == 16 and h["process_count"] == 1
    assert h["hosts"] == [socket.gethostname()] and h["resumed_from"] is None
    assert h["versions"]["jax"] == jax.__version__ and h["versions"]["lcm"]
    assert h["commit"] == provenance.commit() and "--workdir=" in h["command"]
    assert h["argv"][1:] == _cmd(workdir)[3:] and h["time"].endswith("Z")


def test_a_finished_run_is_reported_and_left_byte_identical(contested, env):
  workdir = contested["workdir"]
  before = _hashes(workdir)
  out = _run(workdir, env)
  assert out.returncode == 0, out.stderr[-3000:]
  _no_traceback(out.stdout, out.stderr)
  line = _last_line(out.stdout)
  assert "is a finished run (300 steps)" in line and f"{workdir}/summary.json" in line, line
  assert _hashes(workdir) == before


def test_a_changed_config_is_refused_with_the_fields_unless_allowed(contested, env,
                                                                    tmp_path):
  workdir = contested["workdir"]
  before = _hashes(workdir)
  out = _run(workdir, env, "--config.model.d_model=24", "--config.seed=7")
  assert out.returncode == 2, out.stderr[-3000:]
  _no_traceback(out.stdout, out.stderr)
  line = _last_line(out.stderr)
  assert "model.d_model: 16 -> 24" in line and "seed: 0 -> 7" in line, line
  assert "--allow_config_change" in line
  assert _hashes(workdir) == before

  # Allowed: a copy of the finished run continues 2 steps with 1 kv pair instead of 2.
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  out = _run(copy, env, "--config.data.num_kv_pairs=1", "--allow_config_change",
             steps=STEPS + 2)
  assert out.returncode == 0, out.stderr[-3000:]
  _no_traceback(out.stdout, out.stderr)
  history = _history(copy)
  assert len(history) == 3  # the killed start, the full run, this one
  assert history[-1]["config_changes"] == ["data.num_kv_pairs: 2 -> 1"]
  assert history[-1]["allow_config_change"] is True
  assert history[-1]["resumed_from"] == STEPS
  assert json.loads((copy / "config.json").read_text())["data"]["num_kv_pairs"] == 1


def test_sigterm_checkpoints_the_step_reached_and_resumes_bitwise(contested, env, tmp_path):
  reference = contested["workdir"]
  proc = _start(tmp_path, env)
  _wait_for(lambda: (tmp_path / "metrics.jsonl").exists()
            and (tmp_path / "metrics.jsonl").stat().st_size > 0, [proc], "the first metrics")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  _no_traceback(out, err)
  line = _last_line(err)
  assert line.startswith("lcm: stopped by SIGTERM after step "), line
  reached = int(line.split("after step ")[1].split()[0])
  assert 1 <= reached < STEPS
  assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(reached)]
  assert f"checkpoints/{reached};" in line
  assert not (tmp_path / "summary.json").exists()  # not finished: a rerun resumes it
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, reached + 1))

  resumed = _run(tmp_path, env)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _no_traceback(resumed.stdout, resumed.stderr)
  assert f"Resumed from step {reached}" in resumed.stdout
  a, b = _state(reference, STEPS), _state(tmp_path, STEPS)
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))
  assert [h["resumed_from"] for h in _history(tmp_path)] == [None, reached]


# ----------------------------------------------------------------------------- the lock itself


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_a_lock_file_from_a_dead_pid_is_stale_and_a_held_one_names_its_holder(tmp_path):
  dead = {"pid": _dead_pid(), "host": "elsewhere", "started": "2026-01-01T00:00:00Z",
          "command": "python -m experiments.train ..."}
  (tmp_path / provenance.LOCK_FILE).write_text(json.dumps(dead))
  lock = provenance.WorkdirLock(tmp_path)
  assert lock.acquire() == dead
  assert provenance.describe_stale(dead).startswith(
      f"stale lock from pid {dead['pid']} on host elsewhere")
  mine = json.loads((tmp_path / provenance.LOCK_FILE).read_text())
  assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
  # A flock conflicts between two open files of one process, as between two processes.
  with pytest.raises(provenance.WorkdirBusyError,
                     match=rf"in use by pid {os.getpid()} on host .* \(started "
                           + mine["started"]):
    provenance.WorkdirLock(tmp_path).acquire()
  lock.release()
  assert not (tmp_path / provenance.LOCK_FILE).exists()
  again = provenance.WorkdirLock(tmp_path)
  assert again.acquire() is None  # released cleanly: nothing stale
  again.release()


def test_config_diff_names_changed_added_and_removed_fields():
  old = {"seed": 0, "model": {"d_model": 64, "mixers": {"attention": {"num_heads": 2}}},
         "data": {"task": "mqar"}, "train": {"lr": 1.0}}
  new = {"seed": 0, "model": {"d_model": 128, "mixers": {"gla": {"num_heads": 2}}},
         "data": {"task": "mqar"}, "train": {"lr": 2.0}}
  assert provenance.config_diff(old, new) == [
      "model.d_model: 64 -> 128", "model.mixers.attention.num_heads: 2 -> (absent)",
      "model.mixers.gla.num_heads: (absent) -> 2"]


def test_stop_request_sets_a_flag_then_interrupts_and_restores_the_handlers():
  from lcm import checkpoint  # pylint: disable=g-import-not-at-top
  before = {s: signal.getsignal(s) for s in checkpoint.StopRequest.SIGNALS}
  with checkpoint.StopRequest() as stop:
    assert not stop.requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested(2) and stop.signal_name == "SIGTERM"
    with pytest.raises(KeyboardInterrupt, match="second signal"):
      os.kill(os.getpid(), signal.SIGINT)
  assert {s: signal.getsignal(s) for s in checkpoint.StopRequest.SIGNALS} == before
