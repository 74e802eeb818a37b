"""Sampling from an LM with the recurrent form: chunked prefill, then per-token ``step``.

Recurrent mixers decode in constant memory; attention keeps a KV cache of
``prompt + max_new_tokens`` tokens. The decode loop is one ``lax.scan`` (compiled once).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lcm import checkpoint as ckpt_lib
from lcm import model as model_lib
from lcm import sharding


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Samples token ids from ``logits [B, V]``; temperature 0 is greedy (argmax)."""
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
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  b, p = prompt.shape
  if p < 1:
    raise ValueError("the prompt must hold at least one token")
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


def load_model(workdir: str, step: int | None = None) -> tuple[model_lib.LM, ml_collections.ConfigDict]:
  """The LM trained in ``workdir`` (its config.json and newest or given checkpoint)."""
  from lcm import train  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  abstract = trainer.abstract_state()
  restored = ckpt.restore(step, {"params": abstract["params"],
                                 "opt_state": abstract["opt_state"], "step": abstract["step"]})
  ckpt.close()
  return nnx.merge(trainer.graphdef, restored["params"]), trainer.config
