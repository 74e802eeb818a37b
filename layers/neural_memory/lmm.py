"""Titans' neural long-term memory (LMM) as a token mixer: :class:`TitansLMM`, registered as
``titans_lmm``.

Paper: Behrouz, Zhong & Mirrokni 2025, "Titans: Learning to Memorize at Test Time", Sec. 3.

Per head h (H heads of width Dh = d_model / H) the memory is an MLP ``M`` whose weights
``W = (W^1, ..., W^L)`` (``W^l``: [d_{l-1}, d_l], d_0 = d_L = Dh, hidden d_l = expansion * Dh)
are the recurrent state (:class:`kernels.neural_memory.MemoryMLP`)::

    M(W, x) = x + z_L           (``residual=True``; z_L alone with ``residual=False``)
    z_l = a_{l-1} W^l,  a_0 = x,  a_l = act(z_l)   (act: GELU or SiLU; no biases)

Keys, values and queries: ``k, v, q = silu(conv(x W_k)), silu(conv(x W_v)), silu(conv(x W_q))``
(a causal depthwise short convolution per projection, ``use_short_conv``), q and k
L2-normalised per head. Per token the associative loss is the squared error averaged over the
head dim, ``l(W; k_t, v_t) = ||M(W, k_t) - v_t||_2^2 / Dh`` (the paper writes the plain
squared norm, the same up to the constant 1/Dh in theta). Data-dependent, per token and head
(sigmoids of linear projections of the layer input x)::

    theta_t = max_lr * sigmoid(w_theta . x_t + b_theta)     inner learning rate
    eta_t   = sigmoid(w_eta . x_t + b_eta)                   momentum ("past surprise") decay
    alpha_t = sigmoid(w_alpha . x_t + b_alpha)               forgetting

and the update with momentum and forgetting, then retrieval with the updated memory
(:func:`kernels.neural_memory.memory_recurrence`, chunked gradient point ``W'_t``: the memory
at the start of token t's chunk of ``chunk_size`` tokens)::

    S_t = eta_t S_{t-1} - theta_t grad_W l(W'_t; k_t, v_t)
    M_t = (1 - alpha_t) M_{t-1} + S_t
    o_t = M(M_t, q_t)

Every document starts from the learned initial weights (Xavier-uniform per head) with
``S = 0``. Gate projections: LeCun-normal weights, biases ``theta_bias_init`` /
``eta_bias_init`` / ``alpha_bias_init`` (default 0, 0, -6: ``theta = max_lr / 2``,
``eta = 1/2``, ``alpha = sigmoid(-6)`` ~ 0.25% per token at zero input). With
``max_grad_norm`` every token's gradient is clipped to that global norm. Output: per-head
RMSNorm times ``silu(x W_g)`` (``output_gate``), then the output projection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.neural_memory import ACTIVATIONS, MemoryMLP, Weights, memory_recurrence
from layers import context_parallel
from layers.common import (GatedRMSNorm, Linear, RMSNorm, ShortConv, check, check_bool,
                           check_finite, check_pos_int, check_positive, dense_init, is_int, param,
                           segment_positions)
from layers.neural_memory.common import check_x, fields_of, head_dim_of

__all__ = ["TitansLMM", "TitansLMMConfig"]

_F32 = jnp.float32


def _l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum x^2 + eps) over the last axis, in float32."""
  x = x.astype(_F32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


@dataclasses.dataclass(frozen=True)
class TitansLMMConfig:
  """Hyper-parameters of :class:`TitansLMM` (the neural long-term memory).

  num_heads: memory heads H (must divide d_model; Dh = d_model / H).
  depth: linear layers of the memory MLP (1 = a linear matrix memory; the paper: >= 2).
  expansion: hidden width of the memory MLP = expansion * Dh.
  activation: "gelu" (titans-pytorch) or "silu".
  residual: memory output ``x + MLP(x)``.
  chunk_size: tokens that share one gradient point (C = 1: the exact sequential rule).
  max_lr: theta_t = max_lr * sigmoid(.) (docs/numerics.md: "Titans: bounded inner steps").
  max_grad_norm: clip each token's memory gradient to this global norm (None: no clip).
  theta_bias_init, eta_bias_init, alpha_bias_init: bias inits of the three gate logits.
  use_short_conv, conv_size: causal depthwise convolution on q, k, v.
  output_gate: per-head RMSNorm * silu(x W_g) before the output projection (else RMSNorm).
  norm_eps: epsilon of that RMSNorm.
  """

  num_heads: int = 4
  depth: int = 2
  expansion: float = 2.0
  activation: str = "gelu"
  residual: bool = True
  chunk_size: int = 16
  max_lr: float = 0.25
  max_grad_norm: float | None = 1.0
  theta_bias_init: float = 0.0
  eta_bias_init: float = 0.0
  alpha_bias_init: float = -6.0
  use_short_conv: bool = True
  conv_size: int = 4
  output_gate: bool = True
  norm_eps: float = 1e-5

  def head_dim(self, d_model: int) -> int:
    return d_model // self.num_heads

  def hidden_dim(self, d_model: int) -> int:
    return int(round(self.head_dim(d_model) * self.expansion))

  def memory_mlp(self, d_model: int) -> MemoryMLP:
    return MemoryMLP(dim=self.head_dim(d_model), hidden=self.hidden_dim(d_model),
                     depth=self.depth, activation=self.activation, residual=self.residual,
                     max_grad_norm=self.max_grad_norm)

  def validate(self, d_model: int) -> None:
    check(is_int(d_model) and d_model >= 1, "d_model",
          f"must be a positive integer (got {d_model!r})")
    dh = head_dim_of(d_model, self.num_heads, "num_heads")
    check_pos_int(self.depth, "depth")
    check_positive(self.expansion, "expansion")
    hidden = dh * self.expansion
    check(abs(hidden - round(hidden)) < 1e-6 and round(hidden) >= 1, "expansion",
          f"hidden width = head_dim {dh} * {self.expansion} = {hidden} must be a positive "
          "integer")
    check(self.activation in ACTIVATIONS, "activation",
          f"must be one of {', '.join(ACTIVATIONS)} (got {self.activation!r})")
    check_bool(self.residual, "residual")
    check_pos_int(self.chunk_size, "chunk_size")
    check_positive(self.max_lr, "max_lr")
    if self.max_grad_norm is not None:
      check_positive(self.max_grad_norm, "max_grad_norm")
    check_finite(self.theta_bias_init, "theta_bias_init")
    check_finite(self.eta_bias_init, "eta_bias_init")
    check_finite(self.alpha_bias_init, "alpha_bias_init")
    check_bool(self.use_short_conv, "use_short_conv")
    check(is_int(self.conv_size) and self.conv_size >= 2, "conv_size",
          f"must be an integer >= 2 (got {self.conv_size!r})")
    check_bool(self.output_gate, "output_gate")
    check_positive(self.norm_eps, "norm_eps")


def _xavier_init(key, shape, dtype):
  din, dout = shape[-2], shape[-1]
  bound = math.sqrt(6.0 / (din + dout))
  return jax.random.uniform(key, shape, _F32, -bound, bound).astype(dtype)


def _const_rows_init(values: Sequence[float]):
  def init(key, shape, dtype):
    del key
    return jnp.broadcast_to(jnp.asarray(values, _F32)[:, None], shape).astype(dtype)
  return init


class _ConvQKV(nnx.Module):
  """Three causal short convolutions (q, k, v) over the flattened heads."""

  def __init__(self, width: int, size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, axis_name="heads", dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.q = ShortConv(width, size, **kw)
    self.k = ShortConv(width, size, **kw)
    self.v = ShortConv(width, size, **kw)

  def __call__(self, xs, segment_ids=None, state=None):
    outs, new = [], {}
    for name, x in zip("qkv", xs):
      conv = getattr(self, name)
      flat = x.reshape(x.shape[:2] + (-1,))
      if state is None:
        y = conv(flat, segment_ids)
      else:
        y, new[f"conv_{name}"] = conv.step(flat, state[f"conv_{name}"])
      outs.append(y.reshape(x.shape))
    return outs, (new if state is not None else None)

  def init_state(self, batch: int, dtype) -> dict[str, jax.Array]:
    return {f"conv_{n}": getattr(self, n).init_state(batch, dtype) for n in "qkv"}

  def state_size(self, batch: int) -> int:
    return 3 * batch * (self.q.kernel_size - 1) * self.q.channels


class TitansLMM(nnx.Module):
  """The Titans neural long-term memory as a token mixer (module docstring).

  State: ``{"w0", "m", "s"}`` (tuples over memory layers of ``[B, H, d_in, d_out]``: the
  chunk's gradient point, the memory, the momentum), ``"pos"`` ``[B]`` int32 (position in the
  document) and, with ``use_short_conv``, ``conv_q``/``conv_k``/``conv_v``.
  """

  Config = TitansLMMConfig

  def __init__(self, d_model: int, cfg: TitansLMMConfig | None = None, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    cfg = TitansLMMConfig() if cfg is None else fields_of(cfg, TitansLMMConfig)
    cfg.validate(d_model)
    self.cfg = cfg
    self.d_model = d_model
    self.dtype = dtype
    self.num_heads = h = cfg.num_heads
    self.head_dim = dh = cfg.head_dim(d_model)
    self.mlp = cfg.memory_mlp(d_model)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(d_model, (h, dh), ("embed", "heads", "head_dim"), **kw)
    self.k = Linear(d_model, (h, dh), ("embed", "heads", "head_dim"), **kw)
    self.v = Linear(d_model, (h, dh), ("embed", "heads", "head_dim"), **kw)
    self.conv = (_ConvQKV(h * dh, cfg.conv_size, **kw) if cfg.use_short_conv else None)
    # Gate logits [theta, eta, alpha] per head.
    self.gate_w = param(rngs, dense_init(d_model), (d_model, 3, h), ("embed", None, "heads"),
                        param_dtype)
    self.gate_b = param(rngs, _const_rows_init((cfg.theta_bias_init, cfg.eta_bias_init,
                                                cfg.alpha_bias_init)),
                        (3, h), (None, "heads"), param_dtype, tag="no_decay")
    for l, (din, dout) in enumerate(self.mlp.shapes()):
      setattr(self, f"memory_{l}", param(rngs, _xavier_init, (h, din, dout),
                                         ("heads", None, None), param_dtype))
    if cfg.output_gate:
      self.g = Linear(d_model, (h, dh), ("embed", "heads", "head_dim"), **kw)
      self.norm = GatedRMSNorm(dh, eps=cfg.norm_eps, norm_before_gate=True,
                               axis_name="head_dim", **kw)
    else:
      self.g = None
      self.norm = RMSNorm(dh, eps=cfg.norm_eps, axis_name="head_dim", **kw)
    self.out = param(rngs, dense_init(h * dh), (h, dh, d_model), ("heads", "head_dim", "embed"),
                     param_dtype)

  # ---------------------------------------------------------------- pieces (public API)
  def _check_x(self, x: jax.Array) -> None:
    check_x(self, x)

  def initial_weights(self) -> Weights:
    """The learned initial memory weights, tuple of ``[H, d_in, d_out]`` float32."""
    return tuple(getattr(self, f"memory_{l}")[...].astype(_F32) for l in range(self.cfg.depth))

  def gates(self, x: jax.Array):
    """``(log(1 - alpha), log eta, theta)``, each ``[B, T, H]`` float32."""
    logits = jnp.einsum("btd,dgh->btgh", x.astype(_F32), self.gate_w[...].astype(_F32))
    logits = logits + self.gate_b[...].astype(_F32)
    a_theta, a_eta, a_alpha = logits[:, :, 0], logits[:, :, 1], logits[:, :, 2]
    theta = self.cfg.max_lr * jax.nn.sigmoid(a_theta)
    return jax.nn.log_sigmoid(-a_alpha), jax.nn.log_sigmoid(a_eta), theta

  def project(self, x: jax.Array, segment_ids=None, conv_state=None):
    """q, k, v ``[B, T, H, Dh]`` (float32; q, k L2-normalised), the gates and the new conv
    state (None unless ``conv_state`` is given)."""
    q, k, v = self.q(x), self.k(x), self.v(x)
    new_conv = None
    if self.conv is not None:
      (q, k, v), new_conv = self.conv((q, k, v), segment_ids, conv_state)
    q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
    return _l2norm(q), _l2norm(k), v.astype(_F32), self.gates(x), new_conv

  def query(self, x: jax.Array) -> jax.Array:
    """Queries without the convolution, ``l2norm(silu(x W_q))`` (MAC's memory read)."""
    return _l2norm(jax.nn.silu(self.q(x)))

  def read(self, weights: Weights, q: jax.Array) -> jax.Array:
    """``M(W, q)`` per head: weights ``[B, H, i, o]`` (or ``[H, i, o]``), q ``[B, T, H, Dh]``."""
    qh = jnp.moveaxis(q.astype(_F32), 2, 1)
    return jnp.moveaxis(self.mlp.apply(weights, qh), 1, 2)

  def output(self, o: jax.Array, x: jax.Array) -> jax.Array:
    """Per-head reads ``[B, T, H, Dh]`` -> ``[B, T, D]`` (norm, gate from x, projection)."""
    o = o.astype(self.dtype)
    o = self.norm(o, self.g(x)) if self.g is not None else self.norm(o)
    return jnp.einsum("bthd,hde->bte", o.astype(self.dtype), self.out[...].astype(self.dtype))

  def recurrence(self, q, k, v, gates, mem, doc_pos):
    """``memory_recurrence`` with this layer's memory; over a ``sequence`` mesh axis the
    shards hand the memory state on one after another (``context_parallel.sequential``:
    the memory update is not affine in the state, so there is no prefix to parallelise)."""
    b, t = q.shape[:2]
    init = self.initial_weights()

    def run(xs, mem, init):
      return memory_recurrence(self.mlp, init, xs["q"], xs["k"], xs["v"], *xs["gates"],
                               chunk_size=self.cfg.chunk_size, state=mem,
                               doc_pos=xs.get("doc_pos"))
    xs = {"q": q, "k": k, "v": v, "gates": gates}
    mesh = context_parallel.sequence_mesh(t)
    if mesh is None:
      return run(dict(xs, doc_pos=doc_pos), mem, init)
    shard = t // mesh.shape[context_parallel.AXIS]
    if doc_pos is not None or shard % self.cfg.chunk_size:
      if doc_pos is None:  # one document from token 0 (or continuing at a chunk boundary)
        start = 0 if mem is None else self.cfg.chunk_size
        doc_pos = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
      xs["doc_pos"] = doc_pos
    # else: every shard starts on a chunk boundary of one document, so each runs the
    # kernel's single-pass aligned form from the handed-on state (the positional form
    # keeps about 2.5x the activations).
    if mem is None:  # the explicit initial state, to hand on
      w = tuple(jnp.broadcast_to(a, (b,) + a.shape) for a in init)
      mem = (w, w, tuple(jnp.zeros_like(a) for a in w))
    return context_parallel.sequential(run, xs, mem, init)

  def _run(self, x, segment_ids=None, state=None, *, aligned: bool = False):
    """(y, new state or None). ``aligned``: no documents and ``state`` (if any) at a chunk
    boundary of its document."""
    b, t, _ = x.shape
    conv_state = state if (state is not None and self.conv is not None) else None
    q, k, v, (lk, le, th), new_conv = self.project(x, segment_ids, conv_state)
    mem = None if state is None else (state["w0"], state["m"], state["s"])
    if aligned:
      doc_pos = None
    elif segment_ids is not None:
      doc_pos = segment_positions(segment_ids, b, t)
    else:
      pos = jnp.zeros((b,), jnp.int32) if state is None else state["pos"]
      doc_pos = pos[:, None] + jnp.arange(t, dtype=jnp.int32)
    o, (w0, m, s) = self.recurrence(q, k, v, (lk, le, th), mem, doc_pos)
    y = self.output(o, x)
    if state is None:
      return y, None
    dt = state["m"][0].dtype
    new = {"w0": tuple(w.astype(dt) for w in w0), "m": tuple(w.astype(dt) for w in m),
           "s": tuple(w.astype(dt) for w in s), "pos": state["pos"] + t}
    if new_conv:
      new.update(new_conv)
    return y, new

  # ---------------------------------------------------------------- contract
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    self._check_x(x)
    return self._run(x, segment_ids, None, aligned=segment_ids is None)[0]

  def init_state(self, batch: int, dtype=jnp.float32, *, max_len: int | None = None):
    del max_len
    w = tuple(jnp.broadcast_to(a, (batch,) + a.shape).astype(dtype)
              for a in self.initial_weights())
    state = {"w0": w, "m": w, "s": tuple(jnp.zeros_like(a) for a in w),
             "pos": jnp.zeros((batch,), jnp.int32)}
    if self.conv is not None:
      state.update(self.conv.init_state(batch, dtype))
    return state

  def step(self, x: jax.Array, state):
    """x ``[B, t, D]``: the next t tokens of one document per row -> (y, new state)."""
    self._check_x(x)
    return self._run(x, None, state, aligned=False)

  def memory_size(self, batch: int) -> int:
    return batch * self.num_heads * sum(i * o for i, o in self.mlp.shapes())

  def state_size(self, batch: int, *, max_len: int | None = None) -> int:
    del max_len
    n = 3 * self.memory_size(batch)
    return n + (self.conv.state_size(batch) if self.conv is not None else 0)
