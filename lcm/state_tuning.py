"""State tuning: train only the initial recurrent state of a frozen LM.

After "State Tuning: State-based Test-Time Scaling on RWKV-7" (its code: TorchRWKV's
flash-linear-attention fork): every weight of a trained model stays fixed and the only
trained parameters are the states each recurrent layer starts a sequence from. What the state
holds at position 0 is then knowledge every sequence can read, at no cost per token.

    python -m experiments.state_tuning --init_from=runs/base --workdir=runs/tuned

How lcm does it, and the choices made here:

* **Any recurrent mixer.** :class:`StateTunedLM` holds the frozen LM and one
  :class:`InitialState` parameter per tuned leaf of the LM's decode state (``LM.init_state``),
  without the batch axis; the forward pass broadcasts them over the batch and runs
  ``LM.step(tokens, state)`` (the chunked form, which starts from any state and is
  differentiable). Nothing is mixer-specific: the leaves are found from the state's shapes,
  so gated_deltanet, deltanet, gla, mamba2, linear_attention, retnet, ..., and any later
  mixer with a recurrent ``init_state`` / ``step`` (rwkv7) are covered. A tuned leaf is a
  floating-point leaf with one batch axis whose shape does not grow with ``max_len`` (a KV
  cache does: attention layers of a hybrid keep their empty cache; integer leaves such as
  position counters keep their initial value). ``leaves="all"`` (the default) tunes every
  such leaf: the matrix states and the small short-convolution / token-shift buffers (a
  learned "virtual prefix" of a few inputs); ``leaves="matrix"`` only the leaves with at
  least three axes after the batch axis (``[H, Dk, Dv]``, Mamba2's ``[H, P, N]``), the
  paper's choice of tuning only the WKV state. A model with no tuned leaf is refused
  (:class:`StateTuningError`).
* **Start = the frozen model.** The states start at zero, i.e. at the LM's own initial
  state, so before the first update the tuned model computes exactly what the frozen one
  does (``LM.step`` from zeros equals ``LM.__call__``, the mixer contract).
* **The ordinary trainer** (``lcm.train.run`` with :class:`lcm.train.ModelHooks`): the same
  optimizer, schedule, logging, Orbax checkpoints, resumption and workdir lock; ``trainable``
  = :class:`InitialState`, so gradients, clipping and AdamW cover only the states, and the
  frozen weights pass through every step bit for bit (no gradient, no optimizer state, no
  weight decay). The states carry the optimizer tag ``initial_state`` (a
  ``train.param_groups`` entry can give them their own lr / weight decay). Checkpoints hold
  the frozen weights too, so a tuned workdir is self-contained (:func:`load_tuned`).
* **Where the weights come from**: the newest checkpoint of a *finished* run (``--init_from``;
  its ``summary.json`` reached ``train.steps``). The tuning config's model section is always
  the base run's; its data fields ``vocab_size``, ``seq_len``, ``num_kv_pairs``, ``power_a``
  and ``random_non_queries`` default to the base run's (:func:`tuning_config`).
  ``workdir/state_tuning.json`` records the base (path, step) and ``leaves``; a restart with
  another base or ``leaves`` is refused.
* **Decoding** uses the tuned state too: :meth:`StateTunedLM.init_state` is the broadcast
  tuned state, so ``lcm.generate.generate(tuned_model, ...)`` prefills and decodes from it.
* **Packed rows** (``segment_ids``) are refused: ``LM.step`` has no document resets, and
  each document would need to restart from the tuned state.
* **Not implemented**: the paper's enlarged state by kernel upscaling, its observer
  (distillation) framework and Decorrelated Backpropagation; the states are plain
  AdamW-trained tensors of the model's own state shapes. A mixer's auxiliary loss (MoM) is
  not added (``step`` returns none).

The task the experiment uses is MQAR with a hidden dictionary (``data.task =
"mqar_hidden"``, ``lcm/data/tasks/mqar_hidden.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from layers.common import ConfigError
from lcm import checkpoint as ckpt_lib
from lcm import config as config_lib
from lcm import generate as generate_lib
from lcm import model as model_lib
from lcm import train
from lcm.data import pipeline

LEAVES = ("all", "matrix")
META = "state_tuning.json"
TAG = "initial_state"
# Data fields a tuning config takes from the base run unless the command line sets them.
INHERITED_DATA = ("vocab_size", "seq_len", "num_kv_pairs", "power_a", "random_non_queries")
# The max_len / batch pairs the tuned leaves are found with (any two distinct values do).
_PROBES = ((1, 16), (1, 32), (2, 16))


class StateTuningError(ValueError):
  """Bad input to state tuning; ``argument`` names it (init_from, workdir, leaves, ...)."""

  def __init__(self, argument: str, message: str):
    self.argument = argument
    super().__init__(f"{argument}: {message}")


class InitialState(nnx.Param):
  """A learned initial state of one leaf of the LM's decode state (no batch axis)."""


