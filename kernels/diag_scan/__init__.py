"""Diagonal (element-wise) linear recurrence: the S4D, Mamba-1 and RG-LRU scan.

    h_t = a_t * h_{t-1} + b_t,      a_t = exp(log_a_t)        (every channel independent)

Papers: Gu et al. 2022 (S4D, "On the parameterization and initialization of diagonal state
space models": complex diagonal ``A``, ZOH ``log_a = dt * A``); Gu & Dao 2023 (Mamba,
selective scan with a ``[B, T, D, N]`` state, ``log_a = dt * A``); De et al. 2024 (Griffin,
RG-LRU, ``log_a = -c * r_t * softplus(-Lambda)``).

Public API::

    h, final_state = diagonal_recurrence(log_a, b, *, initial_state=None, reset=None,
                                         chunk_size=128, impl="auto", interpret=False)

The decay is passed **in log space** (``log_a``, natural log, ``Re log_a <= 0`` for a
stable recurrence): that is what every caller has (``dt * A``, a log-sigmoid gate) and it
keeps near-1 decays exact; raw decays are never multiplied over long spans.

Implementations (``impl``):
  * ``"reference"``: per-token ``lax.scan``; the ground truth (slow, O(T) sequential steps).
  * ``"xla"``: two-level chunked jnp form (:func:`reference.diagonal_recurrence_chunked`):
    a ``lax.scan`` over the C positions of a chunk vectorised over all chunks, then a
    ``lax.scan`` handing the carry across the T/C chunks (O(T) work, C + T/C sequential
    steps), decays summed in log space, fp32 compute, differentiated by ordinary autodiff;
    ``auto``'s path for complex inputs on TPU / GPU.
    (:func:`reference.diagonal_recurrence_associative`, a ``jax.lax.associative_scan`` with
    the same log-space operator, is the log-depth alternative; tested, not dispatched.)
  * ``"pallas_tpu"``: Mosaic TPU kernel, grid (B, channel blocks of rows x 128 lanes,
    chunks of ``chunk_size`` tokens) with the carry in VMEM scratch.
  * ``"pallas_gpu"``: Pallas Triton kernel, grid (B, channel blocks), time looped in-kernel
    (``chunk_size`` unused).
  * ``"auto"``: the row of :data:`AUTO` for the backend and T's shape class
    (``kernels.common.shape_class``): ``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU,
    ``reference`` on CPU (measured: ``python -m experiments.bench auto``; the per-token scan
    is memory-bound and reads each element once, the chunked form several times), and
    ``xla`` instead of a Pallas kernel for complex inputs (the kernels are real-only).
  ``interpret=True`` runs a Pallas implementation on CPU (any truthy value is passed to
  ``pallas_call(interpret=...)``, e.g. ``pltpu.InterpretParams()`` for the TPU kernel).

Backward of the Pallas implementations (``jax.custom_vjp``): the adjoint of a diagonal
linear recurrence is the same recurrence run backwards in time,

    g_t = dh_t + a_{t+1} g_{t+1},   g_{T-1} = dh_{T-1} + d final_state,

computed by the same kernel in ``reverse`` mode (chunks and tokens visited last to first,
no flipped copies), whose final carry is ``a_0 g_0``. Then ``db_t = g_t``,
``d log_a_t = g_t * a_t * h_{t-1}`` (``h_{-1}`` the initial state) and
``d initial_state = a_0 g_0``. Resets are folded in as ``log_a = -inf`` (``a = 0`` exactly)
before the kernels, which stops both the forward and the adjoint recurrence at a
document start and zeroes ``d log_a`` there.

Inputs: ``b`` ``[B, T, ...channels]`` (``[B,T,D]``, ``[B,T,D,N]``, ...; channels are
flattened internally); ``log_a`` of b's shape or broadcastable to it (e.g. a
time-invariant ``[D, N]``); real floating or (reference / xla) complex.
``initial_state`` ``[B, ...channels]``; ``reset`` ``[B, T]`` bool, True where a document
starts (``h_{t-1}`` is zeroed before step t). Outputs: ``h`` ``[B, T, ...channels]`` in
b's dtype, ``final_state`` ``[B, ...channels]`` float32 (complex64 for complex inputs).
All accumulation is float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.common import (IMPLS, PALLAS_IMPLS, KernelConfig, auto_impl, interpret_key,
                            pad_time)
from kernels.diag_scan.reference import (check_inputs, diagonal_recurrence_chunked,
                                         diagonal_recurrence_reference, state_dtype)

__all__ = ["diagonal_recurrence", "IMPLS", "AUTO"]

# impl="auto": the implementation measured fastest (fwd+bwd), per backend and shape class
# (kernels.common.shape_class: "short" for T < LONG_FROM = 4096 tokens, else "long"). CPU
# rows: the winners of `python -m experiments.bench auto --out=results/bench_auto`
# (results/bench_auto.json; tests/kernels/test_auto.py checks they agree): the per-token
# reference, 2-2.6x faster than the chunked xla form (geometric mean of each class; 1.6-3.5x
# per case, four runs) at 1k and 16k tokens over RG-LRU [B,T,256] and Mamba-1
# [B,T,512,16|64] shapes and complex S4D ones alike, with a third of its temporaries (the
# scan is memory-bound; the chunked form makes more passes). TPU / GPU rows: the Pallas
# kernels, not measured (no accelerator here); complex inputs take xla there (the kernels
# are real-only).
AUTO = {("cpu", "short"): "reference", ("cpu", "long"): "reference",
        ("gpu", "short"): "pallas_gpu", ("gpu", "long"): "pallas_gpu",
        ("tpu", "short"): "pallas_tpu", ("tpu", "long"): "pallas_tpu"}


def _auto_impl(is_complex: bool, length: int) -> str:
  impl = auto_impl(AUTO, length)
  return "xla" if is_complex and impl in PALLAS_IMPLS else impl  # Pallas is real-only


def diagonal_recurrence(log_a, b, *, initial_state=None, reset=None, chunk_size: int = 128,
                        impl: str = "auto", interpret=False):
  """Diagonal linear recurrence ``h_t = exp(log_a_t) * h_{t-1} + b_t``.

  Args:
    log_a: natural log of the per-step decay, ``b``'s shape or broadcastable to it;
      ``<= 0`` (real part) for a stable recurrence; arbitrarily negative values are fine.
      Real, or complex (S4D) for ``impl="reference"``/``"xla"``/``"auto"``.
    b: ``[B, T, ...channels]`` per-step inputs (at least one channel axis).
    initial_state: ``[B, ...channels]`` or ``None`` (zeros).
    reset: ``[B, T]`` bool or ``None``; True at the first token of a document.
    chunk_size: tokens per chunk of ``"xla"`` and per grid step of ``"pallas_tpu"`` (any
      T works: T is padded); ignored by ``"reference"`` and ``"pallas_gpu"``.
    impl: one of ``"auto", "reference", "xla", "pallas_tpu", "pallas_gpu"``.
    interpret: run a Pallas implementation in interpret mode (CPU); may be a
      ``pltpu.InterpretParams`` for ``"pallas_tpu"``.

  Returns:
    ``(h, final_state)``: ``h`` ``[B, T, ...channels]`` in b's dtype; ``final_state``
    ``[B, ...channels]`` float32 or complex64 (pass it as ``initial_state`` to continue).
  """
  check_inputs(log_a, b, initial_state, reset)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")
  log_a = jnp.asarray(log_a)
  is_complex = state_dtype(log_a, b) == jnp.complex64
  if impl == "auto":
    impl = _auto_impl(is_complex, b.shape[1])
  if reset is not None:
    reset = reset.astype(bool)
  if impl == "reference":
    return diagonal_recurrence_reference(log_a, b, initial_state, reset)
  chunk_size = int(chunk_size)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}.")
  t = b.shape[1]
  if impl == "xla" or t < 8:
    # Shorter than a kernel tile (decoding): one chunk of T tokens, no padding.
    return diagonal_recurrence_chunked(log_a, b, initial_state, reset, min(chunk_size, t))
  if is_complex:
    raise ValueError(f"impl={impl!r} supports real inputs only; use impl='xla' (or "
                     f"'auto') for complex log_a / b (S4D).")
  cfg = KernelConfig(impl=impl, chunk=chunk_size, interpret=interpret_key(interpret))

  Bn, T = b.shape[:2]
  chan = b.shape[2:]
  if not jnp.issubdtype(log_a.dtype, jnp.floating):
    log_a = log_a.astype(jnp.float32)
  la = jnp.broadcast_to(log_a, b.shape).reshape(Bn, T, -1)
  if reset is not None:  # a document start: a_t = 0 exactly (see the module docstring)
    la = jnp.where(reset[:, :, None], jnp.asarray(-jnp.inf, la.dtype), la)
  h0 = None if initial_state is None else initial_state.reshape(Bn, -1)
  h, hf = _pallas_recurrence(la, b.reshape(Bn, T, -1), h0, cfg)
  return h.reshape(b.shape), hf.reshape((Bn,) + chan)


# ----------------------------------------------------------------------------------
# Pallas implementations: shared preparation and the custom VJP.
# ----------------------------------------------------------------------------------


def _backend(impl):
  if impl == "pallas_tpu":
    from kernels.diag_scan import pallas_tpu
    return pallas_tpu
  from kernels.diag_scan import pallas_gpu
  return pallas_gpu


def _run_kernel(cfg, la, b, h0, *, reverse=False, out_dtype=None):
  """``[B, T, F]`` inputs -> ``(out [B, T, F], final carry [B, F] fp32)``; pads T (front) to
  a multiple of the chunk for the TPU kernel (the GPU kernel loops over tokens)."""
  T = b.shape[1]
  if cfg.impl == "pallas_tpu":
    tp = -(-T // cfg.chunk) * cfg.chunk
    # zero log decay and zero input leave the carry untouched, in both directions
    # (forward: c = 1*c + 0; reverse: c = 1*(0+c))
    la, b = pad_time(la, tp), pad_time(b, tp)
  out, hf = _backend(cfg.impl).forward(la, b, h0, chunk=cfg.chunk, reverse=reverse,
                                       out_dtype=out_dtype or b.dtype,
                                       interpret=cfg.interpret)
  return out[:, out.shape[1] - T:], hf


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pallas_recurrence(la, b, h0, cfg):
  return _run_kernel(cfg, la, b, h0)


def _pallas_fwd(la, b, h0, cfg):
  h, hf = _run_kernel(cfg, la, b, h0)
  return (h, hf), (la, h, h0)


def _pallas_bwd(cfg, res, cts):
  la, h, h0 = res
  dh, dhf = cts
  f32 = jnp.float32
  # g_t = dh_t + a_{t+1} g_{t+1} (g_{T-1} = dh_{T-1} + dhf); final carry a_0 g_0.
  g, a0g0 = _run_kernel(cfg, la, dh.astype(h.dtype), dhf.astype(f32), reverse=True,
                        out_dtype=f32)
  first = (jnp.zeros_like(h[:, :1], f32) if h0 is None
           else h0[:, None].astype(f32))
  h_prev = jnp.concatenate([first, h[:, :-1].astype(f32)], axis=1)
  # a_t = 0 at a reset (log_a = -inf): the product is exactly 0 there (h_prev is finite).
  dla = g * jnp.exp(la.astype(f32)) * h_prev
  dh0 = None if h0 is None else a0g0.astype(h0.dtype)
  return dla.astype(la.dtype), g.astype(h.dtype), dh0


_pallas_recurrence.defvjp(_pallas_fwd, _pallas_bwd)
