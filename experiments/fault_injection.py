"""Crash safety under SIGKILL: kill training at random moments, restart, compare bitwise.

    python -m experiments.fault_injection --kills=20 --out=results/crash_safety.json

1. An uninterrupted reference run of a tiny MQAR config (attention, d_model 16, 1 layer,
   seq 16, batch 8, ``--steps`` steps, an async checkpoint every ``--checkpoint_every``
   steps) via ``python -m experiments.train`` in a subprocess; it keeps every checkpoint.
2. The same command (keeping ``--keep`` checkpoints) is started, SIGKILLed and restarted
   ``--kills`` times. Kill moments (seeded, ``--seed``) are spread over the run: at a
   target step plus a random delay (anywhere in compute, logging or saving), the instant a
   new ``<step>.orbax-checkpoint-tmp`` directory appears (an async write in flight, plus
   0-20 ms), or at a random time during start-up (compilation, checkpoint restore).
3. After each kill every complete checkpoint (a ``<step>`` directory) must pass its
   manifest check and hold exactly the reference run's arrays and iterator state at that
   step; the next start must print ``Resumed from step N`` with N the newest complete
   step. After ``--corrupt_at`` kills the newest checkpoint is deliberately damaged
   (one byte flipped in the largest data file / a file cut in half): the next start
   must report it, move it aside and resume from the previous step.
4. A final start runs to the end; its final parameters, optimizer state and step must
   equal the reference's bitwise, and so must the train loss of every step.

All processes share one JAX persistent compilation cache (filled by the reference run), so
a restart costs start-up and restore, not compilation. Writes ``--out`` (JSON): one record
per kill and the overall verdicts, with their provenance (``lcm.provenance``).
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from absl import flags, logging

from experiments import cli
from lcm import provenance



def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The flags, in ``fv`` (a fresh one per :func:`cli_main` call)."""
  global _KILLS, _SEED, _STEPS, _EVERY, _KEEP, _CORRUPT, _WORKDIR, _OUT
  _KILLS = flags.DEFINE_integer("kills", 20, "Number of SIGKILLs.", flag_values=fv)
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill schedule.", flag_values=fv)
  _STEPS = flags.DEFINE_integer("steps", 60, "Training steps.", flag_values=fv)
  _EVERY = flags.DEFINE_integer("checkpoint_every", 2, "Steps between checkpoints.",
                                flag_values=fv)
  _KEEP = flags.DEFINE_integer("keep", 3, "Checkpoints kept by the killed run.",
                               flag_values=fv)
  _CORRUPT = flags.DEFINE_list("corrupt_at", ["8", "14"],
                               "After these kills (1-based) damage the newest checkpoint.",
                               flag_values=fv)
  _WORKDIR = flags.DEFINE_string("workdir", "/tmp/lcm_fault_injection", "Scratch directory "
                                 "(deleted and recreated: it must be missing, empty or an "
                                 "earlier fault-injection scratch directory).", flag_values=fv)
  _OUT = flags.DEFINE_string("out", "results/crash_safety.json", "Output JSON.",
                             flag_values=fv)


# What an earlier run leaves in --workdir (main deletes the folder before it starts).
SCRATCH = ("ref", "killed", "jax_cache", "ref.log")


def _check() -> None:
  """Before any training: counts (the schedule needs kills - 2 distinct target steps below
  --steps), --corrupt_at within the kills, and a --workdir that is safe to delete."""
  cli.check_int("kills", _KILLS.value, min_value=1)
  cli.check_int("steps", _STEPS.value, min_value=2)
  if _KILLS.value - min(2, _KILLS.value) > _STEPS.value - 1:
    raise cli.CommandLineError(f"--kills={_KILLS.value}: at most --steps + 1 = "
                               f"{_STEPS.value + 1} kills fit in {_STEPS.value} steps (two "
                               "during start-up, the rest at distinct steps); lower --kills "
                               "or raise --steps")
  cli.check_int("checkpoint_every", _EVERY.value, min_value=1, max_value=_STEPS.value,
                what=" (at most --steps)")
  cli.check_int("keep", _KEEP.value, min_value=1)
  corrupt = cli.int_list("corrupt_at", [c for c in _CORRUPT.value if c], min_value=1,
                         allow_empty=True)
  late = [c for c in corrupt if c > _KILLS.value]
  if late:
    raise cli.CommandLineError(f"--corrupt_at: {late[0]} is after the last kill "
                               f"(--kills={_KILLS.value}); give kill numbers 1..{_KILLS.value}")
  root = _WORKDIR.value
  if not root.strip():
    raise cli.CommandLineError("--workdir is empty; give a scratch directory (it is deleted "
                               "and recreated)")
  if os.path.exists(root):
    if not os.path.isdir(root):
      raise cli.CommandLineError(f"--workdir={root}: is a file, not a directory; give a "
                                 "scratch directory (it is deleted and recreated)")
    entries = set(os.listdir(root))
    if entries and not entries & set(SCRATCH):
      raise cli.CommandLineError(
          f"--workdir={root}: holds files of something else ({', '.join(sorted(entries)[:3])}"
          f"{', ...' if len(entries) > 3 else ''}) and would be deleted; give a missing or "
          "empty directory, or an earlier fault-injection scratch directory")
  cli.check_dir("workdir", root)
  cli.check_out_file("out", _OUT.value)


