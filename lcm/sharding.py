"""Mesh from config, the one table of logical axis rules, multi-host initialisation.

Parameters carry logical axis names (``out_sharding`` metadata set by
``layers.common.param``); :data:`LOGICAL_RULES` maps them to the mesh axes
``data``, ``fsdp``, ``tensor``, ``sequence``. A logical axis whose mesh axes do not divide
the dimension is replicated instead (so tiny test models still run on big meshes).

``sequence`` (``mesh.sequence``, default 1) is context parallelism: the T axis of the
batch (logical ``seq``) is split over it, and the trainer traces the model inside
:func:`sequence_context`, from which the mixers learn the mesh
(``layers/context_parallel/``). It is the innermost axis (neighbouring devices exchange
halos and states), so with ``mesh.sequence = 1`` devices map to the other axes as before.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from layers import context_parallel
from layers.common import ConfigError
from lcm import config as config_lib

MESH_AXES = ("data", "fsdp", "tensor", context_parallel.AXIS)

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: dict[str, Any] = {
    "batch": context_parallel.BATCH_AXES,  # ("data", "fsdp")
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "state": None,
    "conv": None,
    "seq": context_parallel.AXIS,  # activations' T axis: context parallelism
    "layers": None,
}


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() only when the launch environment asks for it.

  Triggers: LCM_COORDINATOR (host:port) with LCM_NUM_PROCESSES and LCM_PROCESS_ID, or a
  cluster environment JAX detects by itself (JAX_COORDINATOR_ADDRESS, SLURM, TPU pod
  metadata with LCM_DISTRIBUTED=1).
  """
  if jax.distributed.is_initialized():
    return True
  if "LCM_COORDINATOR" in os.environ:
    jax.distributed.initialize(
        coordinator_address=os.environ["LCM_COORDINATOR"],
        num_processes=int(os.environ["LCM_NUM_PROCESSES"]),
        process_id=int(os.environ["LCM_PROCESS_ID"]))
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("LCM_DISTRIBUTED") == "1":
    jax.distributed.initialize()
    return True
  return False


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A (data, fsdp, tensor, sequence) mesh with Auto axis types over ``devices``
  (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.mesh_shape(mesh_cfg, len(devices))
  local = jax.local_device_count()
  if jax.process_count() > 1 and shape["sequence"] > 1 and local % shape["sequence"]:
    # Each process feeds whole rows of its batch shards: a sequence group (the innermost
    # axis, consecutive devices) must sit inside one process.
    raise ConfigError("mesh.sequence", f"must divide the {local} devices of one process "
                      f"(got {shape['sequence']}): the sequence axis cannot span hosts yet")
  n = math.prod(shape.values())
  dev = np.asarray(devices[:n]).reshape(tuple(shape[a] for a in MESH_AXES))
  return Mesh(dev, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes, shape, mesh: Mesh) -> P:
  """PartitionSpec for a value with logical ``axes`` and ``shape`` on ``mesh``."""
  if axes is None:
    return P()
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    target = LOGICAL_RULES.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
    size = math.prod(mesh.shape[t] for t in targets)
    if not targets or dim % size:
      spec.append(None)
      continue
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else targets)
  return P(*spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh):
  """NamedShardings (a pure dict) for an nnx.State of Variables, from their logical axes."""
  def one(v):
    axes = v.get_metadata().get("out_sharding")
    return NamedSharding(mesh, logical_to_spec(axes, v.shape, mesh))
  return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=_is_var))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, T] batches: B over data x fsdp, T over sequence (when that axis is > 1)."""
  seq = LOGICAL_RULES["seq"] if mesh.shape[context_parallel.AXIS] > 1 else None
  return NamedSharding(mesh, P(("data", "fsdp"), seq) if seq else P(("data", "fsdp")))


def sequence_context(mesh: Mesh):
  """The context the model is traced in: with a ``sequence`` axis > 1, the mesh the mixers
  read (``layers.context_parallel.sequence_context``); else nothing."""
  if mesh.shape[context_parallel.AXIS] > 1:
    return context_parallel.sequence_context(mesh)
  return contextlib.nullcontext()


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
