"""lcm: the model, trainer, data and evals around the mixers in ``layers``."""

import layers  # noqa: F401  (applies layers/xla_cpu.py before any JAX computation)
