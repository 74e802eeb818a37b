"""Flax NNX token mixers, one module per mixer or tight family.

Every mixer follows the mixer contract of docs/design.md ("The mixer contract").
"""

from layers import xla_cpu  # noqa: F401  (XLA:CPU work-around; must run before JAX starts)
