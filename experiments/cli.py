"""What every ``python -m experiments.<x>`` entry point shares for bad input (issue 28):
one line on stderr that names the flag, the allowed values and what to do, never a Python
traceback (``--debug`` re-raises with it), and the exit status (2 bad input).

* :func:`run`: the command, callable in-process as ``cli_main(argv) -> exit status``: fresh
  absl flags per call (``define(fv)``), ``--help``, stray positional arguments refused,
  ``check()`` (cheap validation, before any training or timing), then ``main(argv)``.
* :func:`error_line` / :func:`report`: ``(exit status, line)`` for an exception, printed as
  ``lcm: <line>``; :class:`CommandLineError` is bad input whose message names the flag.
* Validators for the flags the entry points have in common (counts, lists of numbers,
  mixer names, output paths, training workdirs), each raising a named CommandLineError.

``experiments.train`` and ``experiments.generate`` use the error half (their flags are
richer: config files and overrides); every other entry point uses :func:`run`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from typing import Any, Callable, Iterable, Sequence

from absl import flags

from layers.common import ConfigError
from lcm import provenance

HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull", "-helpfull")


class CommandLineError(Exception):
  """A bad flag, config file or config override; the message names it. Not a ValueError,
  so absl's flag parser passes it through unchanged."""


# ----------------------------------------------------------------------------- errors


def wants_debug(argv: Sequence[str]) -> bool:
  """Whether ``--debug`` is on the command line (seen before parsing, so that errors in
  parsing itself can be re-raised)."""
  return any(re.fullmatch(r"--?debug(=(true|t|1|yes))?", a, re.I) for a in argv[1:])


def flag_error_line(e: flags.Error) -> str:
  """absl's flag errors in words: a missing required flag, an unknown one, a bad value."""
  text = provenance.one_line(e)
  m = re.search(r"Flag --([\w.]+) must have a value other than None", text)
  if m:
    return f"--{m.group(1)} is required; see --help"
  m = re.match(r"Unknown command line flag '([^']+)'(?:\. Did you mean: (.*?) \?)?", text)
  if m:
    hint = f"; did you mean --{m.group(2).split(',')[0].strip()}?" if m.group(2) else ""
    return f"--{m.group(1)}: unknown flag{hint} (see --help for the flags)"
  return f"{text} (see --help)"


def error_line(e: BaseException, extra: Callable[[BaseException], tuple[int, str] | None]
               = lambda e: None) -> tuple[int, str]:
  """``(exit status, one line)`` for an exception that ends a command: 2 bad input, 3 a busy
  workdir, 1 a failed run, 130 an interrupt. ``extra`` classifies the caller's own errors
  first."""
  got = extra(e)
  if got is not None:
    return got
  if isinstance(e, CommandLineError):
    return 2, str(e)
  if isinstance(e, flags.Error):
    return 2, flag_error_line(e)
  if isinstance(e, ConfigError):
    return 2, f"Invalid config: {e}"
  if isinstance(e, provenance.WorkdirError):
    return 2, str(e)
  if isinstance(e, provenance.WorkdirBusyError):
    return 3, str(e)
  checkpoint = sys.modules.get("lcm.checkpoint")  # not imported: not raised either
  if checkpoint is not None and isinstance(e, checkpoint.CheckpointError):
    return 1, str(e)
  if isinstance(e, KeyboardInterrupt):
    return 130, (f"interrupted ({str(e) or 'SIGINT'}) before the current step was "
                 "checkpointed; rerun the same command to resume from the last checkpoint")
  return 1, (f"{provenance.describe_failure(e)} (an unexpected error: rerun with --debug for "
             "the traceback)")


def report(code: int, line: str) -> int:
  """Prints ``lcm: line`` as one line on stderr; returns ``code``."""
  print("lcm: " + provenance.one_line(line), file=sys.stderr, flush=True)
  return code


# ----------------------------------------------------------------------------- the command


