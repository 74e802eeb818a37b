"""Decoder LM: embed -> groups of pre-norm blocks (norm, mixer, norm, SwiGLU) -> norm -> head.

The block pattern (``model.pattern``, e.g. ``"gla,gla,swa"``) is one *group*; the group is
repeated ``num_layers / len(pattern)`` times. With ``scan_layers`` the repeated groups are
created with ``nnx.vmap`` (parameters stacked on a leading ``layers`` axis) and run with
``nnx.scan`` (+ ``nnx.remat``), so compile time does not grow with depth.

The LM has the same three forms as its mixers:
  logits = lm(tokens, segment_ids)             # [B, T] -> [B, T, V] (fp32)
  state = lm.init_state(batch, max_len=...)     # stacked per-group mixer states
  logits, state = lm.step(tokens, state)        # [B, t] -> [B, t, V]
  logits, aux = lm(tokens, segment_ids, return_aux=True)   # + summed auxiliary losses

Landmark tokens. When the pattern holds a ``landmark`` mixer (``needs_landmarks``), the LM
inserts a learned landmark embedding after every ``block_size - 1`` tokens of each document
(the paper's data layout: each block of ``block_size`` ends with its landmark), runs every
layer on the longer sequence, and returns logits only at the real tokens (the reference's
``MemLMCache`` + ``get_final_logits``). ``step`` does the same token by token (it feeds the
landmark after the token that completes a block); the state then also counts real tokens.
Callers never see landmarks: tokens in, one logit row per token out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import Linear, RMSNorm, SwiGLU, param
from lcm import registry

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _embed_init(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


class Block(nnx.Module):
  """x + mixer(norm(x)); x + mlp(norm(x))."""

  def __init__(self, name: str, cfg, *, rngs: nnx.Rngs):
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    d = cfg.d_model
    overrides = dict(cfg.mixers[name]) if name in cfg.mixers else {}
    self.norm1 = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
    self.mixer = registry.create(name, d_model=d, rngs=rngs, dtype=dtype, param_dtype=pdtype,
                                 **overrides)
    hidden = int(round(cfg.mlp_ratio * d))
    if hidden > 0:
      self.norm2 = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
      self.mlp = SwiGLU(d, hidden, dtype=dtype, param_dtype=pdtype, rngs=rngs)
    else:
      self.norm2 = self.mlp = None

  def _mlp(self, x):
    return x if self.mlp is None else x + self.mlp(self.norm2(x))

  def __call__(self, x, segment_ids=None):
    return self._mlp(x + self.mixer(self.norm1(x), segment_ids=segment_ids))

  def call_with_aux(self, x, segment_ids=None):
    """(block output, the mixer's auxiliary loss): a mixer with an auxiliary loss (e.g. MoM's
    load balance) defines ``call_with_aux(x, segment_ids) -> (y, aux)``; others give 0."""
    fn = getattr(self.mixer, "call_with_aux", None)
    if fn is None:
      return self(x, segment_ids), jnp.zeros((), jnp.float32)
    y, aux = fn(self.norm1(x), segment_ids=segment_ids)
    return self._mlp(x + y), aux.astype(jnp.float32)

  def step(self, x, state):
    y, state = self.mixer.step(self.norm1(x), state)
    return self._mlp(x + y), state


class Group(nnx.Module):
  """One repetition of the mixer pattern."""

  def __init__(self, cfg, names: list[str], *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(n, cfg, rngs=rngs) for n in names])

  def __call__(self, x, segment_ids=None):
    for b in self.blocks:
      x = b(x, segment_ids)
    return x

  def call_with_aux(self, x, segment_ids=None):
    aux = jnp.zeros((), jnp.float32)
    for b in self.blocks:
      x, a = b.call_with_aux(x, segment_ids)
      aux = aux + a
    return x, aux

  def init_state(self, batch, dtype, max_len):
    return [b.mixer.init_state(batch, dtype, max_len=max_len) for b in self.blocks]

  def step(self, x, states):
    new = []
    for b, s in zip(self.blocks, states):
      x, s = b.step(x, s)
      new.append(s)
    return x, new

  def state_size(self, batch, max_len):
    return sum(b.mixer.state_size(batch, max_len=max_len) for b in self.blocks)


def landmark_layout(segment_ids, batch: int, length: int, every: int):
  """Where tokens and landmarks go when a landmark follows every ``every`` tokens of each
  document. Returns ``(tok_idx [B, T], lm_idx [B, T], has_lm [B, T], ext_len)``: token j
  moves to ``tok_idx[j]`` of the extended row; when ``has_lm[j]`` a landmark follows it at
  ``lm_idx[j]``. ``ext_len = T + T // every`` bounds every row (the tail is padding)."""
  from layers.common import segment_positions  # pylint: disable=g-import-not-at-top
  pos = segment_positions(segment_ids, batch, length)
  has_lm = (pos + 1) % every == 0
  before = jnp.cumsum(has_lm, axis=1) - has_lm
  tok_idx = jnp.arange(length)[None] + before
  return tok_idx, tok_idx + 1, has_lm, length + length // every


