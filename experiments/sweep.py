"""Run a grid of configs one after another, resumably, and gather their summaries in a table.

    python -m experiments.sweep --config=configs/mqar.py:attention \\
        --grid="model.pattern=attention,mamba2;model.d_model=32,64;train.lr=1e-3,3e-3" \\
        --runs=runs/sweep_mqar --out=results/sweep_mqar

``--grid`` is ``key=v1,v2,...`` clauses separated by ``;`` (dotted config keys; values are
parsed as the type the config already holds there: int, float, bool or str); the sweep is
the Cartesian product, in the order given. Every grid point trains in
``<runs>/<key=value+key=value...>`` (short key names: the last dotted part) with
``lcm.train.run``, which resumes from the newest checkpoint, and a point whose
``summary.json`` already records the requested steps is not trained again, so an interrupted
sweep continues where it stopped. At the end ``<out>.csv`` and ``<out>.md`` hold one row per
point: the swept values, the best held-out accuracy over the run's evaluations (and its
step), the final eval loss / accuracy, parameters, recurrent state size and tokens/s, and
``<out>.json`` the same rows with their provenance (``lcm.provenance``: the command, the
commit, the code the numbers depend on, and the csv / md written beside it).

Python API (used by ``experiments.reproduce_zoology``): :func:`expand_grid`,
:func:`apply_overrides`, :func:`run_grid`, :func:`write_table`, :func:`write_json`.
"""

from __future__ import annotations

import csv
import importlib
import itertools
import json
import os
from typing import Any, Callable, Iterable, Sequence

import ml_collections

from layers.common import ConfigError
from lcm import provenance

__all__ = ["parse_grid", "expand_grid", "apply_overrides", "load_config", "point_name",
           "eval_history", "run_grid", "write_table", "write_json"]

# What a sweep's numbers depend on (lcm.provenance): the model, the configs, this driver.
CODE = ("kernels", "layers", "lcm", "configs", "experiments/sweep.py")

COLUMNS = ("best_accuracy", "best_step", "eval_accuracy", "eval_loss", "num_params",
           "state_size", "tokens_per_second", "steps")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``configs/<family>.py:<arg>`` (or ``configs.<family>:<arg>``) -> its config."""
  path, _, arg = spec.partition(":")
  module = path[:-3] if path.endswith(".py") else path
  module = module.replace("/", ".").strip(".")
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise ConfigError("config", f"no config module {module!r} ({e})") from None
  return mod.get_config(arg) if arg else mod.get_config()


def _parse_value(text: str, current: Any, key: str) -> Any:
  text = text.strip()
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(key, f"expects a boolean, got {text!r}")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(key, f"expects an integer, got {text!r}") from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(key, f"expects a number, got {text!r}") from None
  return text


def _lookup(c: ml_collections.ConfigDict, key: str) -> Any:
  node = c
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(key, "is not a key of the config")
    node = node[part]
  return node


def parse_grid(text: str, base: ml_collections.ConfigDict) -> dict[str, list]:
  """``"a.b=1,2;c=x"`` -> ``{"a.b": [1, 2], "c": ["x"]}``, typed like ``base``'s values.
  (Mixer patterns contain commas: use ``|`` between values of ``model.pattern``-like keys
  whose values have commas, e.g. ``model.pattern=swa,attention|mamba2``.)"""
  grid: dict[str, list] = {}
  for clause in filter(None, (s.strip() for s in text.split(";"))):
    key, eq, values = clause.partition("=")
    key = key.strip()
    if not eq or not values.strip():
      raise ConfigError("grid", f"clause {clause!r} is not key=v1,v2,...")
    current = _lookup(base, key)
    parts = values.split("|") if "|" in values else values.split(",")
    grid[key] = [_parse_value(v, current, key) for v in parts]
  return grid


def expand_grid(grid: dict[str, Sequence]) -> list[dict[str, Any]]:
  """The Cartesian product of ``grid``'s value lists, first key varying slowest."""
  keys = list(grid)
  for k in keys:
    if not list(grid[k]):
      raise ConfigError(k, "has no values in the grid")
  return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict[str, Any]
                    ) -> ml_collections.ConfigDict:
  """A copy of ``c`` with dotted ``overrides`` set (keys must exist)."""
  c = ml_collections.ConfigDict(c.to_dict())
  for key, value in overrides.items():
    _lookup(c, key)
    parent, _, leaf = key.rpartition(".")
    node = _lookup(c, parent) if parent else c
    node[leaf] = value
  return c


