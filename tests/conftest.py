"""Test-wide setup: 8 virtual CPU devices (sharding tests) before any backend starts, faster
XLA compiles, and how the tests are spread over the xdist workers."""

import os

# The suite compiles hundreds of small programs and runs each briefly, so compile time
# dominates it. XLA's backend optimisation level 1 (the default is 2) cut a sample of the
# suite (generate + chunked_scan tests) from 172 s to 107 s on this CPU, and the steps of
# the 200-step training tests ran no slower. A level set by the caller is kept. Subprocesses
# (the CLI and notebook tests) inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=1").strip()
import jax  # noqa: E402

import layers  # noqa: E402,F401  (applies layers/xla_cpu.py before anything runs)

jax.config.update("jax_num_cpu_devices", 8)

# `make test` runs `pytest -n 2 --dist loadfile`, refined by the scheduler below: every test
# file is one work unit (one worker runs the whole file, so module-level compiled functions
# and fixtures are built once), except the files of long independent tests in _SPREAD,
# whose tests are handed out one at a time so they fill the workers' tails instead of
# ending the run on one worker. (xdist's own `--dist loadgroup` marks do nothing under
# pytest >= 9.2: they rewrite `item._nodeid`, which pytest no longer reads.)
_SPREAD = ("tests/layers/test_mqar_training.py", "tests/notebooks/test_notebooks.py",
           "tests/lcm/test_generate.py")


def pytest_xdist_make_scheduler(config, log):
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=import-outside-toplevel

  class FileScheduling(LoadScopeScheduling):
    """Work units = files, or single tests for the files in _SPREAD. xdist queues the
    units largest first (by number of tests), so single tests come last."""

    def _split_scope(self, nodeid):
      path = nodeid.split("::", 1)[0]
      return nodeid if path in _SPREAD else path

  return FileScheduling(config, log)
