"""Helpers shared by the kernel ops (jax only): dispatch and static configuration,
padding, and exact log-decay sums.

Log-decay sums. Inside a chunk, a decay between tokens j < i is ``exp(sum_{j<m<=i} g_m)``.
Computing the exponent as a difference ``b_i - b_j`` of cumulative sums loses
``eps * |b|`` absolutely: after one saturated gate (say -3000) followed by mild ones,
``|b| ~ 3000`` and ``exp(b_i - b_j)`` of an O(1) pair is off by ~4e-4 relative.
:func:`segment_sum` and :func:`suffix_sum` sum exactly the gates in between instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST

# Every op's ``impl=`` values (``"auto"`` resolves to one of the others), and the Pallas ones.
IMPLS = ("auto", "reference", "xla", "pallas_tpu", "pallas_gpu")
PALLAS_IMPLS = ("pallas_tpu", "pallas_gpu")


# ----------------------------------------------------------------------------------
# Dispatch and static configuration.
# ----------------------------------------------------------------------------------


# Shape classes of ``impl="auto"``: a call on T tokens is "short" for T < LONG_FROM, else
# "long". The kernels' costs differ in kind, not only in size, across it: a per-token scan
# runs T sequential steps (its overhead per step is what a short sequence pays), a chunked
# form T / C chunks plus C-sized blocks (its fixed per-chunk work is what a short sequence
# cannot amortise). 4096 is the geometric middle of the lengths that
# ``python -m experiments.bench auto`` measures for the two classes (1024 and 16384).
LONG_FROM = 4096


def shape_class(length: int) -> str:
  """``"short"`` for ``length < LONG_FROM`` tokens, else ``"long"``."""
  return "short" if int(length) < LONG_FROM else "long"


def platform() -> str:
  """The default backend as an ``AUTO`` table names it: ``"tpu"``, ``"gpu"`` (CUDA or ROCm)
  or ``"cpu"`` (anything else)."""
  backend = jax.default_backend()
  if backend == "tpu":
    return "tpu"
  if backend in ("gpu", "cuda", "rocm"):
    return "gpu"
  return "cpu"


def auto_impl(table=None, length=None) -> str:
  """``impl="auto"``: the implementation measured fastest for this backend and the shape
  class of ``length`` tokens, ``table[(platform(), shape_class(length))]`` (each op's
  ``AUTO`` table). Without a table (or a row for this backend and class): ``pallas_tpu`` on
  TPU, ``pallas_gpu`` on GPU, ``xla`` otherwise."""
  backend = platform()
  default = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(backend, "xla")
  if table is None or length is None:
    return default
  return table.get((backend, shape_class(length)), default)


def interpret_key(interpret):
  """The ``interpret`` argument as a static value: a bool, or the object itself (e.g. a
  ``pltpu.InterpretParams``, a hashable dataclass) passed on to ``pallas_call``."""
  if isinstance(interpret, bool) or interpret is None:
    return bool(interpret)
  return interpret


@functools.total_ordering
class KernelConfig:
  """Static (hashable, ordered) configuration of a Pallas call, e.g.
  ``KernelConfig(impl="pallas_tpu", chunk=64, interpret=False)``; fields are attributes.
  Compared by the ``repr`` of each field, so any ``interpret`` value orders."""

  def __init__(self, **fields):
    self.__dict__.update(fields)

  def _key(self):
    return tuple(sorted((k, repr(v)) for k, v in self.__dict__.items()))

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, KernelConfig) and self._key() == other._key()

  def __lt__(self, other):
    return self._key() < other._key()

  def __repr__(self):
    return f"KernelConfig({', '.join(f'{k}={v!r}' for k, v in sorted(self.__dict__.items()))})"


# ----------------------------------------------------------------------------------
# Padding.
# ----------------------------------------------------------------------------------


def pad_time(x, tp, value=0):
  """Pad axis 1 (time) of ``x`` at the *front* to length ``tp`` (``None`` passes through).

  Front padding with zero inputs, zero log decay and no reset leaves the initial state
  untouched (decay exp(0) = 1, nothing added), in the forward and in the time-reversed
  adjoint recurrence, and keeps the last real token last in its chunk, so its decay to
  the chunk end is the exact constant 0 (see :func:`suffix_sum`).
  """
  if x is None or x.shape[1] == tp:
    return x
  pad = [(0, 0)] * x.ndim
  pad[1] = (tp - x.shape[1], 0)
  return jnp.pad(x, pad, constant_values=value)


def scan_chunks(x, chunk):
  """``[B, T, H, ...]`` -> ``[N, B, H, 1, C, ...]`` (T front-padded to ``N * C``): the
  per-step inputs of a ``lax.scan`` over chunks, each step one chunk in the batched-chunk
  layout ``[B, H, N=1, C, ...]`` of the chunked forms."""
  B, T = x.shape[:2]
  N = -(-T // chunk)
  x = pad_time(x, N * chunk)
  x = x.reshape((B, N, chunk) + x.shape[2:])
  return jnp.moveaxis(x, (1, 3), (0, 2))[:, :, :, None]


def unscan_chunks(o, T):
  """The stacked per-chunk outputs ``[N, B, H, C, D]`` of a scan over chunks ->
  ``[B, T, H, D]`` (the front padding dropped)."""
  N, B, H, C, D = o.shape
  return jnp.moveaxis(o, (0, 2), (1, 3)).reshape(B, N * C, H, D)[:, N * C - T:]


def scan_resets(reset, chunk):
  """``reset [B, T]`` bool -> ``[N, B, C]`` int32 per-chunk reset flags (front-padded with
  no reset), the per-step input from which a step's within-chunk ``seg`` is a cumsum."""
  B, T = reset.shape
  N = -(-T // chunk)
  return jnp.moveaxis(pad_time(reset.astype(jnp.int32), N * chunk).reshape(B, N, chunk), 1, 0)


def pow2(d) -> int:
  """The smallest power of two >= ``d`` and >= 16 (Triton tile sides, ``tl.dot`` >= 16)."""
  return max(16, 1 << (int(d) - 1).bit_length())


def pad_last(x, n):
  """Zero-pad the last axis of ``x`` to ``n`` (``None`` passes through)."""
  if x is None or x.shape[-1] == n:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def group_heads(*xs) -> int:
  """The head count H of a kernel grid whose ``[B, T, heads, D]`` inputs may be grouped:
  the most heads among ``xs``; every input's heads must divide it (an input with
  ``H / r`` heads serves head ``h`` from its head ``h // r``)."""
  heads = max(x.shape[2] for x in xs)
  for x in xs:
    if heads % x.shape[2]:
      raise ValueError(f"grouped inputs need head counts dividing {heads}; got "
                       f"{[x.shape[2] for x in xs]}.")
  return heads


# ----------------------------------------------------------------------------------
# Exact log-decay sums.
# ----------------------------------------------------------------------------------


def segment_sum(g):
  """``S[..., i, j] = sum_{j < m <= i} g_m`` along the last axis of ``g`` (``[..., C]`` ->
  ``[..., C, C]``); 0 on the diagonal, and 0 (to be masked by the caller) for ``i < j``.

  A sum of exactly the log decays between j and i, *not* ``b_i - b_j`` (see the module
  docstring). Computed as a masked triangular-ones matmul,
  ``S = (g_m [m <= i]) @ [m > j]`` (fp32, ``Precision.HIGHEST``): the terms outside
  ``(j, i]`` are multiplied by an exact 0, and a matmul is cheaper on CPU than a cumsum
  along the rows of a [C, C] matrix (lowered to a reduce-window). ``g`` must be finite.
  """
  C = g.shape[-1]
  upto = jnp.tril(jnp.ones((C, C), bool))  # [i, m]: m <= i
  after = jnp.tril(jnp.ones((C, C), g.dtype), -1)  # [m, j]: m > j
  return jnp.einsum("...im,mj->...ij", jnp.where(upto, g[..., None, :], 0.0), after,
                    precision=_HI)


def suffix_sum(g, axis=-1):
  """``r_j = sum_{m > j} g_m`` along ``axis`` (the log decay from token j to the chunk
  end), computed as a sum of exactly those terms; the last entry is the constant 0, so its
  gradient is exactly zero too."""
  g = jnp.moveaxis(g, axis, -1)
  shifted = jnp.concatenate([g[..., 1:], jnp.zeros_like(g[..., :1])], axis=-1)
  return jnp.moveaxis(jnp.flip(jnp.cumsum(jnp.flip(shifted, -1), axis=-1), -1), -1, axis)
