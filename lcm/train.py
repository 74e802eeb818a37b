"""Trainer: validated config -> sharded jit train step, eval, Orbax checkpoints, metrics.

Usage (Colab or script)::

    from lcm import train
    summary = train.run(config, workdir="runs/x")

A run resumes automatically when ``workdir/checkpoints`` holds a checkpoint: model,
optimizer, step and data-iterator position are restored, so the continued run is
bitwise identical to an uninterrupted one.

:class:`ModelHooks` (``hooks=``) change what is optimised (state tuning, lcm/state_tuning.py,
uses them); without hooks the trainer is exactly the plain one.

Around the run (docs/operations.md): ``workdir/.lock`` admits one run per workdir, every
start appends a line to ``workdir/history.jsonl``, and SIGTERM / SIGINT end the run after the
current step with a checkpoint at that step. ``guard=True`` (the command line) also refuses
a changed model / data / seed config and leaves a finished run untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, traverse_util

from lcm import checkpoint as ckpt_lib
from lcm import config as config_lib
from lcm import metrics as metrics_lib
from lcm import model as model_lib
from lcm import provenance
from lcm import sharding as sharding_lib
from layers.common import segment_positions
from lcm.data import pipeline
from lcm.data import text as text_lib
from lcm.evals import plots

DEFAULT_LABEL = "default"


class NonFiniteError(RuntimeError):
  """The loss or gradients became NaN/Inf; the last good checkpoint is kept."""


class ConfigChangeError(ValueError):
  """A restart's model / data / seed config differs from the run already in the workdir."""


# ----------------------------------------------------------------------------- optimizer


def param_labels(params: nnx.State, param_groups) -> dict:
  """Optimizer group of each parameter: its ``optim_tag`` when the config has that group."""
  groups = set(param_groups.keys())

  def one(v):
    tag = v.get_metadata().get("optim_tag")
    return tag if tag in groups else DEFAULT_LABEL
  return nnx.to_pure_dict(
      jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def lr_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio``."""
  lr, warmup, steps = train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=lr * train_cfg.min_lr_ratio)


def build_optimizer(train_cfg, labels) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; per-tag groups cap the lr and set weight decay."""
  base = lr_schedule(train_cfg)
  groups = {DEFAULT_LABEL: {}}
  groups.update({k: dict(v) for k, v in train_cfg.param_groups.items()})
  transforms = {}
  for name, g in groups.items():
    cap = g.get("lr")
    sched = base if cap is None else (lambda s, cap=cap: jnp.minimum(base(s), cap))
    transforms[name] = optax.adamw(
        sched, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
        weight_decay=g.get("weight_decay", train_cfg.weight_decay))
  tx = optax.multi_transform(transforms, labels)
  if train_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), tx)
  return tx


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def like_params(tree, param_shardings, default):
  """Shardings for an optimizer-state tree: a leaf whose key path ends with a parameter's
  path (Adam's mu/nu, ...) gets that parameter's sharding; anything else ``default``."""
  by_path = {tuple(_key(k) for k in path): s for path, s in
             jax.tree_util.tree_leaves_with_path(param_shardings)}
  depth = max(len(p) for p in by_path)

  def one(path, leaf):
    keys = tuple(_key(k) for k in path)
    for n in range(min(depth, len(keys)), 0, -1):
      s = by_path.get(keys[-n:])
      if s is not None and len(s.spec) <= len(leaf.shape):
        return s
    return default
  return jax.tree_util.tree_map_with_path(one, tree)


# ----------------------------------------------------------------------------- loss


def loss_and_metrics(logits, batch):
  """Masked next-token cross-entropy and accuracy (fp32)."""
  targets, mask = batch["targets"], batch["loss_mask"].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  return (nll * mask).sum() / denom, {
      "nll_sum": (nll * mask).sum(), "correct_sum": (correct * mask).sum(),
      "count": mask.sum()}