def cli_main(argv=None) -> int:
  """``python -m experiments.fault_injection`` in-process: the exit status; bad input is one
  line on stderr (experiments/cli.py)."""
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the verdicts depend on (lcm.provenance): the trainer and checkpointing (lcm), the model
# and config it trains, the training entry point and this driver.
CODE = ("kernels", "layers", "lcm", "configs", "experiments/train.py",
        "experiments/fault_injection.py")
TINY = {
    "model.d_model": 16, "model.num_layers": 1, "data.seq_len": 16, "data.batch_size": 8,
    "data.vocab_size": 32, "data.num_kv_pairs": 2, "train.warmup_steps": 5,
    "train.log_every": 1, "train.eval_every": 100000, "eval.num_examples": 16,
    "eval.batch_size": 8, "train.progress": False, "train.async_checkpoint": True,
}


def _cmd(workdir: str, keep: int) -> list[str]:
  flags_ = {**TINY, "train.steps": _STEPS.value, "train.checkpoint_every": _EVERY.value,
            "train.keep_checkpoints": keep}
  return [sys.executable, "-m", "experiments.train", "--config=configs/mqar.py:attention",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags_.items()]]


def _env(cache: str) -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _complete_steps(ckdir: str) -> list[int]:
  if not os.path.isdir(ckdir):
    return []
  return sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())


def _tmp_dirs(ckdir: str) -> dict[str, int]:
  """Orbax's in-flight write directories: name -> inode (a rewrite gets a new inode)."""
  out = {}
  for p in glob.glob(os.path.join(ckdir, "*.orbax-checkpoint-tmp*")):
    try:
      out[os.path.basename(p)] = os.stat(p).st_ino
    except OSError:  # renamed meanwhile
      pass
  return out


def _new_tmp_dirs(ckdir: str, before: dict[str, int]) -> list[str]:
  return sorted(n for n, ino in _tmp_dirs(ckdir).items() if before.get(n) != ino)


