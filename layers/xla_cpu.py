"""Work-around for a silent XLA:CPU miscompile in jaxlib 0.12 (found in session 5).

jaxlib 0.12.0.1's CPU compiler groups dots with their neighbouring element-wise ops into
YNNPACK fusions (``kind=kCustom``, ``"__ynn_fusion"`` in the optimised HLO). For some
programs the fused code reads memory it never wrote: the jitted Mamba2 layer at d_model 32,
batch >= 64, one chunk returned all zeros, NaN or a different wrong value in every process
(eager execution, other batch sizes and the same program without that fusion were right),
which made MQAR runs diverge at step 1 or train a model whose outputs were garbage.
``--xla_cpu_experimental_ynn_fusion_type=`` (an empty list of fusion kinds) turns the YNN
fusions off; with it the results equal eager execution in every case tried.

The flag is added to ``XLA_FLAGS`` when this package is imported, for jaxlib 0.12 only (an
unknown flag is fatal in XLA, and later versions may drop it). XLA reads ``XLA_FLAGS`` when
the first backend starts, so lcm must be imported before the first JAX computation; a
warning says so otherwise. ``tests/layers/test_ssm.py::test_jit_equals_eager_at_batch_64``
guards against a regression (it fails without the flag on jaxlib 0.12.0.1).
"""

from __future__ import annotations

import os
import warnings

FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def needed() -> bool:
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return jaxlib.__version__.startswith("0.12.")


def apply() -> bool:
  """Adds FLAG to XLA_FLAGS (unless the caller set that option); True if it was added."""
  flags = os.environ.get("XLA_FLAGS", "")
  if not needed() or "xla_cpu_experimental_ynn_fusion_type" in flags:
    return False
  os.environ["XLA_FLAGS"] = (flags + " " + FLAG).strip()
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if xla_bridge.backends_are_initialized():
    warnings.warn("lcm was imported after JAX started its backends, so XLA_FLAGS "
                  f"{FLAG!r} (a work-around for an XLA:CPU miscompile in jaxlib 0.12, see "
                  "layers/xla_cpu.py) has no effect in this process: import lcm (or "
                  "layers) before running any JAX computation.", stacklevel=3)
  return True


apply()
