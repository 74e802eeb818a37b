"""Sampling from an LM with the recurrent form: chunked prefill, then per-token ``step``.

Recurrent mixers decode in constant memory; attention keeps a KV cache of
``prompt + max_new_tokens`` tokens. The decode loop is one ``lax.scan`` (compiled once).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lcm import checkpoint as ckpt_lib
from lcm import model as model_lib
from lcm import sharding


class GenerateError(ValueError):
  """A bad generation argument (``argument`` names it: temperature, top_k, prompt, ...) or
  a workdir that holds no trained model to sample from."""

  def __init__(self, argument: str, message: str):
    self.argument = argument
    super().__init__(f"{argument}: {message}")


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_sampling(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   vocab_size: int | None = None) -> None:
  """Raises GenerateError unless temperature is finite and >= 0 (0 = greedy), ``top_k`` is
  in [0, vocab_size] (0 = all tokens) and ``top_p`` in (0, 1] (1 = off)."""
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
      or not math.isfinite(temperature) or temperature < 0:
    negative = isinstance(temperature, (int, float)) and temperature < 0
    raise GenerateError("temperature", f"must be a finite number >= 0 (0 = greedy; got "
                        f"{temperature!r})" + (": a negative temperature would sample from "
                                               "the inverted distribution" if negative else ""))
  if not _is_int(top_k) or top_k < 0:
    raise GenerateError("top_k", f"must be an integer >= 0 (0 = every token; got {top_k!r})")
  if vocab_size is not None and top_k > vocab_size:
    raise GenerateError("top_k", f"must be <= the vocabulary size {vocab_size} (0 = every "
                        f"token; got {top_k})")
  if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating)) \
      or not (0.0 < top_p <= 1.0):
    raise GenerateError("top_p", f"must be in (0, 1] (1 = off; got {top_p!r})")


def check_lengths(max_new_tokens: int, prefill_chunk: int) -> None:
  """Raises GenerateError unless both are integers >= 1."""
  if not _is_int(max_new_tokens) or max_new_tokens < 1:
    raise GenerateError("max_new_tokens", f"must be an integer >= 1 (got {max_new_tokens!r})")
  if not _is_int(prefill_chunk) or prefill_chunk < 1:
    raise GenerateError("prefill_chunk", f"must be an integer >= 1 prompt tokens per prefill "
                        f"step (got {prefill_chunk!r})")


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Samples token ids from ``logits [B, V]``; temperature 0 is greedy (argmax). Arguments
  out of range raise GenerateError (:func:`check_sampling`)."""
  check_sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                 vocab_size=logits.shape[-1])
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always the top token)
    drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= top_p
    drop = jnp.zeros_like(drop_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: model_lib.LM, prompt: jax.Array, max_new_tokens: int, *,
             key: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, prefill_chunk: int = 256, mesh=None) -> jax.Array:
  """Continues ``prompt [B, P]`` by ``max_new_tokens`` tokens; returns ``[B, max_new_tokens]``.

  The prompt is consumed by ``step`` in chunks of ``prefill_chunk`` tokens (so a long
  prompt never materialises a [P, P] attention matrix), then tokens are decoded one by one.

  ``mesh``: a ``lcm.sharding.make_mesh`` mesh whose ``sequence`` axis (> 1) splits each
  prefill chunk's tokens over its devices (context-parallel prefill: the mixers' split
  forms, docs/context-parallel.md; a chunk that the axis does not divide runs unsplit).
  Parameters and the decode state are replicated on the mesh and decoding runs as usual.
  """
  check_lengths(max_new_tokens, prefill_chunk)
  check_sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                 vocab_size=int(model.embed.shape[0]) if hasattr(model, "embed") else None)
  if prompt.ndim != 2:
    raise GenerateError("prompt", f"must be token ids of shape [batch, length] (got shape "
                        f"{tuple(prompt.shape)})")
  b, p = prompt.shape
  if p < 1:
    raise GenerateError("prompt", "must hold at least one token (got an empty prompt)")
  key = jax.random.key(0) if key is None else key
  state = model.init_state(b, max_len=p + max_new_tokens)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)  # raw arrays: Variables must not cross trace levels

  context, jit_prefill = contextlib.nullcontext, jax.jit
  if mesh is not None:  # the mixers split each chunk's tokens; the outputs are replicated
    context = lambda: sharding.sequence_context(mesh)
    params, state, prompt = jax.device_put((params, state, prompt), sharding.replicated(mesh))
    jit_prefill = functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))

  @jit_prefill
  def prefill(params, chunk, state):
    with context():
      return nnx.merge(graphdef, params).step(chunk, state)

  logits = None
  for start in range(0, p, prefill_chunk):
    logits, state = prefill(params, prompt[:, start:start + prefill_chunk], state)
  first = sample_logits(logits[:, -1], jax.random.fold_in(key, 0), temperature=temperature,
                        top_k=top_k, top_p=top_p)

  @jax.jit
  def decode(params, token, state):
    def body(carry, i):
      tok, st = carry
      # merge inside the scan body: nnx modules must not cross a trace level
      lg, st = nnx.merge(graphdef, params).step(tok[:, None], st)
      nxt = sample_logits(lg[:, -1], jax.random.fold_in(key, i), temperature=temperature,
                          top_k=top_k, top_p=top_p)
      return (nxt, st), nxt
    _, rest = jax.lax.scan(body, (token, state), jnp.arange(1, max_new_tokens))
    return rest.T

  if max_new_tokens == 1:
    return first[:, None]
  return jnp.concatenate([first[:, None], decode(params, first, state)], axis=1)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The ``config.json`` of a training workdir. Raises GenerateError("workdir", ...) when
  ``workdir`` is missing, not a directory or holds no readable config.json."""
  if not str(workdir).strip():
    raise GenerateError("workdir", "is empty; give the --workdir of a training run "
                        "(python -m experiments.train ... --workdir=DIR)")
  if not os.path.exists(workdir):
    raise GenerateError("workdir", f"{workdir} does not exist; give the --workdir of a "
                        "training run (python -m experiments.train ... --workdir=DIR)")
  if not os.path.isdir(workdir):
    raise GenerateError("workdir", f"{workdir} is a file, not a training workdir")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise GenerateError("workdir", f"{workdir} holds no config.json, so it is not a training "
                        "workdir (python -m experiments.train writes one when it starts)")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise GenerateError("workdir", f"{path} is unreadable ({type(e).__name__}: "
                        f"{' '.join(str(e).split())})") from None
  if not isinstance(raw, dict) or not isinstance(raw.get("mesh"), dict):
    raise GenerateError("workdir", f"{path} is not a training config (a JSON object with "
                        "data, model, train, eval and mesh sections)")
  return ml_collections.ConfigDict(raw)


def checkpoint_steps(workdir: str) -> list[int]:
  """The complete checkpoint steps in ``workdir/checkpoints``, oldest first (a listing:
  nothing is created, unlike opening a Checkpointer)."""
  directory = os.path.join(workdir, "checkpoints")
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  return sorted(int(n) for n in names
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def load_model(workdir: str, step: int | None = None) -> tuple[model_lib.LM, ml_collections.ConfigDict]:
  """The LM trained in ``workdir`` (its config.json and newest or given checkpoint).

  Raises GenerateError (a workdir with no config.json or no checkpoint, a step that is not
  there), ConfigError (a config.json that no longer validates, e.g. a moved corpus) or
  checkpoint.CheckpointError (a step that fails its manifest check)."""
  from lcm import train  # pylint: disable=g-import-not-at-top
  config = load_config(workdir)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise GenerateError("workdir", f"{workdir} has no checkpoint yet ({workdir}/checkpoints "
                        "is empty or missing): let its training run reach its first "
                        "checkpoint (train.checkpoint_every) or finish")
  if step is not None and step not in steps:
    raise GenerateError("step", f"{workdir} has no checkpoint at step {step}; its steps: "
                        f"{', '.join(map(str, steps))}")
  # One device: sampling needs no mesh (a checkpoint restores onto any mesh).
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  if "sequence" in config.mesh:
    config.mesh.sequence = 1
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise GenerateError("workdir", f"no complete checkpoint in {workdir}/checkpoints")
    abstract = trainer.abstract_state()
    restored = ckpt.restore(step, {"params": abstract["params"],
                                   "opt_state": abstract["opt_state"],
                                   "step": abstract["step"]})
  finally:
    ckpt.close()
  return nnx.merge(trainer.graphdef, restored["params"]), trainer.config