def _metrics_size(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.getsize(path) if os.path.exists(path) else 0


def _last_logged_step(workdir: str, offset: int = 0) -> int:
  """The newest train step logged after byte ``offset`` of metrics.jsonl (0: none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    f.seek(offset)
    lines = [ln for ln in f.read().splitlines() if ln.strip()]
  for ln in reversed(lines):
    try:
      return int(json.loads(ln)["step"])
    except (ValueError, KeyError):  # a line cut by the kill
      continue
  return 0


def _load_step(step_dir: str):
  """Arrays of the 'state' item as {path: np.ndarray}, and the iterator-state JSON text."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ck:
    tree = ck.restore(os.path.abspath(os.path.join(step_dir, "state")))
  arrays = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  data = "".join(open(f, encoding="utf-8").read()
                 for f in sorted(glob.glob(os.path.join(step_dir, "data", "*.json"))))
  return arrays, data


def _same(a, b) -> bool:
  (xa, da), (xb, db) = a, b
  return (da == db and xa.keys() == xb.keys()
          and all(xa[k].dtype == xb[k].dtype and xa[k].shape == xb[k].shape
                  and xa[k].tobytes() == xb[k].tobytes() for k in xa))


def _damage(step_dir: str, how: str) -> str:
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and os.path.basename(os.path.dirname(f)) == "d"]
  target = max(files, key=os.path.getsize)
  data = bytearray(open(target, "rb").read())
  if how == "garble":
    data[len(data) // 2] ^= 0xFF
  else:
    data = data[:len(data) // 2]
  with open(target, "wb") as f:
    f.write(bytes(data))
  return f"{how}: {os.path.relpath(target, step_dir)}"


def _losses(workdir: str) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for ln in f:
      try:
        r = json.loads(ln)
      except ValueError:
        continue
      if r.get("split") == "train":
        out[int(r["step"])] = r["loss"]  # last write wins
  return out


def _launch(workdir: str, keep: int, cache: str, log: str) -> tuple[subprocess.Popen, float]:
  fh = open(log, "w", encoding="utf-8")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(_cmd(workdir, keep), cwd=ROOT, env=_env(cache), stdout=fh,
                          stderr=subprocess.STDOUT)
  fh.close()
  return proc, time.time()


def _parse_log(log: str) -> dict:
  text = open(log, encoding="utf-8", errors="replace").read()
  resumed = None
  for ln in text.splitlines():
    if ln.startswith("Resumed from step "):
      resumed = int(ln.split()[3])
  return {"resumed_from": resumed,
          "reported_unusable": [ln.strip() for ln in text.splitlines()
                                if ln.startswith("WARNING: checkpoint step")],
          "traceback": "Traceback" in text}


def _schedule(rng: random.Random, kills: int, steps: int) -> list[dict]:
  """Kill plans: two during start-up, the rest at increasing target steps."""
  n_start = min(2, kills)
  targets = sorted(rng.sample(range(1, steps), kills - n_start))
  plans = [{"mode": rng.choice(["step+delay", "step+delay", "during_save"]), "target": t}
           for t in targets]
  for _ in range(n_start):
    plans.insert(rng.randrange(len(plans) + 1), {"mode": "startup"})
  for p in plans:
    p["delay_s"] = (rng.uniform(0.0, 0.02) if p["mode"] == "during_save" else
                    rng.uniform(0.0, 0.3) if p["mode"] == "step+delay" else
                    rng.uniform(1.0, 6.0))
  return plans


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  t0 = time.time()
  root = os.path.abspath(_WORKDIR.value)
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  cache = os.path.join(root, "jax_cache")
  ref, run = os.path.join(root, "ref"), os.path.join(root, "killed")
  ref_ck, run_ck = os.path.join(ref, "checkpoints"), os.path.join(run, "checkpoints")

  print("reference run (uninterrupted; fills the compilation cache) ...", flush=True)
  proc, t_ref = _launch(ref, 1000, cache, os.path.join(root, "ref.log"))
  assert proc.wait() == 0, open(os.path.join(root, "ref.log")).read()[-3000:]
  ref_seconds = time.time() - t_ref
  ref_cache = {}

  def ref_step(step):
    if step not in ref_cache:
      ref_cache[step] = _load_step(os.path.join(ref_ck, str(step)))
    return ref_cache[step]

  from lcm import checkpoint  # pylint: disable=g-import-not-at-top
  rng = random.Random(_SEED.value)
  plans = _schedule(rng, _KILLS.value, _STEPS.value)
  corrupt_at = {int(k) for k in _CORRUPT.value if k}
  records = []
  expected_resume = None  # what the next start must resume from
  for i, plan in enumerate(plans, 1):
    log = os.path.join(root, f"launch_{i:02d}.log")
    start_steps, tmp_before, offset = _complete_steps(run_ck), _tmp_dirs(run_ck), \
        _metrics_size(run)
    proc, t_launch = _launch(run, _KEEP.value, cache, log)
    killed_by_plan = False
    while proc.poll() is None:
      now = time.time() - t_launch
      if plan["mode"] == "startup":
        hit = now >= plan["delay_s"]
      elif plan["mode"] == "during_save":
        hit = any(int(d.split(".")[0]) >= plan["target"]
                  for d in _new_tmp_dirs(run_ck, tmp_before))
      else:
        hit = _last_logged_step(run, offset) >= plan["target"]
      if hit:
        if plan["mode"] != "startup":
          time.sleep(plan["delay_s"])
        proc.send_signal(signal.SIGKILL)
        killed_by_plan = True
        break
      time.sleep(0.001)
    t_kill = time.time() - t_launch
    rc = proc.wait()
    info = _parse_log(log)
    complete = _complete_steps(run_ck)
    rec = {
        "kill": i, **plan, "seconds_after_start": round(t_kill, 3), "returncode": rc,
        "killed": killed_by_plan and rc == -signal.SIGKILL,
        "complete_checkpoints_at_start": start_steps,
        "expected_resume": expected_resume, **info,
        "resumed_from_newest_complete": (info["resumed_from"] == expected_resume
                                         if info["resumed_from"] is not None or
                                         expected_resume is None else None),
        "last_logged_step": _last_logged_step(run, offset),
        "complete_checkpoints_after_kill": complete,
        "write_in_flight_at_kill": _new_tmp_dirs(run_ck, tmp_before),
    }
    # Every complete checkpoint: manifest OK and bitwise the reference's state at that step.
    bad = []
    for s in complete:
      problem = checkpoint.verify_manifest(os.path.join(run_ck, str(s)))
      if problem is None and not _same(_load_step(os.path.join(run_ck, str(s))), ref_step(s)):
        problem = "differs from the reference run's checkpoint"
      if problem:
        bad.append([s, problem])
    rec["bad_checkpoints_after_kill"] = bad
    expected_resume = complete[-1] if complete else None
    if i in corrupt_at and len(complete) >= 2:
      how = "garble" if i == min(corrupt_at) else "truncate"
      rec["deliberately_damaged"] = [complete[-1], _damage(
          os.path.join(run_ck, str(complete[-1])), how)]
      expected_resume = complete[-2]
    records.append(rec)
    print(f"kill {i:2d} {plan['mode']:11s} at {t_kill:6.2f}s: resumed_from="
          f"{info['resumed_from']} (expected {rec['expected_resume']}), last step "
          f"{rec['last_logged_step']}, complete {complete}, in flight "
          f"{rec['write_in_flight_at_kill']}, bad {bad}"
          + (f", damaged {rec['deliberately_damaged']}" if "deliberately_damaged" in rec
             else ""), flush=True)

  print("final run to the end ...", flush=True)
  log = os.path.join(root, "launch_final.log")
  proc, _ = _launch(run, _KEEP.value, cache, log)
  rc = proc.wait()
  final = _parse_log(log)
  final["returncode"] = rc
  final["expected_resume"] = expected_resume
  final["resumed_from_newest_complete"] = final["resumed_from"] == expected_resume
  steps = _STEPS.value
  same_final = _same(_load_step(os.path.join(run_ck, str(steps))), ref_step(steps))
  la, lb = _losses(ref), _losses(run)
  same_losses = all(la.get(s) == lb.get(s) for s in range(1, steps + 1))

  def resumed_ok(r):
    return r["resumed_from_newest_complete"] in (True, None)
  damaged_reported = all(
      any(f"checkpoint step {nxt['deliberately_damaged'][0]} is unusable" in w
          for w in nxt_log["reported_unusable"])
      for nxt, nxt_log in zip(records, records[1:] + [final]) if "deliberately_damaged" in nxt)
  summary = {
      "config": {**TINY, "train.steps": steps, "train.checkpoint_every": _EVERY.value,
                 "train.keep_checkpoints": _KEEP.value},
      "kills": sum(r["killed"] for r in records),
      "kills_with_async_write_in_flight": sum(bool(r["write_in_flight_at_kill"])
                                              for r in records),
      "kills_during_startup": sum(r["mode"] == "startup" for r in records),
      "every_restart_resumed_from_newest_complete":
          all(resumed_ok(r) for r in records) and final["resumed_from_newest_complete"],
      "no_complete_checkpoint_ever_corrupt_or_different":
          all(not r["bad_checkpoints_after_kill"] for r in records),
      "deliberately_damaged_checkpoints_reported_and_skipped": damaged_reported,
      "no_traceback_in_any_log": not any(r["traceback"] for r in records + [final]),
      "final_state_bitwise_equal_to_uninterrupted": same_final,
      "train_loss_of_every_step_equal": same_losses,
      "final_run": final,
      "reference_run_seconds": round(ref_seconds, 1),
      "total_seconds": round(time.time() - t0, 1),
      "records": records,
  }
  summary["passed"] = all(summary[k] for k in (
      "every_restart_resumed_from_newest_complete",
      "no_complete_checkpoint_ever_corrupt_or_different",
      "deliberately_damaged_checkpoints_reported_and_skipped", "no_traceback_in_any_log",
      "final_state_bitwise_equal_to_uninterrupted", "train_loss_of_every_step_equal")) \
      and summary["kills"] == _KILLS.value and rc == 0
  summary = provenance.attach(summary, code=CODE)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps({k: v for k, v in summary.items() if k not in ("records", "config")},
                   indent=1))
  print(f"-> {_OUT.value}")
  return 0 if summary["passed"] else 1


if __name__ == "__main__":
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