# ----------------------------------------------------------------------------- the model


def tunable_leaves(lm: model_lib.LM, leaves: str = "all") -> list[tuple[int, int, tuple]]:
  """``[(index in the flattened init_state, batch axis, shape without it), ...]``: the
  leaves of ``lm``'s decode state that state tuning learns (module docstring)."""
  if leaves not in LEAVES:
    raise StateTuningError("leaves", f"must be one of {', '.join(LEAVES)} (got {leaves!r})")
  probes = [jax.tree.flatten(lm.init_state(b, max_len=n)) for b, n in _PROBES]
  (a, tree), (longer, _), (wider, _) = probes
  if any(t != tree for _, t in probes):
    return []  # a state whose structure depends on the cache length: nothing to tune
  out = []
  for i, (x, y, z) in enumerate(zip(a, longer, wider)):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.shape != y.shape:
      continue  # counters; caches that grow with max_len
    axes = [d for d in range(x.ndim) if x.shape[d] != z.shape[d]]
    if len(axes) != 1:
      continue
    axis = axes[0]
    if leaves == "matrix" and x.ndim - 1 - axis < 3:
      continue
    out.append((i, axis, tuple(x.shape[:axis] + x.shape[axis + 1:])))
  return out


class StateTunedLM(nnx.Module):
  """A frozen :class:`lcm.model.LM` (``self.lm``) with learned initial states
  (``self.states``); called, stepped and sized like the LM."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, leaves: str = "all"):
    self.lm = model_lib.LM(cfg, rngs=rngs)
    spec = tunable_leaves(self.lm, leaves)
    if not spec:
      what = "matrix-state leaf (>= 3 axes per example)" if leaves == "matrix" else \
          "recurrent state"
      raise StateTuningError(
          "model", f"pattern {cfg.pattern!r} has no {what} to tune: state tuning needs a "
          "mixer whose init_state / step carries a state that does not grow with max_len "
          "(gated_deltanet, deltanet, gla, mamba2, linear_attention, ...)"
          + ("; try leaves=all" if leaves == "matrix" else ""))
    self.leaves = leaves
    self.spec = tuple((i, axis) for i, axis, _ in spec)  # static: in the graphdef
    self.states = nnx.List([
        InitialState(jnp.zeros(shape, jnp.float32), out_sharding=(None,) * len(shape),
                     eager_sharding=False, optim_tag=TAG) for _, _, shape in spec])
    self.has_aux_loss = False

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    """The LM's decode state with every tuned leaf set to its learned value (broadcast)."""
    leaves, tree = jax.tree.flatten(self.lm.init_state(batch, dtype, max_len=max_len))
    for (i, axis), s in zip(self.spec, self.states):
      value = jnp.expand_dims(s[...].astype(leaves[i].dtype), axis)
      leaves[i] = jnp.broadcast_to(value, leaves[i].shape)
    return jax.tree.unflatten(tree, leaves)

  def step(self, tokens, state):
    return self.lm.step(tokens, state)

  def __call__(self, tokens, segment_ids=None, *, return_aux: bool = False):
    """Logits [B, T, V] of every row started from the tuned state (``LM.step``)."""
    if segment_ids is not None:
      raise StateTuningError("segment_ids", "packed rows are not supported: every row starts "
                             "from the tuned state and LM.step has no document resets")
    logits, _ = self.lm.step(tokens, self.init_state(tokens.shape[0], max_len=tokens.shape[1]))
    return (logits, jnp.zeros((), jnp.float32)) if return_aux else logits

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    return self.lm.state_size(batch, max_len=max_len)


