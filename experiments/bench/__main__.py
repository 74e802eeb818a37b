"""``python -m experiments.bench [MODE] [--flags]``: runs one benchmark (see the package
docstring); MODE is one of ``common.MODES`` (default ``--what``)."""

from __future__ import annotations

from absl import app, logging

from experiments.bench import auto, common, context_parallel, decode, kernels, layers, swa

MAINS = {"decode": decode.main, "kernels": kernels.main, "layers": layers.main,
         "swa": swa.main, "auto": auto.main, "context_parallel": context_parallel.main}


def main(argv):
  if common.HUGE_PAGES.value:
    common.with_huge_pages()
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 2 or (len(argv) == 2 and argv[1] not in common.MODES):
    raise app.UsageError(f"one optional positional argument, one of "
                         f"{', '.join(common.MODES)}; got {argv[1:]}")
  what = argv[1] if len(argv) == 2 else common.WHAT.value
  MAINS[what]()


if __name__ == "__main__":
  app.run(main)
