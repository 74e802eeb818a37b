"""Flax NNX token mixers, one file per family (see DESIGN.md, "The mixer contract")."""

from layers import xla_cpu  # noqa: F401  (XLA:CPU work-around; must run before JAX starts)