def point_name(overrides: dict[str, Any]) -> str:
  """Directory name of a grid point: ``leaf=value`` joined by ``+`` (filesystem-safe)."""
  parts = []
  for key, value in overrides.items():
    v = str(value).replace(",", "_").replace("/", "_").replace(" ", "")
    parts.append(f"{key.rpartition('.')[2]}={v}")
  return "+".join(parts) or "base"


def eval_history(workdir: str) -> list[dict]:
  """The eval records of ``workdir/metrics.jsonl`` (one per evaluation step), in step order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        r = json.loads(line)
        if r.get("split") == "eval":
          rows.append(r)
  # A resumed run may have written an evaluation twice; keep the last record per step.
  return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def _finished(workdir: str, steps: int) -> dict | None:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    s = json.load(f)
  return s if s.get("steps") == steps else None


def run_grid(base: ml_collections.ConfigDict, points: Iterable[dict[str, Any]], runs: str, *,
             train_fn: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
  """Trains every grid point (skipping finished ones) and returns one row per point: the
  overrides, ``workdir``, ``best_accuracy`` / ``best_step`` and the summary's fields."""
  if train_fn is None:
    from lcm import train  # pylint: disable=import-outside-toplevel
    train_fn = train.run
  points = list(points)
  rows = []
  for i, overrides in enumerate(points):
    c = apply_overrides(base, overrides)
    workdir = os.path.join(runs, point_name(overrides))
    summary = _finished(workdir, c.train.steps)
    status = "done before" if summary is not None else "training"
    log(f"[{i + 1}/{len(points)}] {point_name(overrides)}: {status}")
    if summary is None:
      try:
        summary = train_fn(c, workdir)
      except Exception as e:  # pylint: disable=broad-exception-caught
        # One diverged or broken run must not end a long sweep: it is reported (the row's
        # `error`) and skipped; running the sweep again retries it (it is not finished).
        log(f"[{i + 1}/{len(points)}] {point_name(overrides)}: FAILED: {type(e).__name__}: {e}")
        rows.append({**overrides, "workdir": workdir, "best_accuracy": None,
                     "best_step": None, "error": f"{type(e).__name__}: {e}"})
        continue
      if summary.get("preempted"):
        # SIGTERM / SIGINT: the run checkpointed and returned; the sweep stops too (it used
        # to go on to the next point), and running it again resumes this point.
        log(f"[{i + 1}/{len(points)}] {point_name(overrides)}: stopped by "
            f"{summary.get('signal')} at step {summary.get('step')}; the sweep stops (run it "
            f"again to resume)")
        raise SystemExit(0)
    history = eval_history(workdir)
    best = (max(history, key=lambda r: r.get("accuracy", float("-inf"))) if history
            else {"accuracy": summary.get("eval_accuracy"), "step": summary.get("steps")})
    rows.append({**overrides, "workdir": workdir, "best_accuracy": best.get("accuracy"),
                 "best_step": best.get("step"),
                 **{k: v for k, v in summary.items() if k != "config"}})
  return rows


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
  if isinstance(v, int) and not isinstance(v, bool):
    return f"{v:,}"
  return str(v)


def write_table(rows: list[dict], out: str, keys: Sequence[str],
                columns: Sequence[str] = COLUMNS, title: str = "", note: str = "") -> str:
  """Writes ``<out>.csv`` (every field) and ``<out>.md`` (``keys`` then ``columns``);
  returns the Markdown."""
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(out + ".csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                  for k, v in r.items()})
  leaves = [k.rpartition(".")[2] for k in keys]
  columns = [c for c in columns if c not in leaves]  # a swept field is shown once
  head = leaves + columns
  lines = ([f"# {title}", ""] if title else []) + ([note, ""] if note else [])
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in list(keys) + list(columns))
                 + " |")
  text = "\n".join(lines) + "\n"
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write(text)
  return text