class LM(nnx.Module):
  """Decoder-only language model built from a mixer pattern (a validated ``config.model``)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    names = [p.strip() for p in str(cfg.pattern).split(",") if p.strip()]
    # Only hashable, static facts are kept (they end up in the graphdef).
    self.pattern = tuple(names)
    # Some mixer returns an auxiliary loss (``call_with_aux``): the trainer adds and logs it.
    self.has_aux_loss = any(hasattr(registry.get(n), "call_with_aux") for n in names)
    self.d_model = int(cfg.d_model)
    self.mixer_overrides = tuple(
        (n, tuple(sorted(dict(cfg.mixers[n]).items())) if n in cfg.mixers else ())
        for n in names)
    self.num_groups = cfg.num_layers // len(names)
    self.scan_layers = bool(cfg.scan_layers)
    self.remat = bool(cfg.remat)
    self.dtype = DTYPES[cfg.dtype]
    pdtype = DTYPES[cfg.param_dtype]
    d, v = cfg.d_model, cfg.vocab_size
    self.embed = param(rngs, _embed_init, (v, d), ("vocab", "embed"), pdtype)
    if self.scan_layers:
      @nnx.split_rngs(splits=self.num_groups)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make(r):
        return Group(cfg, names, rngs=r)
      self.groups = make(rngs)
    else:
      self.groups = nnx.List([Group(cfg, names, rngs=rngs) for _ in range(self.num_groups)])
    self.norm = RMSNorm(d, eps=cfg.norm_eps, dtype=self.dtype, param_dtype=pdtype, rngs=rngs)
    blocks = {int(dict(self.mixer_overrides[i][1]).get(
        "block_size", registry.config_fields(n)["block_size"]))
              for i, n in enumerate(names) if getattr(registry.get(n), "needs_landmarks", False)}
    if len(blocks) > 1:
      from layers.common import ConfigError  # pylint: disable=g-import-not-at-top
      raise ConfigError("model.mixers", f"landmark layers must share one block_size "
                        f"(got {sorted(blocks)})")
    # A landmark token after every ``landmark_every`` real tokens (0: no landmarks).
    self.landmark_every = blocks.pop() - 1 if blocks else 0
    if self.landmark_every:
      self.landmark = param(rngs, lambda k, s, dt: jax.random.normal(k, s, jnp.float32).astype(dt),
                            (d,), ("embed",), pdtype)
    self.head = None if cfg.tie_embeddings else Linear(
        d, v, ("embed", "vocab"), dtype=self.dtype, param_dtype=pdtype, rngs=rngs)

  def _embed(self, tokens):
    return jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

  def _logits(self, x):
    x = self.norm(x)
    if self.head is None:
      w = self.embed[...].astype(self.dtype)
      logits = jnp.einsum("btd,vd->btv", x, w)
    else:
      logits = self.head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens, segment_ids=None, *, return_aux: bool = False):
    """Logits [B, T, V] (fp32); with ``return_aux`` also the sum over all layers of the
    mixers' auxiliary losses (``call_with_aux``; 0.0 when no mixer has one)."""
    x = self._embed(tokens)
    if self.landmark_every:
      b, t = tokens.shape
      tok_idx, lm_idx, has_lm, ext = landmark_layout(segment_ids, b, t, self.landmark_every)
      rows = jnp.arange(b)[:, None]
      xe = jnp.zeros((b, ext, x.shape[-1]), x.dtype).at[rows, tok_idx].set(x)
      lm = jnp.broadcast_to(self.landmark[...].astype(x.dtype), x.shape)
      xe = xe.at[rows, jnp.where(has_lm, lm_idx, ext)].set(lm, mode="drop")
      if segment_ids is not None:  # landmarks join their document; the tail gets its own id
        se = jnp.full((b, ext), jnp.max(segment_ids) + 1, segment_ids.dtype)
        se = se.at[rows, tok_idx].set(segment_ids)
        segment_ids = se.at[rows, jnp.where(has_lm, lm_idx, ext)].set(segment_ids, mode="drop")
      x = xe
    aux = jnp.zeros((), jnp.float32)
    if self.scan_layers:
      def body(group, carry):
        h, a = carry
        h, ga = group.call_with_aux(h, segment_ids)
        return h, a + ga
      if self.remat:
        body = nnx.remat(body)
      x, aux = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                        transform_metadata={nnx.PARTITION_NAME: "layers"})(self.groups, (x, aux))
    else:
      for g in self.groups:
        fn = lambda gg, h: gg.call_with_aux(h, segment_ids)
        x, ga = (nnx.remat(fn) if self.remat else fn)(g, x)
        aux = aux + ga
    if self.landmark_every:
      x = jnp.take_along_axis(x, tok_idx[..., None], axis=1)  # drop the landmark outputs
    logits = self._logits(x)
    return (logits, aux) if return_aux else logits

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    if self.landmark_every:
      ext = None if max_len is None else max_len + max_len // self.landmark_every + 1
      return {"layers": self._init_layer_state(batch, dtype, ext),
              "tokens": jnp.zeros((), jnp.int32)}
    return self._init_layer_state(batch, dtype, max_len)

  def _init_layer_state(self, batch, dtype, max_len):
    if self.scan_layers:
      return nnx.vmap(lambda g: g.init_state(batch, dtype, max_len), in_axes=0, out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})(self.groups)
    return [g.init_state(batch, dtype, max_len) for g in self.groups]

  def step(self, tokens, state):
    if not self.landmark_every:
      return self._step_layers(self._embed(tokens), state)
    x = self._embed(tokens)
    lm = jnp.broadcast_to(self.landmark[...].astype(x.dtype), x[:, :1].shape)
    graphdef, params = nnx.split(self)  # carried, so the loops trace them at their level
    v = self.embed.shape[0]  # vocabulary

    def one(carry, xi):
      """A token, then (after every ``landmark_every``-th) a landmark: one or two passes of
      a while loop (a ``lax.cond`` around the layers would copy every KV cache per token)."""
      st, n, p = carry
      n = n + 1
      passes = 1 + (n % self.landmark_every == 0).astype(jnp.int32)

      def body(c):
        i, s, lg, pp = c
        inp = jnp.where(i == 0, xi[:, None], lm)
        out, s = nnx.merge(graphdef, pp)._step_layers(inp, s)
        return i + 1, s, jnp.where(i == 0, out[:, 0], lg), pp

      init = (jnp.zeros((), jnp.int32), st, jnp.zeros((xi.shape[0], v), jnp.float32), p)
      _, st, logits, _ = jax.lax.while_loop(lambda c: c[0] < passes, body, init)
      return (st, n, p), logits

    if x.shape[1] == 1:  # decode: no scan around the caches
      (layers, n, _), logits = one((state["layers"], state["tokens"], params), x[:, 0])
      return logits[:, None], {"layers": layers, "tokens": n}
    (layers, n, _), logits = jax.lax.scan(one, (state["layers"], state["tokens"], params),
                                          jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(logits, 0, 1), {"layers": layers, "tokens": n}

  def _step_layers(self, x, state):
    if self.scan_layers:
      def body(group, h, s):
        return group.step(h, s)
      x, state = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                          transform_metadata={nnx.PARTITION_NAME: "layers"})(
                              self.groups, x, state)
    else:
      new = []
      for g, s in zip(self.groups, state):
        x, s = g.step(x, s)
        new.append(s)
      state = new
    return self._logits(x), state

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    """Recurrent-state elements of the whole model (sum of every mixer's ``state_size``)."""
    total = 0
    for n, overrides in self.mixer_overrides:
      mixer = nnx.eval_shape(lambda n=n, o=dict(overrides): registry.create(
          n, d_model=self.d_model, rngs=nnx.Rngs(0), **o))
      total += mixer.state_size(batch, max_len=max_len)
    return total * self.num_groups