def tuned_size(model: StateTunedLM) -> int:
  """Elements of the learned states (the trained parameters)."""
  return int(sum(np.prod(s.shape) for s in model.states))






# ----------------------------------------------------------------------------- the base run


def check_base(init_from: str) -> tuple[ml_collections.ConfigDict, int]:
  """``(config, newest checkpoint step)`` of the finished training run in ``init_from``;
  StateTuningError("init_from", ...) when it is missing, not a run, or unfinished."""
  if not os.path.exists(init_from):
    raise StateTuningError("init_from", f"{init_from} does not exist; give the --workdir of a "
                           "finished python -m experiments.train run")
  try:
    config = generate_lib.load_config(init_from)
  except generate_lib.GenerateError as e:
    raise StateTuningError("init_from", str(e)[len("workdir: "):]) from None
  steps = generate_lib.checkpoint_steps(init_from)
  if not steps:
    raise StateTuningError("init_from", f"{init_from} has no checkpoint yet: let its training "
                           "run finish first")
  try:
    with open(os.path.join(init_from, "summary.json"), encoding="utf-8") as f:
      done = json.load(f).get("steps")
  except (OSError, ValueError, AttributeError):
    done = None
  want = config.get("train", {}).get("steps")
  if not isinstance(done, int) or not isinstance(want, int) or done < want:
    raise StateTuningError(
        "init_from", f"{init_from} is an unfinished run (newest checkpoint: step {steps[-1]} "
        f"of {want}; no final summary.json): rerun its training command to finish it, then "
        "tune its state")
  try:
    config_lib.validate(config)
  except ConfigError as e:
    raise StateTuningError("init_from", f"{init_from}/config.json is not a valid config "
                           f"({e})") from None
  return config, steps[-1]