def write_json(rows: list[dict], out: str, *, code: Iterable[str] = CODE,
               outputs: Iterable[str] = (), **fields: Any) -> dict:
  """Writes ``<out>.json``: ``{"provenance": ..., "rows": rows, **fields}`` (``code``: the
  paths the rows depend on; ``outputs``: the other files the same command wrote, e.g. the
  ``write_table`` csv / md). Returns what it wrote."""
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  report = provenance.attach({"rows": list(rows), **fields}, code=code, outputs=outputs)
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  return report


def main(argv):
  del argv
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  base = load_config(_CONFIG.value)
  grid = parse_grid(_GRID.value, base)
  rows = run_grid(base, expand_grid(grid), _RUNS.value)
  text = write_table(rows, _OUT.value, list(grid),
                     title=f"Sweep of {_CONFIG.value}",
                     note=f"Made by `python -m experiments.sweep --config={_CONFIG.value} "
                          f"--grid=\"{_GRID.value}\"`.")
  write_json(rows, _OUT.value, outputs=[_OUT.value + ".csv", _OUT.value + ".md"])
  print(text)


def _define_flags(fv=None) -> None:
  """Flags only when run as a program (tests import this next to other experiments); in
  ``fv`` (default: absl's global flags)."""
  global _CONFIG, _GRID, _RUNS, _OUT
  from absl import flags  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS if fv is None else fv
  _CONFIG = flags.DEFINE_string("config", "configs/mqar.py:attention",
                                "Base config: configs/<family>.py:<arg>.", flag_values=fv)
  _GRID = flags.DEFINE_string("grid", "", "key=v1,v2;key2=... (dotted config keys).",
                              flag_values=fv)
  _RUNS = flags.DEFINE_string("runs", "runs/sweep", "Workdirs root.", flag_values=fv)
  _OUT = flags.DEFINE_string("out", "results/sweep", "Output prefix (<out>.csv, .md, .json).",
                             flag_values=fv)


def _check() -> None:
  """Everything but the training: the config loads, the grid parses and every grid point is
  a valid config, the runs folder and the outputs can be written."""
  from experiments import cli  # pylint: disable=import-outside-toplevel
  spec = _CONFIG.value
  if not spec.strip():
    raise cli.CommandLineError("--config is empty; give configs/<family>.py:<arg>, e.g. "
                               "--config=configs/mqar.py:attention")
  path = spec.partition(":")[0]
  if path.endswith(".py") and not os.path.isfile(path):
    raise cli.CommandLineError(f"--config={spec}: {path} does not exist; give "
                               "configs/<family>.py:<arg>, e.g. configs/mqar.py:attention")
  try:
    base = load_config(spec)
  except ConfigError as e:
    raise cli.CommandLineError(f"--config={spec}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise cli.CommandLineError(f"--config={spec}: does not load as a config "
                               f"({provenance.describe_failure(e)}); give "
                               "configs/<family>.py:<arg>") from None
  if not isinstance(base, ml_collections.ConfigDict):
    raise cli.CommandLineError(f"--config={spec}: get_config returned "
                               f"{type(base).__name__}, not a ConfigDict")
  try:
    points = expand_grid(parse_grid(_GRID.value, base))
  except ConfigError as e:
    raise cli.CommandLineError(f"--grid: {e} (the grid is key=v1,v2;key2=... with dotted "
                               "config keys)") from None
  cli.check_configs((f"--grid: grid point {point_name(point)}" if point else
                     f"--config={spec}", apply_overrides(base, point)) for point in points)
  cli.check_outputs(_RUNS.value, _OUT.value, makes_dir=False)


def cli_main(argv=None) -> int:
  """``python -m experiments.sweep`` in-process: the exit status; bad input is one line on
  stderr (experiments/cli.py)."""
  from experiments import cli  # pylint: disable=import-outside-toplevel
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.use_absl_handler()
  sys.exit(cli_main(sys.argv))
