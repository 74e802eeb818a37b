"""Decoder LM: embed -> groups of pre-norm blocks (norm, mixer, norm, MLP) -> norm -> head.

The block pattern (``model.pattern``, e.g. ``"gla,gla,swa"``) is one *group*; the group is
repeated ``num_layers / len(pattern)`` times. With ``scan_layers`` the repeated groups are
created with ``nnx.vmap`` (parameters stacked on a leading ``layers`` axis) and run with
``nnx.scan`` (+ ``nnx.remat``), so compile time does not grow with depth.

The LM has the same three forms as its mixers:
  logits = lm(tokens, segment_ids)             # [B, T] -> [B, T, V] (fp32)
  state = lm.init_state(batch, max_len=...)     # stacked per-group mixer states
  logits, state = lm.step(tokens, state)        # [B, t] -> [B, t, V]
  logits, aux = lm(tokens, segment_ids, return_aux=True)   # + summed auxiliary losses

Sequence layout. A mixer class may change the row the layers run on by defining
``sequence_layout(configs, *, d_model, param_dtype, rngs)``; it returns a module (``layout``)
that wraps the layer stack in ``__call__`` and ``step`` and sizes the state (``cache_len``,
``init_state``). Landmark attention uses it to insert its landmark tokens
(``layers/landmark_tokens.py``); the LM itself has no mixer-specific code. Callers never see
the layout: tokens in, one logit row per token out.

Layer carry. A mixer class may ask for a value handed from layer to layer through the stack
(RWKV-7's value residual: later layers mix their values towards the first layer's). It
defines ``init_layer_carry(configs, *, d_model, batch, length, dtype)`` (the carry's initial
pytree, from the field dicts of every pattern name using the class), ``call_with_carry(x,
carry, segment_ids) -> (y, carry)`` and ``step_with_carry(x, state, carry) -> (y, state,
carry)``. The LM threads ``{class key: carry}`` through ``__call__`` and ``step`` (through
``nnx.scan`` over the groups with ``scan_layers``); a carry is built per call, never part
of the decode state. Without such a mixer the carry is ``{}`` and adds nothing.

MLP (``model.mlp``): ``"swiglu"`` (``SwiGLU``) or ``"rwkv"`` (RWKV-7's channel mix, which
token-shifts its input: its previous token joins the block's decode state as
``{"mixer": mixer state, "mlp": [B, D]}``; with ``"swiglu"`` a block's state is the mixer's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.common import ConfigError, Linear, RMSNorm, SwiGLU, param
from lcm import registry

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MLPS = ("swiglu", "rwkv")  # model.mlp


def carry_key(cls) -> str:
  """The key of a mixer class's entry in the layer carry (``init_layer_carry`` hook)."""
  return f"{cls.__module__}.{cls.__qualname__}"


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
    cls = type(self.mixer)
    self.carry_key = carry_key(cls) if hasattr(cls, "init_layer_carry") else None
    kind = cfg.get("mlp", "swiglu")
    if kind not in MLPS:
      raise ConfigError("model.mlp", f"must be one of {', '.join(MLPS)} (got {kind!r})")
    hidden = int(round(cfg.mlp_ratio * d))
    # The RWKV channel mix token-shifts: its previous input is decode state.
    self.shift_mlp = hidden > 0 and kind == "rwkv"
    if hidden > 0:
      self.norm2 = RMSNorm(d, eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
      if self.shift_mlp:  # imported when asked for, like the registry's mixers
        from layers.linear_attention import RWKV7ChannelMix  # pylint: disable=g-import-not-at-top
        mlp = RWKV7ChannelMix
      else:
        mlp = SwiGLU
      self.mlp = mlp(d, hidden, dtype=dtype, param_dtype=pdtype, rngs=rngs)
    else:
      self.norm2 = self.mlp = None

  def _mlp(self, x, segment_ids=None):
    if self.shift_mlp:
      return x + self.mlp(self.norm2(x), segment_ids)
    return x if self.mlp is None else x + self.mlp(self.norm2(x))

  def __call__(self, x, segment_ids=None):
    return self._mlp(x + self.mixer(self.norm1(x), segment_ids=segment_ids), segment_ids)

  def call_with_aux(self, x, segment_ids=None):
    """(block output, the mixer's auxiliary loss): a mixer with an auxiliary loss (e.g. MoM's
    load balance) defines ``call_with_aux(x, segment_ids) -> (y, aux)``; others give 0."""
    fn = getattr(self.mixer, "call_with_aux", None)
    if fn is None:
      return self(x, segment_ids), jnp.zeros((), jnp.float32)
    y, aux = fn(self.norm1(x), segment_ids=segment_ids)
    return self._mlp(x + y, segment_ids), aux.astype(jnp.float32)

  def call_with_carry(self, x, segment_ids, carry):
    """(block output, auxiliary loss, layer carry): a mixer with the ``init_layer_carry``
    hook reads and updates its entry of the carry; others leave it alone."""
    if self.carry_key is None:
      return (*self.call_with_aux(x, segment_ids), carry)
    y, c = self.mixer.call_with_carry(self.norm1(x), carry[self.carry_key],
                                      segment_ids=segment_ids)
    return (self._mlp(x + y, segment_ids), jnp.zeros((), jnp.float32),
            {**carry, self.carry_key: c})

  def init_state(self, batch, dtype, max_len):
    state = self.mixer.init_state(batch, dtype, max_len=max_len)
    if self.shift_mlp:
      return {"mixer": state, "mlp": self.mlp.init_state(batch, dtype)}
    return state

  def step(self, x, state, carry):
    """(block output, state, layer carry) for a chunk x [B, t, D]."""
    mixer_state = state["mixer"] if self.shift_mlp else state
    if self.carry_key is None:
      y, mixer_state = self.mixer.step(self.norm1(x), mixer_state)
    else:
      y, mixer_state, c = self.mixer.step_with_carry(self.norm1(x), mixer_state,
                                                     carry[self.carry_key])
      carry = {**carry, self.carry_key: c}
    if not self.shift_mlp:
      return self._mlp(x + y), mixer_state, carry
    h = x + y
    m, last = self.mlp.step(self.norm2(h), state["mlp"])
    return h + m, {"mixer": mixer_state, "mlp": last}, carry

  def state_size(self, batch, max_len):
    n = self.mixer.state_size(batch, max_len=max_len)
    return n + (self.mlp.state_size(batch) if self.shift_mlp else 0)


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

  def call_with_carry(self, x, segment_ids, carry):
    aux = jnp.zeros((), jnp.float32)
    for b in self.blocks:
      x, a, carry = b.call_with_carry(x, segment_ids, carry)
      aux = aux + a
    return x, aux, carry

  def init_state(self, batch, dtype, max_len):
    return [b.init_state(batch, dtype, max_len) for b in self.blocks]

  def step(self, x, states, carry):
    new = []
    for b, s in zip(self.blocks, states):
      x, s, carry = b.step(x, s, carry)
      new.append(s)
    return x, new, carry

  def state_size(self, batch, max_len):
    return sum(b.state_size(batch, max_len) for b in self.blocks)


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
    self.mlp_state_size = (int(cfg.d_model) if cfg.get("mlp", "swiglu") == "rwkv"
                           and int(round(cfg.mlp_ratio * cfg.d_model)) > 0 else 0)
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
    self.layout = self._sequence_layout(pdtype, rngs)
    jax.eval_shape(lambda: self._init_carry(1, 1))  # mixers must agree on their carry
    self.head = None if cfg.tie_embeddings else Linear(
        d, v, ("embed", "vocab"), dtype=self.dtype, param_dtype=pdtype, rngs=rngs)

  def _sequence_layout(self, pdtype, rngs):
    """The one sequence layout asked for by the pattern's mixer classes (or None)."""
    hooks = {}
    for n, overrides in self.mixer_overrides:
      cls = registry.get(n)
      if hasattr(cls, "sequence_layout"):
        hooks.setdefault(cls, []).append({**registry.config_fields(n), **dict(overrides)})
    if len(hooks) > 1:
      raise ConfigError("model.pattern", "at most one mixer class may change the sequence "
                        f"layout (got {', '.join(sorted(c.__name__ for c in hooks))})")
    if not hooks:
      return None
    (cls, configs), = hooks.items()
    return cls.sequence_layout(configs, d_model=self.d_model, param_dtype=pdtype, rngs=rngs)

  def _init_carry(self, batch, length):
    """The layer carry at the bottom of the stack: ``{class key: initial carry}`` for every
    mixer class of the pattern with the ``init_layer_carry`` hook (``{}`` if none)."""
    hooks = {}
    for n, overrides in self.mixer_overrides:
      cls = registry.get(n)
      if hasattr(cls, "init_layer_carry"):
        hooks.setdefault(carry_key(cls), (cls, []))[1].append(
            {**registry.config_fields(n), **dict(overrides)})
    return {key: cls.init_layer_carry(configs, d_model=self.d_model, batch=batch,
                                      length=length, dtype=self.dtype)
            for key, (cls, configs) in hooks.items()}

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
    if self.layout is None:
      x, aux = self._run_layers(x, segment_ids)
    else:
      x, aux = self.layout(x, segment_ids, self._run_layers)
    logits = self._logits(x)
    return (logits, aux) if return_aux else logits

  def _run_layers(self, x, segment_ids):
    """Every group over x [B, T', D]: (hidden states, summed auxiliary losses)."""
    aux = jnp.zeros((), jnp.float32)
    carry = self._init_carry(x.shape[0], x.shape[1])
    if self.scan_layers:
      def body(group, c):
        h, a, lc = c
        h, ga, lc = group.call_with_carry(h, segment_ids, lc)
        return h, a + ga, lc
      if self.remat:
        body = nnx.remat(body)
      x, aux, _ = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
                           transform_metadata={nnx.PARTITION_NAME: "layers"})(
                               self.groups, (x, aux, carry))
      return x, aux
    for g in self.groups:
      fn = lambda gg, h, c: gg.call_with_carry(h, segment_ids, c)
      x, ga, carry = (nnx.remat(fn) if self.remat else fn)(g, x, carry)
      aux = aux + ga
    return x, aux

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    if self.layout is None:
      return self._init_layer_state(batch, dtype, max_len)
    return self.layout.init_state(
        self._init_layer_state(batch, dtype, self.layout.cache_len(max_len)))

  def _init_layer_state(self, batch, dtype, max_len):
    if self.scan_layers:
      return nnx.vmap(lambda g: g.init_state(batch, dtype, max_len), in_axes=0, out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})(self.groups)
    return [g.init_state(batch, dtype, max_len) for g in self.groups]

  def step(self, tokens, state):
    x = self._embed(tokens)
    if self.layout is None:
      return self._step_layers(x, state)
    graphdef, params = nnx.split(self)  # carried, so the layout's loops trace them

    def apply(p, inp, s):
      return nnx.merge(graphdef, p)._step_layers(inp, s)  # pylint: disable=protected-access

    return self.layout.step(x, state, apply, params, out_dim=self.embed.shape[0])

  def _step_layers(self, x, state):
    carry = self._init_carry(x.shape[0], x.shape[1])
    if self.scan_layers:
      def body(group, c, s):
        h, lc = c
        h, s, lc = group.step(h, s, lc)
        return (h, lc), s
      (x, _), state = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                               transform_metadata={nnx.PARTITION_NAME: "layers"})(
                                   self.groups, (x, carry), state)
    else:
      new = []
      for g, s in zip(self.groups, state):
        x, s, carry = g.step(x, s, carry)
        new.append(s)
      state = new
    return self._logits(x), state

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    """Recurrent-state elements of the whole model (sum of every mixer's ``state_size``,
    plus the RWKV channel mix's previous token per block with ``model.mlp = "rwkv"``)."""
    total = len(self.mixer_overrides) * batch * self.mlp_state_size
    for n, overrides in self.mixer_overrides:
      mixer = nnx.eval_shape(lambda n=n, o=dict(overrides): registry.create(
          n, d_model=self.d_model, rngs=nnx.Rngs(0), **o))
      total += mixer.state_size(batch, max_len=max_len)
    return total * self.num_groups