def define_debug(fv: flags.FlagValues) -> None:
  flags.DEFINE_bool("debug", False, "Re-raise errors with their Python traceback instead of "
                    "the one-line message.", flag_values=fv)


def run(argv: Sequence[str] | None, *, doc: str | None, define: Callable[[flags.FlagValues],
        Any], main: Callable[[list[str]], int | None], check: Callable[[], None] | None = None,
        classify: Callable[[BaseException], tuple[int, str] | None] = lambda e: None,
        positional: int = 0) -> int:
  """An entry point's ``cli_main``: parses ``argv`` (``argv[0]`` is the program) into fresh
  flags (``define(fv)`` defines them), prints ``--help``, refuses more than ``positional``
  positional arguments, runs ``check()`` (cheap validation: it must raise before any heavy
  work) and ``main(argv without flags)``; returns the exit status (``main``'s return value,
  0 for None). Bad input prints one line on stderr (``--debug``: raises instead)."""
  def body(argv: list[str]) -> int:
    if not flags.FLAGS.is_parsed():  # absl logging reads the global flags' defaults
      flags.FLAGS.mark_as_parsed()
    fv = flags.FlagValues()
    define(fv)
    define_debug(fv)
    if any(a in HELP_FLAGS for a in argv[1:]):
      print_help(doc, fv)
      return 0
    rest = fv(argv)
    if len(rest) - 1 > positional:
      extra = rest[1 + positional:]
      raise CommandLineError(
          f"unexpected argument(s) {' '.join(map(repr, extra))}: every option is a "
          f"--flag=value{'' if not positional else f' after at most {positional} positional'}"
          " (see --help)")
    if check is not None:
      check()
    return int(main(rest) or 0)
  return guarded(argv, body, classify)


def guarded(argv: Sequence[str] | None, body: Callable[[list[str]], int],
            classify: Callable[[BaseException], tuple[int, str] | None] = lambda e: None
            ) -> int:
  """``body(argv)``'s exit status; any error it raises is printed as one line on stderr
  (``error_line`` with ``classify``) with its exit status, or re-raised with ``--debug``
  (and SystemExit always)."""
  argv = list(sys.argv if argv is None else argv)
  debug = wants_debug(argv)
  try:
    return body(argv)
  except BaseException as e:  # pylint: disable=broad-except
    if debug or isinstance(e, SystemExit):
      raise
    return report(*error_line(e, classify))


def print_help(doc: str | None, fv: flags.FlagValues) -> None:
  print((doc or "").strip())
  print("\nFlags:")
  print(fv.get_help(include_special_flags=False))


# ----------------------------------------------------------------------------- validators


def closest(name: str, options: Iterable[str]) -> str | None:
  close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
  return close[0] if close else None


def check_int(flag: str, value: Any, *, min_value: int | None = None,
              max_value: int | None = None, what: str = "") -> int:
  """``value`` as an int within [min_value, max_value]; else a CommandLineError naming
  ``--flag`` and the range."""
  ok = isinstance(value, int) and not isinstance(value, bool)
  if ok and min_value is not None and value < min_value:
    ok = False
  if ok and max_value is not None and value > max_value:
    ok = False
  if not ok:
    lo = "" if min_value is None else f">= {min_value}"
    hi = "" if max_value is None else f"<= {max_value}"
    rng = " and ".join(x for x in (lo, hi) if x)
    raise CommandLineError(f"--{flag}={value}: must be an integer {rng}{what}".rstrip())
  return value