def tuning_config(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict,
                  explicit: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """``config`` with the base run's model section and, for the :data:`INHERITED_DATA` fields
  both tasks have and ``explicit`` (dotted paths set on the command line) does not name, the
  base run's data values. Validated (ConfigError) and resolved."""
  c = ml_collections.ConfigDict(config.to_dict())
  base = config_lib.resolve(base)
  c.model = ml_collections.ConfigDict(base.model.to_dict())
  for key in INHERITED_DATA:
    if key in base.data and key in c.data and f"data.{key}" not in explicit:
      c.data[key] = base.data[key]
  if c.data.vocab_size > c.model.vocab_size:
    raise StateTuningError("config.data.vocab_size", f"{c.data.vocab_size} is larger than the "
                           f"vocabulary of --init_from's model ({c.model.vocab_size})")
  config_lib.validate(c)
  pipeline.task_example_fn(c.data)  # the task's own fields (ConfigError names them)
  return config_lib.resolve(c)


def abstract_model(config: ml_collections.ConfigDict, leaves: str) -> StateTunedLM:
  """The tuned model's shapes (nothing allocated); StateTuningError when it has no state."""
  cfg = config_lib.resolve(config).model
  return nnx.eval_shape(lambda: StateTunedLM(cfg, rngs=nnx.Rngs(0), leaves=leaves))


def base_params(init_from: str, step: int) -> dict:
  """The frozen LM's parameters (a pure dict) at ``step`` of ``init_from``."""
  lm, _ = generate_lib.load_model(init_from, step)
  return nnx.to_pure_dict(nnx.state(lm, nnx.Param))


# ----------------------------------------------------------------------------- the run


def _read_meta(workdir: str) -> dict | None:
  try:
    with open(os.path.join(workdir, META), encoding="utf-8") as f:
      out = json.load(f)
  except (OSError, ValueError):
    return None
  return out if isinstance(out, dict) else None


def check_workdir(workdir: str, init_from: str, step: int, leaves: str) -> None:
  """A workdir that already holds a run must hold a state tuning of the same base step
  with the same ``leaves``; StateTuningError("workdir", ...) otherwise."""
  if os.path.realpath(workdir) == os.path.realpath(init_from):
    raise StateTuningError("workdir", f"is --init_from ({init_from}); give a new directory for "
                           "the tuned run")
  meta = _read_meta(workdir)
  if meta is None:
    if os.path.exists(os.path.join(workdir, "config.json")):
      raise StateTuningError("workdir", f"{workdir} holds a training run that is not a state "
                             f"tuning (no {META}); use a new --workdir")
    return
  want = {"init_from": os.path.realpath(init_from), "init_step": step, "leaves": leaves}
  diff = [f"{k}: {meta.get(k)!r} -> {v!r}" for k, v in want.items() if meta.get(k) != v]
  if diff:
    raise StateTuningError("workdir", f"{workdir} holds a state tuning of another base or "
                           f"leaves ({', '.join(diff)}); use a new --workdir")


def hooks(params: dict, *, leaves: str, on_start=None) -> train.ModelHooks:
  """The trainer hooks of a state tuning from the frozen LM ``params`` (a pure dict);
  ``on_start()`` runs when a fresh run starts (under the workdir lock)."""

  def init_params(p):
    want, got = jax.tree.structure(p["lm"]), jax.tree.structure(params)
    shapes = [(a.shape, b.shape) for a, b in zip(jax.tree.leaves(p["lm"]),
                                                 jax.tree.leaves(params))]
    if want != got or any(a != b for a, b in shapes):
      raise StateTuningError("init_from", "its parameters do not fit the model of the config")
    if on_start is not None:
      on_start()
    return {**p, "lm": params}

  return train.ModelHooks(
      build=lambda cfg, rngs: StateTunedLM(cfg, rngs=rngs, leaves=leaves),
      trainable=InitialState, init_params=init_params)


def run(config: ml_collections.ConfigDict, workdir: str, *, init_from: str,
        leaves: str = "all", explicit: tuple[str, ...] = (), devices=None) -> dict[str, Any]:
  """Tunes (or resumes tuning) the initial states of ``init_from``'s model in ``workdir``
  with ``config``'s data / train / eval / mesh (:func:`tuning_config`); ``lcm.train.run``'s
  summary, whose ``trainable_params`` counts the tuned elements."""
  base, step = check_base(init_from)
  config = tuning_config(config, base, explicit)
  model = abstract_model(config, leaves)
  check_workdir(workdir, init_from, step, leaves)
  meta = {"init_from": os.path.realpath(init_from), "init_step": step, "leaves": leaves,
          "tuned_leaves": [list(map(int, s.shape)) for s in model.states],
          "tuned_elements": tuned_size(model)}
  if config.data.task == "mqar_hidden":
    meta["task"] = dataclasses.asdict(pipeline.mqar_hidden_config(config.data))

  def on_start():
    with open(os.path.join(workdir, META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)

  params = base_params(init_from, step)
  return train.run(config, workdir, devices=devices, guard=True,
                   hooks=hooks(params, leaves=leaves, on_start=on_start))


def load_tuned(workdir: str, step: int | None = None
               ) -> tuple[StateTunedLM, ml_collections.ConfigDict]:
  """The tuned model of ``workdir`` (its newest or given checkpoint) on one device."""
  meta = _read_meta(workdir)
  if meta is None:
    raise StateTuningError("workdir", f"{workdir} holds no {META}: not a state tuning run")
  config = generate_lib.load_config(workdir)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  if "sequence" in config.mesh:
    config.mesh.sequence = 1
  trainer = train.Trainer(config, devices=jax.devices()[:1], hooks=train.ModelHooks(
      build=lambda cfg, rngs: StateTunedLM(cfg, rngs=rngs, leaves=meta["leaves"]),
      trainable=InitialState))
  steps = generate_lib.checkpoint_steps(workdir)
  if not steps:
    raise StateTuningError("workdir", f"{workdir} has no checkpoint yet")
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    restored = ckpt.restore(steps[-1] if step is None else step, trainer.abstract_state())
  finally:
    ckpt.close()
  return nnx.merge(trainer.graphdef, restored["params"]), trainer.config
