"""Train one experiment: python -m experiments.train --config=configs/mqar.py:attention --workdir=DIR

Rerunning the same command resumes from the newest checkpoint in DIR. One run per DIR at a
time (DIR/.lock); every start is appended to DIR/history.jsonl; a changed model / data / seed
config is refused unless --allow_config_change; a finished run is reported, not rerun;
SIGTERM / SIGINT checkpoint the current step and exit 0 (docs/operations.md).

Bad input never ends in a Python traceback: stderr ends in one line naming the flag or
config field, the allowed values and what to do (--debug re-raises with the traceback).
``--config_help`` lists every config field with its value and type.

Exit status: 0 trained, finished earlier, stopped by a signal with a checkpoint, or --help /
--config_help; 1 the run failed (no usable checkpoint, non-finite loss, full disk, an
unexpected error); 2 bad input (a flag, the config file, a config field, the workdir path) or
a changed config; 3 the workdir is in use by another run; 130 a second signal.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import os
import re
import sys
from typing import Any, Sequence

from absl import flags, logging
from ml_collections import config_dict, config_flags

from layers.common import ConfigError
from experiments import cli
from experiments.cli import (  # noqa: F401  the error machinery, shared with every entry point
    HELP_FLAGS, CommandLineError, error_line, flag_error_line, report, wants_debug)
from lcm import provenance, registry, sharding, train

USAGE = ("python -m experiments.train --config=configs/<family>.py:<arg> --workdir=DIR "
         "[--config.<field>=<value> ...]")

# Names users reach for that the config spells differently (suggested before difflib's).
SYNONYMS = {
    "learning_rate": "lr", "lr_rate": "lr", "num_steps": "steps", "max_steps": "steps",
    "total_steps": "steps", "train_steps": "steps", "warmup": "warmup_steps",
    "batch": "batch_size", "bs": "batch_size", "heads": "num_heads", "n_heads": "num_heads",
    "n_layers": "num_layers", "layers": "num_layers", "depth": "num_layers",
    "hidden_size": "d_model", "dim": "d_model", "width": "d_model", "vocab": "vocab_size",
    "seq_length": "seq_len", "sequence_length": "seq_len", "context_length": "seq_len",
    "clip": "grad_clip", "clip_norm": "grad_clip", "wd": "weight_decay",
}


# ----------------------------------------------------------------------------- config file


def _suggest(name: str, options: Sequence[str]) -> str | None:
  options = list(options)
  alias = SYNONYMS.get(name.lower())
  if alias in options:
    return alias
  close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
  return close[0] if close else None


def _config_files() -> str:
  """The config files under configs/ (those that define get_config), for messages."""
  out = []
  for p in sorted(glob.glob(os.path.join(provenance.ROOT, "configs", "*.py"))):
    try:
      with open(p, encoding="utf-8") as f:
        if "def get_config(" in f.read():
          out.append(os.path.relpath(p))
    except OSError:
      pass
  return ", ".join(out)


def load_config_file(spec: str) -> config_dict.ConfigDict:
  """``get_config(arg)`` of ``path.py[:arg]``, with a CommandLineError naming what is wrong
  (no such file, no get_config, get_config failed or returned something else)."""
  if not spec or not spec.strip():
    raise CommandLineError(f"--config is empty; give configs/<family>.py:<arg> (one of "
                           f"{_config_files()})")
  path, *arg = spec.split(":", 1)
  where = f"--config={spec}"
  if not os.path.exists(path):
    raise CommandLineError(f"{where}: {path} does not exist; give configs/<family>.py:<arg> "
                           f"(one of {_config_files()})")
  if not os.path.isfile(path) or not path.endswith(".py"):
    raise CommandLineError(f"{where}: {path} is not a Python config file; give "
                           f"configs/<family>.py:<arg> (one of {_config_files()})")
  try:
    module_spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise CommandLineError(f"{where}: {path} failed to load "
                           f"({provenance.describe_failure(e)})") from e
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise CommandLineError(f"{where}: {path} defines no get_config(arg), so it is not a "
                           "config file")
  try:
    config = get_config(*arg)
  except ConfigError as e:
    raise CommandLineError(f"Invalid config: {e}") from e
  except Exception as e:  # pylint: disable=broad-except
    raise CommandLineError(f"{where}: get_config({', '.join(map(repr, arg))}) failed "
                           f"({provenance.describe_failure(e)})") from e
  if not isinstance(config, config_dict.ConfigDict):
    raise CommandLineError(f"{where}: get_config returned {type(config).__name__}, not an "
                           "ml_collections.ConfigDict")
  return config


def config_overrides(argv: Sequence[str], name: str = "config") -> list[tuple[str, str | None]]:
  """``[(field path, value or None), ...]`` of every ``--config.<path>[=value]`` in argv,
  as ml_collections finds them (``--noconfig.x`` sets a bool to False)."""
  out = []
  for i, arg in enumerate(argv):
    m = re.match(rf"-{{1,2}}(no)?{name}\.([^=]*)(=(.*))?$", arg, re.S)
    if not m:
      continue
    value = m.group(4)
    if value is None and not m.group(1) and i + 1 < len(argv) \
        and not argv[i + 1].startswith("-"):
      value = argv[i + 1]
    out.append((m.group(2), value))
  return out


def _pattern(config, overrides) -> list[str]:
  values = [v for p, v in overrides if p == "model.pattern" and v is not None]
  pattern = values[-1] if values else config.get("model", {}).get("pattern", "")
  return [p.strip() for p in str(pattern).split(",") if p.strip()]


def _mixer_override(config, path: str, parts: list[str], pattern: list[str]) -> None:
  """``model.mixers.<name>[.<field>]``: the mixer must be registered and in the pattern (an
  override of any other mixer would do nothing); a field of a mixer that the config file
  gave no overrides is added with its default, so the override has a type to parse."""
  name, names = parts[2], registry.names()
  flag = f"--config.{path}"
  if name not in names:
    close = _suggest(name, names)
    raise CommandLineError(f"{flag}: unknown mixer '{name}'"
                           f"{f'; did you mean {close}?' if close else ''} (registered: "
                           f"{', '.join(names)})")
  if name not in pattern:
    raise CommandLineError(
        f"{flag}: mixer '{name}' is not in model.pattern ({','.join(pattern) or 'empty'}), "
        f"so this override would change nothing; add it to the pattern (e.g. "
        f"--config.model.pattern={name}) or drop the flag")
  mixers = config.model.mixers
  if name not in mixers:
    with mixers.unlocked():
      mixers[name] = config_dict.ConfigDict()
  if len(parts) == 3:
    return
  fields = registry.config_fields(name)
  field = parts[3]
  if field not in fields or len(parts) > 4:
    close = _suggest(field, list(fields))
    raise CommandLineError(f"{flag}: mixer '{name}' has no field '{'.'.join(parts[3:])}'"
                           f"{f'; did you mean {close}?' if close else ''} (its fields: "
                           f"{', '.join(fields)})")
  if field not in mixers[name]:
    default = fields[field]
    with mixers[name].unlocked():
      # A None default has no type: any Python literal parses (the layer checks it).
      mixers[name][field] = config_dict.placeholder(object) if default is None else default


def check_overrides(config: config_dict.ConfigDict, overrides) -> None:
  """Every ``--config.<path>`` names an existing field (else the closest one is suggested);
  mixer overrides follow :func:`_mixer_override`."""
  pattern = _pattern(config, overrides)
  for path, _ in overrides:
    parts = path.split(".")
    if len(parts) >= 3 and parts[:2] == ["model", "mixers"] \
        and isinstance(config.get("model"), config_dict.ConfigDict) \
        and isinstance(config.model.get("mixers"), config_dict.ConfigDict):
      _mixer_override(config, path, parts, pattern)
      continue
    node, done = config, []
    for part in parts:
      if not isinstance(node, config_dict.ConfigDict):
        raise CommandLineError(f"--config.{path}: {'.'.join(done)} is a value "
                               f"({type(node).__name__}), not a section with fields")
      if not part or part not in node:
        section = ".".join(done)
        close = _suggest(part, list(node.keys()))
        hint = f"; did you mean --config.{'.'.join(done + [close])}?" if close else ""
        raise CommandLineError(f"--config.{path}: no such field{hint} "
                               f"({section or 'the config'} has: "
                               f"{', '.join(sorted(node.keys()))}; --config_help lists "
                               "every field)")
      node = node[part]
      done.append(part)


class ConfigFileParser(flags.ArgumentParser):
  """ml_collections' parser of ``--config=path.py:arg`` with named errors: the file is
  loaded by :func:`load_config_file`, every ``--config.<field>`` override of ``argv`` is
  checked by :func:`check_overrides` before ml_collections applies it, then the config is
  locked (no new fields)."""

  def __init__(self, name: str, argv: Sequence[str] | None):
    self.name = name
    self._argv = argv

  def flag_type(self):
    return "config object"

  def parse(self, path):
    if isinstance(path, config_dict.ConfigDict):
      return path
    config = load_config_file(path)
    argv = sys.argv if self._argv is None else self._argv
    check_overrides(config, config_overrides(argv, self.name))
    config.lock()
    return config


# ----------------------------------------------------------------------------- flags


def _define_flags(fv: flags.FlagValues = flags.FLAGS, argv: Sequence[str] | None = None, *,
                  require_workdir: bool = True) -> dict[str, flags.FlagHolder]:
  """The command's flags, in ``fv`` (each call of :func:`cli_main` uses a fresh one);
  ``argv`` is where the config flag finds its overrides (default sys.argv)."""
  holders = {
      "config": config_flags.DEFINE_config_file(
          "config", None, "configs/<family>.py:<arg>; override any field with "
          "--config.<field>=<value> (--config_help lists them)", flag_values=fv,
          lock_config=True, sys_argv=None if argv is None else list(argv)),
      "workdir": flags.DEFINE_string(
          "workdir", None, "Output directory (metrics, checkpoints); created when missing.",
          flag_values=fv),
      "allow_config_change": flags.DEFINE_bool(
          "allow_config_change", False,
          "Continue the run in --workdir although its model / data / seed config differs "
          "from the new one (the changes are recorded in history.jsonl).", flag_values=fv),
      "config_help": flags.DEFINE_bool(
          "config_help", False, "Print every field of --config (value and type) and exit.",
          flag_values=fv),
      "debug": flags.DEFINE_bool(
          "debug", False, "Re-raise errors with their Python traceback instead of the "
          "one-line message.", flag_values=fv),
  }
  fv["config"].parser = ConfigFileParser("config", argv)  # named errors (see the class)
  flags.mark_flags_as_required(["config", "workdir"] if require_workdir else ["config"],
                               flag_values=fv)
  return holders


def _type_name(value: Any) -> str:
  return "None" if value is None else type(value).__name__


def config_listing(config: config_dict.ConfigDict) -> list[str]:
  """``field = value  (type)`` for every field, sections flattened with dots; for each mixer
  in the pattern, every field it accepts (its defaults included); overrides of mixers that
  are not in the pattern are marked unused."""
  rows = []

  def walk(node, prefix):
    for key in sorted(node.keys()):
      value, path = node[key], f"{prefix}{key}"
      if isinstance(value, config_dict.ConfigDict) and key != "mixers":
        walk(value, path + ".")
      elif key != "mixers":
        rows.append(f"{path} = {value!r}  ({_type_name(value)})")
  walk(config, "")
  model = config.get("model")
  if isinstance(model, config_dict.ConfigDict):
    mixers = model.get("mixers") or {}
    pattern = [p.strip() for p in str(model.get("pattern", "")).split(",") if p.strip()]
    for name in dict.fromkeys(list(pattern) + list(mixers.keys())):
      if name not in registry.names():
        continue
      given = dict(mixers.get(name, {}))
      cls = registry.get(name)
      annotations = {f.name: f.type for f in dataclasses.fields(cls.Config)}
      used = name in pattern
      for field, default in registry.config_fields(name).items():
        if not used and field not in given:
          continue
        value = given.get(field, default)
        kind = annotations.get(field)
        kind = kind if isinstance(kind, str) else getattr(kind, "__name__", _type_name(value))
        note = ("" if field in given else ", default") if used else \
            ", unused: not in model.pattern"
        rows.append(f"model.mixers.{name}.{field} = {value!r}  ({kind}{note})")
  return rows


def _help(fv: flags.FlagValues, argv: Sequence[str], full: bool) -> int:
  print(__doc__.strip().splitlines()[0])
  print(f"\nUsage: {USAGE}\n\nFlags:")
  print(fv.get_help(include_special_flags=False))
  if full:
    spec = next((v for p, v in _plain_flags(argv) if p == "config"), None)
    if spec:
      print(f"\nConfig fields of {spec}:")
      print("\n".join("  " + r for r in config_listing(load_config_file(spec))))
    else:
      print("\nAdd --config=configs/<family>.py:<arg> to list its fields (or use "
            "--config_help).")
  return 0


def _plain_flags(argv: Sequence[str]) -> list[tuple[str, str | None]]:
  out = []
  for i, arg in enumerate(argv):
    m = re.match(r"--?([\w]+)(=(.*))?$", arg, re.S)
    if m:
      value = m.group(3)
      if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
        value = argv[i + 1]
      out.append((m.group(1), value))
  return out


# ----------------------------------------------------------------------------- main


def _classify(e: BaseException) -> tuple[int, str] | None:
  if isinstance(e, train.ConfigChangeError):
    return 2, str(e)
  if isinstance(e, train.NonFiniteError):
    return 1, f"{e}; lower train.lr or set train.nan_policy=skip"
  return None


def cli_main(argv: Sequence[str] | None = None) -> int:
  """The command, callable in-process: parses ``argv`` (``argv[0]`` is the program) into
  fresh flags, trains, and returns the exit status; bad input prints one line on stderr
  (``--debug``: raises instead)."""
  return cli.guarded(argv, _main, _classify)


def _main(argv: list[str]) -> int:
  if not flags.FLAGS.is_parsed():  # absl logging reads the global flags' defaults
    flags.FLAGS.mark_as_parsed()
  fv = flags.FlagValues()
  config_help = any(re.fullmatch(r"--?config_help(=(true|t|1|yes))?", a, re.I)
                    for a in argv[1:])
  f = _define_flags(fv, argv, require_workdir=not config_help)
  if any(a in HELP_FLAGS for a in argv[1:]):
    return _help(fv, argv, full="--helpfull" in argv or "-helpfull" in argv)
  if not any(re.match(r"--?(config|flagfile)(=|$)", a) for a in argv[1:]):
    raise CommandLineError("--config is required: configs/<family>.py:<arg>, e.g. "
                           f"--config=configs/mqar.py:attention (usage: {USAGE})")
  rest = fv(argv)
  if rest[1:]:
    raise CommandLineError(f"unexpected argument(s) {' '.join(map(repr, rest[1:]))}: every "
                           f"option is a --flag=value (usage: {USAGE})")
  config = f["config"].value
  if f["config_help"].value:
    print(f"Config fields of {fv['config'].config_filename} (override any with "
          "--config.<field>=<value>):")
    print("\n".join("  " + r for r in config_listing(config)))
    return 0
  logging.set_verbosity(logging.WARNING)
  sharding.maybe_initialize_distributed()
  workdir = f["workdir"].value
  out = train.run(config, workdir, guard=True, allow_config_change=f["allow_config_change"].value)
  if out.get("finished"):
    print(f"{workdir} is a finished run ({out['steps']} steps); nothing was changed. Its "
          f"summary: {workdir}/summary.json (raise --config.train.steps to train further)")
    return 0
  if out.get("preempted"):
    print(f"lcm: stopped by {out['signal']} after step {out['step']} of {out['steps']}; "
          f"checkpoint {out['checkpoint']}; rerun the same command to resume",
          file=sys.stderr)
    return 0
  print(f"eval_accuracy={out['eval_accuracy']:.4f} eval_loss={out['eval_loss']:.4f} "
        f"steps={out['steps']} tokens/s={out['tokens_per_second']:.0f} "
        f"wall={out['wall_seconds']:.1f}s -> {workdir}/summary.json")
  return 0


if __name__ == "__main__":
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
