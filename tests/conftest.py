"""Test-wide setup: 8 virtual CPU devices (sharding tests) before any backend starts."""

import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
