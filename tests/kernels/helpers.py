"""Helpers shared by the kernel tests: fast-compiling ``jit`` and the lowering export."""

from __future__ import annotations

import jax
import numpy as np

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


def worst_group_rel_err(ref, got, groups):
  """max |got - ref| / max |ref| within each group, worst group: a strongly decaying head
  or channel is judged on its own scale. ``groups`` is a list of index functions."""
  ref = np.asarray(ref, np.complex128)
  got = np.asarray(got, np.complex128)
  assert np.all(np.isfinite(got)), "non-finite values"
  worst = 0.0
  for pick in groups:
    r, g_ = pick(ref), pick(got)
    scale = np.max(np.abs(r))
    if scale == 0.0:
      assert np.max(np.abs(g_)) == 0.0
      continue
    worst = max(worst, np.max(np.abs(g_ - r)) / scale)
  return worst


def per_head_rel_err(ref, got, bth):
  """Worst per-head relative error; heads on axis 2 of [B,T,H,...] (when the leading shape
  is ``bth``), else axis 1 of [B,H,...]."""
  ref = np.asarray(ref)
  axis = 2 if ref.ndim >= 3 and ref.shape[:3] == tuple(bth) else 1
  return worst_group_rel_err(
      ref, got, [lambda a, h=h: np.take(a, h, axis=axis) for h in range(bth[2])])


def rel_rms(ref, got):
  ref = np.asarray(ref, np.float64)
  got = np.asarray(got, np.float64)
  assert np.all(np.isfinite(got)), "non-finite values"
  return np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2))
