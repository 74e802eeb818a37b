"""Helpers shared by the kernel tests: fast-compiling ``jit`` and the lowering export."""

from __future__ import annotations

import jax

FAST_COMPILE = {"xla_backend_optimization_level": 0}  # ~2.5x faster CPU compiles


def jit_fast(fn):
  """``jax.jit`` compiled with a low XLA optimisation level (tests are compile-bound: the
  interpreted kernels run in milliseconds), one executable per argument signature."""
  jitted = jax.jit(fn)
  cache = {}

  def run(*args):
    key = jax.tree.structure(args), tuple(
        (a.shape, a.dtype) for a in jax.tree.leaves(args))
    if key not in cache:
      cache[key] = jitted.lower(*args).compile(compiler_options=FAST_COMPILE)
    return cache[key](*args)

  return run


def export(fn, args, platform):
  """``jax.export`` of ``jax.jit(fn)`` for ``"tpu"`` or ``"cuda"`` (an abstract H100), with
  no hardware: catches unsupported ops and VMEM / shared-memory overflows at lowering."""
  if platform == "tpu":
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  mesh = jax.sharding.AbstractMesh(
      (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
          device_kind="NVIDIA H100", num_cores=132, platform="gpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)