def loss_by_position(logits, batch):
  """Sums of masked nll and counts by position inside the document (0..T-1): how the loss
  falls with the context a token has (positions restart at every packed document)."""
  targets, mask = batch["targets"], batch["loss_mask"].astype(jnp.float32)
  b, t = targets.shape
  pos = segment_positions(batch.get("segment_ids"), b, t)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  onehot = jax.nn.one_hot(pos, t, dtype=jnp.float32) * mask[..., None]  # [B, T, T]
  return {"pos_nll_sum": jnp.einsum("bt,btp->p", nll, onehot),
          "pos_count": onehot.sum(axis=(0, 1))}


@dataclasses.dataclass(frozen=True)
class ModelHooks:
  """What a caller may change (None: the default). ``build(model_cfg, rngs)``: the module to
  train instead of ``LM(model_cfg, rngs=rngs)`` (called like it, with ``state_size``).
  ``trainable``: an nnx filter of the parameters to optimise (gradients, clipping, optimizer
  state cover only those; the rest pass through every step bit for bit). ``init_params(p)``:
  a fresh run's starting parameters from the random ones ``p`` (pure dicts), not on resume."""

  build: Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module] | None = None
  trainable: Any = None
  init_params: Callable[[dict], dict] | None = None


def _partition(tree: dict, paths: frozenset) -> tuple[dict, dict]:
  """``(the leaves at paths, the rest)`` of a pure nested dict; :func:`_combine` inverts it."""
  flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
  return tuple(traverse_util.unflatten_dict({k: v for k, v in flat.items() if (k in paths) == i})
               for i in (True, False))


def _combine(a: dict, b: dict) -> dict:
  flat = lambda t: traverse_util.flatten_dict(t, keep_empty_nodes=True)
  return traverse_util.unflatten_dict({**flat(a), **flat(b)})


# ----------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class Summary:
  eval_accuracy: float
  eval_loss: float
  steps: int
  tokens_per_second: float
  wall_seconds: float
  config: dict
  train_loss: float | None = None
  num_params: int = 0
  state_size: int = 0
  resumed_from: int | None = None
  skipped_steps: int = 0  # non-finite steps dropped by nan_policy="skip" (this invocation)
  bad_checkpoints: list = dataclasses.field(default_factory=list)  # [step, reason] skipped