def check_float(flag: str, value: Any, *, above: float | None = None,
                min_value: float | None = None, max_value: float | None = None,
                what: str = "") -> float:
  """``value`` as a finite float ``> above`` / ``>= min_value`` / ``<= max_value``."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    x = math.nan
  bad = (not math.isfinite(x) or (above is not None and x <= above)
         or (min_value is not None and x < min_value)
         or (max_value is not None and x > max_value))
  if bad:
    parts = [f"> {above:g}" if above is not None else "",
             f">= {min_value:g}" if min_value is not None else "",
             f"<= {max_value:g}" if max_value is not None else ""]
    rng = " and ".join(p for p in parts if p)
    raise CommandLineError(f"--{flag}={value}: must be a finite number {rng}{what}".rstrip())
  return x


def _items(values: str | Sequence[Any]) -> list[str]:
  items = values.split(",") if isinstance(values, str) else [str(v) for v in values]
  return [s.strip() for s in items]


def int_list(flag: str, values: str | Sequence[Any], *, min_value: int | None = 1,
             allow_empty: bool = False) -> list[int]:
  """Comma-separated integers (each >= min_value), e.g. ``--lengths=512,2048``."""
  items = _items(values)
  out = []
  for item in items:
    try:
      n = int(item)
    except ValueError:
      n = None
    if n is None or (min_value is not None and n < min_value):
      raise CommandLineError(f"--{flag}: {item!r} is not an integer"
                             f"{'' if min_value is None else f' >= {min_value}'}; give a "
                             f"comma-separated list such as --{flag}={max(min_value or 1, 1)},"
                             f"{2 * max(min_value or 1, 1)}")
    out.append(n)
  if not out and not allow_empty:
    raise CommandLineError(f"--{flag} is empty; give at least one value")
  return out


def float_list(flag: str, values: str | Sequence[Any], *, above: float | None = None,
               min_value: float | None = None, max_value: float | None = None,
               allow_empty: bool = False) -> list[float]:
  """Comma-separated finite numbers within the given bounds."""
  out = []
  for item in _items(values):
    try:
      out.append(check_float(flag, item, above=above, min_value=min_value,
                             max_value=max_value))
    except CommandLineError:
      parts = [f"> {above:g}" if above is not None else "",
               f">= {min_value:g}" if min_value is not None else "",
               f"<= {max_value:g}" if max_value is not None else ""]
      rng = " and ".join(p for p in parts if p)
      raise CommandLineError(f"--{flag}: {item!r} is not a finite number {rng}; give a "
                             "comma-separated list of numbers".replace("  ", " ")) from None
  if not out and not allow_empty:
    raise CommandLineError(f"--{flag} is empty; give at least one value")
  return out


def check_mixers(flag: str, patterns: Sequence[str], *, split_commas: bool = True,
                 allowed: Sequence[str] | None = None) -> list[str]:
  """Mixer patterns: each name (a pattern is ``a,b``: absl list flags split it, so names are
  checked one by one) must be registered (or in ``allowed``); else the closest name."""
  from lcm import registry  # pylint: disable=import-outside-toplevel
  names = list(allowed) if allowed is not None else registry.names()
  patterns = [p.strip() for p in patterns]
  if not [p for p in patterns if p]:
    raise CommandLineError(f"--{flag} is empty; give mixer names (registered: "
                           f"{', '.join(names)})")
  for pattern in patterns:
    for name in (pattern.split(",") if split_commas else [pattern]):
      name = name.strip()
      if name not in names:
        close = closest(name, names)
        if allowed is not None and name in registry.names():
          raise CommandLineError(f"--{flag}: {name!r} cannot be used here (allowed: "
                                 f"{', '.join(names)})")
        raise CommandLineError(f"--{flag}: unknown mixer {name!r}"
                               f"{f'; did you mean {close}?' if close else ''} (registered: "
                               f"{', '.join(names)})")
  return patterns


_SYSTEM = ("/proc", "/sys", "/dev")


def _under_system(path: str) -> str | None:
  real = os.path.realpath(path)
  for root in _SYSTEM:
    if real == root or real.startswith(root + os.sep):
      return root
  return None


def _check_parent(flag: str, path: str, what: str) -> None:
  """The nearest existing ancestor of ``path`` is a writable directory (not a file, not
  under /proc, /sys or /dev)."""
  root = _under_system(path)
  if root:
    raise CommandLineError(f"--{flag}={path}: {what} under {root} cannot be written; give a "
                           "path in a writable directory")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise CommandLineError(f"--{flag}={path}: {parent} is a file, not a directory, so "
                           f"{what} cannot be created there; give another path")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise CommandLineError(f"--{flag}={path}: {parent} is not writable; give a path in a "
                           "writable directory")


def check_out_prefix(flag: str, out: str, *, makes_dir: bool = False) -> str:
  """An output prefix (``<out>.md``, ``<out>.json``, and ``<out>/`` when ``makes_dir``): not
  empty, its directory creatable, and (``makes_dir``) ``out`` itself not a file."""
  if not str(out).strip():
    raise CommandLineError(f"--{flag} is empty; give an output prefix such as "
                           f"--{flag}=results/mine")
  if makes_dir and os.path.exists(out) and not os.path.isdir(out):
    raise CommandLineError(f"--{flag}={out}: {out} is a file, but the outputs go into the "
                           f"folder {out}/; give another --{flag}")
  if out.endswith(os.sep) and not makes_dir:
    raise CommandLineError(f"--{flag}={out}: is a folder; give a file prefix such as "
                           f"{out}name")
  _check_parent(flag, out, "the outputs")
  return out


def check_out_file(flag: str, path: str, *, optional: bool = False) -> str:
  """An output file: not a directory, its directory creatable (empty allowed when
  ``optional``)."""
  if not str(path).strip():
    if optional:
      return path
    raise CommandLineError(f"--{flag} is empty; give an output file")
  if os.path.isdir(path):
    raise CommandLineError(f"--{flag}={path}: is a directory; give a file path")
  _check_parent(flag, path, "the file")
  return path


def check_dir(flag: str, path: str) -> str:
  """A folder that will hold workdirs (created when missing): not empty, not a file."""
  if not str(path).strip():
    raise CommandLineError(f"--{flag} is empty; give a folder for the runs (created when "
                           "missing)")
  if os.path.exists(path) and not os.path.isdir(path):
    raise CommandLineError(f"--{flag}={path}: is a file, not a folder; give a folder for the "
                           "runs (created when missing)")
  _check_parent(flag, path if not os.path.isdir(path) else os.path.join(path, "x"),
                "the folder")
  return path


def check_run_workdir(flag: str, workdir: str, *, step: int | None = None) -> list[int]:
  """A training workdir to read (``experiments.train``'s): exists, holds ``config.json`` and a
  checkpoint (``step`` among them when given). Returns its checkpoint steps."""
  from lcm import generate  # pylint: disable=import-outside-toplevel
  try:
    generate.load_config(workdir)
  except generate.GenerateError as e:
    raise CommandLineError(f"--{e}") from None
  steps = generate.checkpoint_steps(workdir)
  if not steps:
    raise CommandLineError(f"--{flag}: {workdir} has no checkpoint yet ({workdir}/checkpoints "
                           "is empty or missing): let its training run reach its first "
                           "checkpoint (train.checkpoint_every) or finish")
  if step is not None and step not in steps:
    raise CommandLineError(f"--step={step}: {workdir} has no checkpoint at that step; its "
                           f"steps: {', '.join(map(str, steps))}")
  return steps


def check_configs(configs: Iterable[tuple[str, Any]]) -> None:
  """Validates every ``(label, config)`` a command will run (``lcm.config.validate``)
  before any of them runs; the first bad one is one line, ``<label> is not a valid config:
  <field>: <reason>``."""
  from lcm import config as config_lib  # pylint: disable=import-outside-toplevel
  for label, c in configs:
    try:
      config_lib.validate(c)
    except ConfigError as e:
      raise CommandLineError(f"{label} is not a valid config: {e}") from None


def check_outputs(runs: str, out: str, *, makes_dir: bool = True) -> None:
  """``--runs`` (a folder for the runs) and ``--out`` (the results prefix) of a command."""
  check_dir("runs", runs)
  check_out_prefix("out", out, makes_dir=makes_dir)
