"""``python -m experiments.bench [MODE] [--flags]``: runs one benchmark (see the package
docstring); MODE is one of ``common.MODES`` (default ``--what``).

Bad input (an unknown mode or flag, a count below 1, an unknown mixer, an output path that
cannot be written) ends in one line on stderr naming the flag, exit status 2, before anything
is compiled or timed; ``--debug`` re-raises with the traceback (experiments/cli.py)."""

from __future__ import annotations

import copy
import sys
from typing import Sequence

from absl import flags, logging

from experiments import cli
from experiments.bench import auto, common, context_parallel, decode, kernels, layers, swa

MAINS = {"decode": decode.main, "kernels": kernels.main, "layers": layers.main,
         "swa": swa.main, "auto": auto.main, "context_parallel": context_parallel.main}

if "debug" not in flags.FLAGS:
  cli.define_debug(flags.FLAGS)

# Per mode: integer flags that must be >= 1 (>= 0 for ZERO_OK), lists of integers >= 1,
# lists of mixer names and floats that must be > 0. The shared flags are checked for all.
POSITIVE = {
    "decode": ("d_model", "num_layers", "tokens"),
    "kernels": ("batch", "heads", "head_dim", "chunk_size", "reference_max_len",
                "dense_max_len", "fit_from", "matmul_size"),
    "layers": ("layers_d_model", "layers_d_state", "layers_head_dim", "layers_expand",
               "layers_chunk_size", "layers_titans_heads", "layers_titans_chunk"),
    "swa": ("swa_seq_len", "swa_batch", "swa_heads", "swa_head_dim", "swa_window",
            "swa_block_size"),
    "auto": ("auto_short_len", "auto_long_len"),
    "context_parallel": ("cp_seq_len", "cp_d_model", "cp_search_from", "cp_search_to"),
}
ZERO_OK = {"swa": ("swa_dense_query_block",), "context_parallel": ("cp_budget_mb",)}
INT_LISTS = {"decode": ("contexts",), "kernels": ("lengths",),
             "layers": ("layers_lengths", "layers_peer_lengths", "layers_ssm_lengths",
                        "layers_titans_lengths"),
             "context_parallel": ("cp_sizes",)}
MIXER_LISTS = {"decode": ("mixers",), "context_parallel": ("cp_mixers",)}
FLOATS = {"layers": ("layers_max_temp_gib",), "auto": ("auto_max_temp_gib",)}


def main(argv):
  if common.HUGE_PAGES.value:
    common.with_huge_pages()
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 2 or (len(argv) == 2 and argv[1] not in common.MODES):
    raise cli.CommandLineError(f"one optional positional argument, one of "
                               f"{', '.join(common.MODES)}; got {argv[1:]}")
  what = argv[1] if len(argv) == 2 else common.WHAT.value
  MAINS[what]()


def check(fv: flags.FlagValues, rest: Sequence[str]) -> str:
  """The mode of an already parsed command line (``rest``: its positional arguments), with
  every flag that mode reads checked; a CommandLineError names the first bad one."""
  if len(rest) > 2:
    raise cli.CommandLineError(f"unexpected argument(s) {' '.join(map(repr, rest[2:]))}: at "
                               f"most one mode ({', '.join(common.MODES)}), then --flags")
  if len(rest) == 2 and rest[1] not in common.MODES:
    close = cli.closest(rest[1], common.MODES)
    raise cli.CommandLineError(f"mode {rest[1]!r}: unknown benchmark"
                               f"{f'; did you mean {close}?' if close else ''} (modes: "
                               f"{', '.join(common.MODES)})")
  what = rest[1] if len(rest) == 2 else fv["what"].value
  cli.check_int("repeats", fv["repeats"].value, min_value=1)
  cli.check_float("max_call_seconds", fv["max_call_seconds"].value, above=0.0)
  if fv["out"].value:
    cli.check_out_prefix("out", fv["out"].value)
  for name in POSITIVE.get(what, ()):
    cli.check_int(name, fv[name].value, min_value=1)
  for name in ZERO_OK.get(what, ()):
    cli.check_int(name, fv[name].value, min_value=0, what=" (0: see --help)")
  for name in INT_LISTS.get(what, ()):
    cli.int_list(name, fv[name].value, min_value=1)
  for name in MIXER_LISTS.get(what, ()):
    cli.check_mixers(name, fv[name].value)
  for name in FLOATS.get(what, ()):
    cli.check_float(name, fv[name].value, above=0.0)
  return what


def cli_main(argv: Sequence[str] | None = None) -> int:
  """The command, callable in-process: checks ``argv`` on a copy of absl's flags (nothing is
  compiled or timed for bad input: one line on stderr, exit status 2; ``--debug`` raises),
  then parses absl's global flags (the benchmark modules read them) and runs the mode."""
  argv = list(sys.argv if argv is None else argv)
  debug = cli.wants_debug(argv)
  try:
    if any(a in cli.HELP_FLAGS for a in argv[1:]):
      cli.print_help(__doc__, flags.FLAGS)
      return 0
    fv = copy.deepcopy(flags.FLAGS)  # parsing here leaves the global flags untouched
    rest = fv(argv)
    check(fv, rest)
    rest = flags.FLAGS(argv)  # the run: the modules read absl's global flags
    main(rest)
    return 0
  except BaseException as e:  # pylint: disable=broad-except
    if debug or isinstance(e, SystemExit):
      raise
    return cli.report(*cli.error_line(e))


if __name__ == "__main__":
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