# XLA options for programs that run once (initialisation): compile fast, run slower.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Trainer:
  """Holds the mesh, the split model, the optimizer and the jitted pure steps."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None = None, *,
               devices=None, hooks: ModelHooks | None = None):
    devices = list(jax.devices() if devices is None else devices)
    self.hooks = hooks = ModelHooks() if hooks is None else hooks
    config_lib.validate(config, num_devices=len(devices))
    config = config_lib.resolve(config)
    self.config = config
    self.workdir = workdir
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)
    cfg = config.model

    def make_model():
      if hooks.build is not None:
        return hooks.build(cfg, nnx.Rngs(params=config.seed))
      return model_lib.LM(cfg, rngs=nnx.Rngs(params=config.seed))

    abstract = nnx.eval_shape(make_model)
    self.graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(abs_rest):
      raise ValueError("the model has non-parameter state, which lcm.train does not handle")
    self.param_shardings = sharding_lib.state_shardings(abs_params, self.mesh)
    chosen = {} if hooks.trainable is None else traverse_util.flatten_dict(  # key paths
        nnx.to_pure_dict(nnx.filter_state(abs_params, hooks.trainable)))
    self.trainable = None if hooks.trainable is None else frozenset(chosen)
    self.num_trainable = sum(int(np.prod(x.shape)) for x in chosen.values())
    if self.trainable is not None and not self.trainable:
      raise ValueError("hooks.trainable selects no parameter of the model")
    opt_view = (lambda tree: tree) if self.trainable is None else (
        lambda tree: _partition(tree, self.trainable)[0])
    self.labels = opt_view(param_labels(abs_params, config.train.param_groups))
    self.tx = build_optimizer(config.train, self.labels)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.replicated = sharding_lib.replicated(self.mesh)
    self.num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abs_params)))
    self.last_loss_by_position = None

    def init_params():
      return nnx.to_pure_dict(nnx.state(make_model(), nnx.Param))
    # Initialisation runs once; optimising its RNG-heavy program buys nothing and costs a
    # lot: on CPU the full XLA pipeline takes ~10x longer to compile it.
    self._init_params = jax.jit(init_params, out_shardings=self.param_shardings,
                                compiler_options=_FAST_COMPILE)
    abs_opt = jax.eval_shape(self.tx.init, opt_view(nnx.to_pure_dict(abs_params)))
    self.opt_shardings = like_params(abs_opt, opt_view(self.param_shardings), self.replicated)
    self._opt_view = opt_view
    self._init_opt = jax.jit(lambda p: self.tx.init(opt_view(p)), out_shardings=self.opt_shardings)

    graphdef, tx = self.graphdef, self.tx
    # Mixers' auxiliary losses (MoM's load balance), summed over layers, join the objective
    # with weight train.aux_loss_weight; the logged "loss" stays the LM loss.
    has_aux, aux_weight = getattr(abstract, "has_aux_loss", False), float(
        config.train.aux_loss_weight)
    trainable = self.trainable

    mesh = self.mesh

    def apply(params, batch, return_aux=False):
      model = nnx.merge(graphdef, params)
      # mesh.sequence > 1: the mixers split T over the mesh's `sequence` axis.
      with sharding_lib.sequence_context(mesh):
        return model(batch["inputs"], batch.get("segment_ids"), return_aux=return_aux)

    def train_step(params, opt_state, batch):
      # hooks.trainable: differentiate and update only those; the rest passes through
      params, frozen = (params, None) if trainable is None else _partition(params, trainable)
      join = (lambda p: p) if frozen is None else (lambda p: _combine(p, frozen))
      def loss_fn(p):
        logits, aux_loss = apply(join(p), batch, return_aux=True)
        loss, aux = loss_and_metrics(logits, batch)
        aux["aux_loss"] = aux_loss
        return loss + aux_weight * aux_loss, (loss, aux)
      (_, (loss, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      gnorm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
      updates, new_opt = tx.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      # A non-finite step never changes the state; the host stops (or skips) on it.
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_params, new_opt = keep(new_params, params), keep(new_opt, opt_state)
      metrics = {"loss": loss, "accuracy": aux["correct_sum"] / jnp.maximum(aux["count"], 1),
                 "grad_norm": gnorm, "finite": finite}
      if has_aux:
        metrics["aux_loss"] = aux["aux_loss"]
      return join(new_params), new_opt, metrics

    def eval_step(params, batch):
      logits = apply(params, batch)
      _, aux = loss_and_metrics(logits, batch)
      aux.update(loss_by_position(logits, batch))
      return aux

    self.train_step = jax.jit(
        train_step,
        in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding),
        out_shardings=(self.param_shardings, self.opt_shardings, self.replicated),
        donate_argnums=(0, 1))
    self.eval_step = jax.jit(
        eval_step, in_shardings=(self.param_shardings, self.batch_sharding),
        out_shardings=self.replicated)

  # -- state

  def state_size(self) -> int:
    """Recurrent-state elements per sequence (all layers) at the training length."""
    model = nnx.merge(self.graphdef, jax.eval_shape(self._init_params))
    return model.state_size(1, max_len=self.config.data.seq_len)

  def init_state(self):
    params = self._init_params()
    if self.hooks.init_params is not None:
      params = jax.device_put(self.hooks.init_params(params), self.param_shardings,
                              may_alias=False)  # the steps donate them: never the caller's
    return params, self._init_opt(params)

  def abstract_state(self):
    abs_params = jax.eval_shape(self._init_params)
    abs_opt = jax.eval_shape(self.tx.init, self._opt_view(abs_params))
    return {
        "params": ckpt_lib.abstract_like(abs_params, self.param_shardings),
        "opt_state": ckpt_lib.abstract_like(abs_opt, self.opt_shardings),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
    }

  # -- data

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}

  def train_iterator(self):
    c = self.config
    return pipeline.train_iterator(
        c.data, seed=c.seed, global_batch_size=c.data.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())

  def evaluate(self, params) -> dict[str, float]:
    c = self.config
    batches = pipeline.eval_batches(
        c.data, seed=c.eval.seed, num_examples=c.eval.num_examples,
        batch_size=c.eval.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count())
    totals = None
    for b in batches:
      aux = self.eval_step(params, self.global_batch(b))
      totals = aux if totals is None else jax.tree.map(jnp.add, totals, aux)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    out = {"loss": float(totals["nll_sum"]) / count,
           "accuracy": float(totals["correct_sum"]) / count}
    if c.data.task == "text":
      corpus = text_lib.load_corpus(pipeline.text_config(c.data), "validation")
      out["bits_per_byte"] = text_lib.bits_per_byte(out["loss"], corpus)
    n = np.maximum(totals["pos_count"], 1.0)
    self.last_loss_by_position = {"loss": (totals["pos_nll_sum"] / n).tolist(),
                                  "count": totals["pos_count"].tolist()}
    return out


def _json_config(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _previous_summary(workdir: str) -> dict:
  """The ``summary.json`` an earlier run left in ``workdir`` ({} if none / unreadable)."""
  try:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _read_json(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except (OSError, ValueError):
    return None
  return out if isinstance(out, dict) else None


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds ``workdir/.lock`` (process 0; every process stops when it is busy) for the body;
  a stale lock left by a dead process is reported on stderr and taken over."""
  lock, busy = provenance.WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      stale = lock.acquire()
    except (provenance.WorkdirBusyError, provenance.WorkdirError) as e:
      busy = e  # every process stops (a lock file process 0 cannot create: WorkdirError)
    else:
      if stale is not None:
        print(f"lcm: {workdir}: {provenance.describe_stale(stale)}", file=sys.stderr,
              flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if not int(multihost_utils.broadcast_one_to_all(np.int32(busy is None))):
      lock.release()
      raise busy or provenance.WorkdirBusyError(
          f"workdir {workdir} is in use (process 0 found its lock held)")
  elif busy is not None:
    raise busy
  try:
    yield
  finally:
    lock.release()


def _hostnames() -> list[str]:
  name = socket.gethostname()
  if jax.process_count() == 1:
    return [name]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(name.encode()[:64].ljust(64, b"\0"), np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(raw)).reshape(-1, 64)
  return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in rows]


