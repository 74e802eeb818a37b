"""Chunked delta rule: the DeltaNet and Gated DeltaNet cores.

    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,    o_t = S_t^T q_t
        = (I - beta_t k_t k_t^T) a_t S_{t-1} + beta_t k_t v_t^T          (S_t: [Dk, Dv])

with ``a_t = exp(log_decay_t)`` one gate per head (``a_t = 1`` without ``log_decay``).

Papers: Schlag et al. 2021 ("Linear Transformers Are Secretly Fast Weight Programmers":
the delta rule as a fast-weight update); Yang et al. 2024 ("Parallelizing Linear
Transformers with the Delta Rule over Sequence Length": the chunkwise WY / UT-transform
form); Yang et al. 2024/2025 ("Gated Delta Networks: Improving Mamba2 with Delta Rule":
the gate ``a_t``).

Public API::

    o, final_state = delta_rule(q, k, v, beta, log_decay=None, *, initial_state=None,
                                reset=None, chunk_size=64, impl="auto", interpret=False)

Implementations (``impl``):
  * ``"reference"``: per-token ``lax.scan``; the ground truth (slow, O(T) sequential steps).
  * ``"xla"``: chunked WY form (:func:`reference.delta_rule_chunked`): a ``lax.scan`` over
    chunks whose checkpointed step does one chunk's UT transform (blocked forward
    substitution), outputs and state hand-off; fp32 compute, differentiated by ordinary
    autodiff; ``auto``'s choice on CPU.
  * ``"pallas_tpu"``: Mosaic TPU kernel, grid (B, H, chunks), state in VMEM scratch.
  * ``"pallas_gpu"``: Pallas Triton kernel, grid (B, H, Dv blocks), chunks looped in-kernel.
  * ``"auto"``: the row of :data:`AUTO` for the backend and T's shape class
    (``kernels.common.shape_class``): ``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU, ``xla``
    on CPU (measured: ``python -m experiments.bench auto``).
  ``interpret=True`` runs a Pallas implementation on CPU (any truthy value is passed to
  ``pallas_call(interpret=...)``, e.g. ``pltpu.InterpretParams()`` for the TPU kernel).

Structure of the Pallas implementations. The WY / UT preparation
(``T = (I + A)^{-1} diag(beta)``, ``W = T diag(gamma) K``, ``U = T V``) does not depend on
the state, so it runs *before* the kernel in XLA for all chunks at once
(:func:`reference.prepare_chunks`: batched forward substitution for ``(I + A)^{-1}``, then
matmuls; it is differentiated by
ordinary autodiff). The kernels do the sequential part -- new values ``U - W S``, outputs
and the state hand-off -- as one fused pass over the chunks.

Backward of the Pallas implementations (``jax.custom_vjp`` around the kernel part): the
forward kernel saves the state entering every chunk; a dedicated reverse-time kernel
carries the state cotangent ``dS`` across chunks (the only sequential part of the
gradient) and writes the cotangent of the state leaving every chunk, plus
``d initial_state``. Given both, the gradients w.r.t. q, k, W, U and the log decays are
local to each chunk: they are the VJP of the batched per-chunk function
(:func:`reference.chunk_outputs`) at the saved states, computed by XLA in parallel over
chunks. The gradients then flow through the XLA preparation to k, v, beta and log_decay.

Inputs: q, k ``[B,T,H,Dk]``; v ``[B,T,H,Dv]``; ``beta`` ``[B,T,H]`` (write strength,
usually a sigmoid, in (0, 2) for a contractive update); ``log_decay`` ``None`` or
``[B,T,H]`` (natural-log gate, normally <= 0; arbitrarily negative values are fine);
``initial_state`` ``[B,H,Dk,Dv]``; ``reset`` ``[B,T]`` bool, True where a document starts
(the state is zeroed *before* that token). No implicit scaling or normalisation: callers
L2-normalise k (and scale q) themselves. Outputs: ``o`` ``[B,T,H,Dv]`` in q's dtype,
``final_state`` ``[B,H,Dk,Dv]`` float32. All accumulation is float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.common import IMPLS, KernelConfig, auto_impl, interpret_key
from kernels.delta_rule.reference import (check_inputs, chunk_outputs, delta_rule_chunked,
                                          delta_rule_reference, prepare_chunks, unchunk)

__all__ = ["delta_rule", "IMPLS", "AUTO"]

# impl="auto": the implementation measured fastest (fwd+bwd), per backend and shape class
# (kernels.common.shape_class: "short" for T < LONG_FROM = 4096 tokens, else "long"). CPU
# rows: the winners of `python -m experiments.bench auto --out=results/bench_auto`
# (results/bench_auto.json; tests/kernels/test_auto.py checks they agree): xla, 3-5.5x faster
# than the per-token reference at 1k and 16k tokens (four runs). TPU / GPU rows: the Pallas
# kernels, not measured (no accelerator here).
AUTO = {("cpu", "short"): "xla", ("cpu", "long"): "xla",
        ("gpu", "short"): "pallas_gpu", ("gpu", "long"): "pallas_gpu",
        ("tpu", "short"): "pallas_tpu", ("tpu", "long"): "pallas_tpu"}


def delta_rule(q, k, v, beta, log_decay=None, *, initial_state=None, reset=None,
               chunk_size: int = 64, impl: str = "auto", interpret=False):
  """(Gated) delta rule ``S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T``,
  ``o_t = S_t^T q_t``.

  Args:
    q, k: ``[B, T, H, Dk]`` (k normally L2-normalised by the caller).
    v: ``[B, T, H, Dv]``.
    beta: ``[B, T, H]`` write strength (typically a sigmoid output; up to 2 is fine).
    log_decay: ``None`` (DeltaNet) or ``[B, T, H]`` (Gated DeltaNet): natural log of the
      per-step gate ``a_t`` (normally <= 0).
    initial_state: ``[B, H, Dk, Dv]`` or ``None`` (zeros).
    reset: ``[B, T]`` bool or ``None``; True at the first token of a document.
    chunk_size: chunk length of the chunked implementations; T need not divide it.
      Pallas implementations need a multiple of 16 (``pallas_gpu``: a power of two).
    impl: one of ``"auto", "reference", "xla", "pallas_tpu", "pallas_gpu"``.
    interpret: run a Pallas implementation in interpret mode (CPU); may be a
      ``pltpu.InterpretParams`` for ``"pallas_tpu"``.

  Returns:
    ``(o, final_state)``: ``o`` ``[B, T, H, Dv]`` in q's dtype; ``final_state``
    ``[B, H, Dk, Dv]`` float32 (pass it as ``initial_state`` to continue the sequence).
  """
  check_inputs(q, k, v, beta, log_decay, initial_state, reset)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")
  if impl == "auto":
    impl = auto_impl(AUTO, q.shape[1])
  if reset is not None:
    reset = reset.astype(bool)
  if impl == "reference":
    return delta_rule_reference(q, k, v, beta, log_decay, initial_state, reset)
  t = q.shape[1]
  if impl == "xla" or t < 16:
    # Shorter than a kernel chunk (decoding): one unpadded chunk of T tokens.
    return delta_rule_chunked(q, k, v, beta, log_decay, initial_state, reset,
                              max(1, min(int(chunk_size), t)))
  chunk_size = int(chunk_size)
  if chunk_size < 16 or chunk_size % 16:
    raise ValueError(f"impl={impl!r} needs chunk_size to be a positive multiple of 16; "
                     f"got {chunk_size}.")
  if impl == "pallas_gpu" and chunk_size & (chunk_size - 1):
    raise ValueError(f"impl='pallas_gpu' needs chunk_size to be a power of two (Triton "
                     f"tiles); got {chunk_size}.")
  cfg = KernelConfig(impl=impl, interpret=interpret_key(interpret),
                     cdt=jnp.dtype(q.dtype).name)
  B, T, H, Dk = q.shape
  Dv = v.shape[-1]
  c = prepare_chunks(q, k, v, beta, log_decay, reset, chunk_size)
  s0 = (jnp.zeros((B, H, Dk, Dv), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  seg = None if reset is None else c["seg"]
  o, sf = _pallas_delta(c["q"], c["k"], c["w"], c["u"], c["g"], s0, seg, cfg)
  return unchunk(o, T), sf


# ----------------------------------------------------------------------------------
# Pallas implementations: the kernel part and its custom VJP.
# ----------------------------------------------------------------------------------


def _backend(impl):
  if impl == "pallas_tpu":
    from kernels.delta_rule import pallas_tpu
    return pallas_tpu
  from kernels.delta_rule import pallas_gpu
  return pallas_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _pallas_delta(q, k, w, u, g, s0, seg, cfg):
  """Chunk-major prepared inputs (see ``reference.prepare_chunks``; ``g`` the per-token log
  decays) -> ``(o, S_final)``
  with ``o`` ``[B,H,N,C,Dv]`` in the compute dtype."""
  o, sf = _backend(cfg.impl).forward(q, k, w, u, g, seg, s0, compute_dtype=cfg.cdt,
                                     interpret=cfg.interpret)
  return o, sf


def _pallas_fwd(q, k, w, u, g, s0, seg, cfg):
  o, sf, h = _backend(cfg.impl).forward(q, k, w, u, g, seg, s0, want_states=True,
                                        compute_dtype=cfg.cdt, interpret=cfg.interpret)
  return (o, sf), (q, k, w, u, g, seg, h)


def _pallas_bwd(cfg, res, cts):
  q, k, w, u, g, seg, h = res
  do, dsf = cts
  f32 = jnp.float32
  do = do.astype(f32)
  # Sequential part: the state cotangent, chunks last to first (kernel).
  dh, ds0 = _backend(cfg.impl).backward(q, k, w, g, seg, do, dsf.astype(f32),
                                        compute_dtype=cfg.cdt, interpret=cfg.interpret)
  # Chunk-local part: VJP of the per-chunk map at the saved states, parallel over chunks.
  seg_ = jnp.zeros(g.shape[:1] + g.shape[2:], jnp.int32) if seg is None else seg
  _, vjp = jax.vjp(lambda q_, k_, w_, u_, g_: chunk_outputs(h, q_, k_, w_, u_, g_, seg_),
                   q, k, w, u, g)
  dq, dk, dw, du, dg = vjp((do, dh))
  return dq, dk, dw, du, dg, ds0, None


_pallas_delta.defvjp(_pallas_fwd, _pallas_bwd)