def _check_restart(config, workdir: str, allow_config_change: bool
                   ) -> tuple[list[str], dict | None]:
  """``(changes, finished)``: the model / data / seed fields that differ from the
  workdir's config.json, and the summary of a finished run (None if it is not finished).
  Raises ConfigChangeError on changes unless ``allow_config_change``."""
  new = _json_config(config_lib.resolve(config))
  old = _read_json(os.path.join(workdir, "config.json"))
  changes = [] if old is None else provenance.config_diff(old, new)
  if changes and not allow_config_change:
    raise ConfigChangeError(
        f"{workdir} holds a run with a different config ({', '.join(changes)}). Use a new "
        "--workdir, or pass --allow_config_change to continue this run with the new config.")
  summary = _read_json(os.path.join(workdir, "summary.json"))
  steps = summary.get("steps") if summary else None
  finished = summary if isinstance(steps, int) and steps >= config.train.steps else None
  return changes, finished


def run(config: ml_collections.ConfigDict, workdir: str, *, devices=None, guard: bool = False,
        allow_config_change: bool = False, hooks: ModelHooks | None = None) -> dict[str, Any]:
  """Trains (or resumes) the experiment in ``config`` in ``workdir``; returns the summary.

  The run holds ``workdir/.lock`` throughout (a busy workdir raises
  provenance.WorkdirBusyError), appends its start to ``workdir/history.jsonl`` once the
  checkpoint (if any) has restored, and stops after the current step on SIGTERM / SIGINT
  with a checkpoint at that step, returning ``{"preempted": True, "step": ...}``.
  ``guard=True`` (what ``python -m experiments.train`` passes): a model / data / seed
  config that differs from ``workdir/config.json`` raises ConfigChangeError unless
  ``allow_config_change``, and a finished run (summary.json's steps >= train.steps) is
  returned as ``{"finished": True, **summary}`` without writing anything."""
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(config, num_devices=len(devices))  # an invalid config writes nothing
  workdir = provenance.prepare_workdir(workdir)  # a file, "", read-only: WorkdirError
  with workdir_lock(workdir):
    changes, finished = _check_restart(config, workdir, allow_config_change or not guard)
    if guard and finished is not None:
      return {**finished, "finished": True}
    with ckpt_lib.StopRequest() as stop:
      return _run_locked(config, workdir, devices, stop, changes, allow_config_change, hooks)


def _run_locked(config, workdir: str, devices, stop: ckpt_lib.StopRequest, changes: list[str],
                allow_config_change: bool, hooks: ModelHooks | None = None) -> dict[str, Any]:
  t_start = time.time()
  trainer = Trainer(config, workdir, devices=devices, hooks=hooks)
  c = trainer.config
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=c.train.keep_checkpoints,
                               async_save=c.train.async_checkpoint)
  # Newest usable step; corrupt / truncated newer ones are reported and moved aside.
  try:
    it = trainer.train_iterator()
    latest, restored, bad_checkpoints = ckpt.restore_latest(trainer.abstract_state(), it)
  except BaseException:
    ckpt.close()
    raise
  # Only now (the checkpoints, if any, fit this config) may config.json be replaced.
  try:
    hosts = _hostnames()
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(_json_config(c), f, indent=2)
      provenance.append_history(workdir, provenance.start_record(
          _json_config(c), hosts=hosts, process_count=jax.process_count(),
          device_count=len(devices), platform=devices[0].platform,
          resumed_from=None if latest is None else int(latest), config_changes=changes,
          allow_config_change=bool(allow_config_change)))
  except BaseException:  # e.g. a full disk: close Orbax's manager before the error leaves
    ckpt.close()
    raise
  if latest is not None:
    params, opt_state = restored["params"], restored["opt_state"]
    start = int(restored["step"])
  else:
    params, opt_state = trainer.init_state()
    start = 0
  writer = metrics_lib.MetricsWriter(workdir)
  progress = metrics_lib.Progress(c.train.steps, start, enabled=c.train.progress)
  for s, why in bad_checkpoints:
    progress.write(f"WARNING: checkpoint step {s} is unusable ({why}); moved to "
                   f"{ckpt.directory}/corrupt/")
  if latest is not None:
    progress.write(f"Resumed from step {start} ({ckpt.directory})")
  data_skipped = {}
  if c.data.task == "text":  # split sizes, and the files the reader skipped: never silent
    tcfg = pipeline.text_config(c.data)
    corpus = text_lib.load_corpus(tcfg, "train")
    data_skipped = dict(corpus.skipped)
    progress.write("data: " + corpus.describe("train"))
    progress.write("data: " + text_lib.load_corpus(tcfg, "validation").describe("validation"))
  tokens_per_step = c.data.batch_size * c.data.seq_len
  pending: list[tuple[int, dict]] = []
  last_loss = last_acc = None
  skipped_steps = 0
  t_first = None  # time after the first (compiling) step of this invocation
  eval_metrics = None
  stopped = None  # the step a SIGTERM / SIGINT ended the run at

  def flush():
    """Moves pending step metrics to the host; stops (or reports a skip) on a bad step."""
    nonlocal last_loss, last_acc, pending, skipped_steps
    for s, m in jax.device_get(pending):
      if not bool(m["finite"]):
        msg = (f"non-finite loss or gradient at step {s} (loss={float(m['loss'])}, "
               f"grad_norm={float(m['grad_norm'])}); the update was not applied")
        if c.train.nan_policy == "stop":
          raise NonFiniteError(f"{msg}; last good checkpoint: step {ckpt.latest_step()}")
        progress.write("skipped: " + msg)
      skipped_steps += not bool(m["finite"])
      row = {k: float(v) for k, v in m.items() if k != "finite"}
      row["skipped"] = float(not bool(m["finite"]))
      writer.write(s, row)
      last_loss, last_acc = row["loss"], row["accuracy"]
    pending = []

  def tokens_per_second(done):
    if t_first is None or done <= start + 1:
      return 0.0
    return tokens_per_step * (done - start - 1) / max(time.time() - t_first, 1e-9)

  try:
    for step in range(start, c.train.steps):
      batch = trainer.global_batch(next(it))
      params, opt_state, m = trainer.train_step(params, opt_state, batch)
      done = step + 1
      pending.append((done, m))
      if t_first is None:
        jax.block_until_ready(m)
        t_first = time.time()
      if done % c.train.log_every == 0 or done == c.train.steps:
        flush()
        progress.update(done, loss=last_loss, acc=last_acc,
                        tok_s=round(tokens_per_second(done)))
      if done % c.train.eval_every == 0 or done == c.train.steps:
        eval_metrics = trainer.evaluate(params)
        writer.write(done, eval_metrics, split="eval")
        progress.write(f"step {done}: eval loss {eval_metrics['loss']:.4f} "
                       f"accuracy {eval_metrics['accuracy']:.4f}")
      stopping = done < c.train.steps and stop.requested(done)
      if done % c.train.checkpoint_every == 0 or done == c.train.steps or stopping:
        flush()  # never checkpoint a state that follows an unchecked step
        step_array = jax.device_put(np.int32(done), trainer.replicated)
        ckpt.save(done, {"params": params, "opt_state": opt_state, "step": step_array}, it)
      if stopping:
        stopped = done
        break
    flush()
    if stopped is not None:
      progress.write(f"{stop.signal_name}: stopped after step {stopped}; checkpoint saved")
      return {"preempted": True, "signal": stop.signal_name, "step": stopped,
              "steps": c.train.steps, "checkpoint": ckpt.step_dir(stopped),
              "wall_seconds": time.time() - t_start}
    tps = tokens_per_second(c.train.steps)
    if not tps:  # nothing (timed) was trained now: keep the earlier run's throughput
      tps = _previous_summary(workdir).get("tokens_per_second", 0.0)
    if eval_metrics is None:  # nothing left to train: evaluate the restored model
      eval_metrics = trainer.evaluate(params)
  finally:
    ckpt.close()
    progress.close()
    writer.close()

  summary = Summary(
      eval_accuracy=eval_metrics["accuracy"], eval_loss=eval_metrics["loss"],
      steps=c.train.steps, tokens_per_second=tps, wall_seconds=time.time() - t_start,
      config=_json_config(c), train_loss=last_loss, num_params=trainer.num_params,
      state_size=trainer.state_size(), resumed_from=start if latest is not None else None,
      skipped_steps=skipped_steps, bad_checkpoints=[list(b) for b in bad_checkpoints])
  out = dataclasses.asdict(summary)
  if trainer.trainable is not None:  # hooks.trainable: the parameters it optimised
    out["trainable_params"] = trainer.num_trainable
  out.update({f"eval_{k}": v for k, v in eval_metrics.items() if k not in ("loss", "accuracy")})
  if data_skipped:
    out["data_skipped"] = data_skipped
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "loss_by_position.json"), "w", encoding="utf-8") as f:
      json.dump(trainer.last_loss_by_position, f)
    plots.plot_loss_by_position(workdir)
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2)
    plots.plot_training_curves(workdir)
  return out
