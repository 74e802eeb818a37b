"""Pallas Triton (GPU) kernel for the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``.

The recurrence of S4D (Gu et al. 2022), the Mamba-1 selective scan (Gu & Dao 2023) and the
RG-LRU (De et al. 2024, Griffin). GPU grid programs run in parallel, so unlike the TPU
kernel the time loop is *inside* the program: grid ``(B, F / BD)`` over batch rows and
blocks of BD flattened channels, and each program walks the whole sequence with
``lax.fori_loop``, one token per step, carrying its fp32 ``(BD,)`` slice of the state in
registers (channels are independent, so they split across programs freely; blocks are small,
32 channels and one warp by default, to give the GPU enough programs). Each step
loads one contiguous row of BD channels (coalesced), applies ``exp`` to the log decay and
a multiply-add, and stores the row (the loads do not depend on the carry, only the
multiply-add chain is sequential).

Triton constraints respected here: every loaded tile is a power of two (BD; the channel
axis is zero-padded to a multiple of BD), no value slicing (rows are read from refs), no
TPU compiler params. The time axis is not padded (rows are addressed one at a time).

``reverse=True`` is the adjoint recurrence of the backward pass, exactly as in
``pallas_tpu.py``: tokens last to first, ``y_t = b_t + c;  c = a_t * y_t``; the final
carry is ``a_0 y_0``. Only real dtypes (fp32 / bf16 inputs, fp32 carry).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.common import pad_last, pow2

F32 = jnp.float32


def _kernel(*refs, T, reverse, has_h0):
  it = iter(refs)
  la_ref, b_ref = next(it), next(it)
  h0_ref = next(it) if has_h0 else None
  o_ref, hf_ref = next(it), next(it)
  BD = b_ref.shape[-1]

  def step(i, c):
    t = T - 1 - i if reverse else i
    a = jnp.exp(la_ref[t, :].astype(F32))  # (BD,)
    x = b_ref[t, :].astype(F32)
    if reverse:
      y = x + c
      o_ref[t, :] = y.astype(o_ref.dtype)
      return a * y
    c = a * c + x
    o_ref[t, :] = c.astype(o_ref.dtype)
    return c

  c = h0_ref[...].astype(F32) if has_h0 else jnp.zeros((BD,), F32)
  hf_ref[...] = lax.fori_loop(0, T, step, c)


def forward(la, b, h0, *, chunk=None, reverse=False, out_dtype=None, interpret=False,
            block_d=32, num_warps=1):
  """Run the kernel on prepared inputs (same contract as ``pallas_tpu.forward``; ``chunk``
  is accepted for a uniform call and unused: the time loop is per token).

  The only parallelism is over batch rows and channels, so blocks are small: by default
  one warp per 32 channels (a single 128-byte row load per token), which gives
  B * F / 32 programs (64 for B=1, F=2048; 512 for Mamba's D=1024, N=16).
  """
  del chunk
  B, T, F = b.shape
  out_dtype = out_dtype or b.dtype
  BD = min(pow2(F), pow2(block_d))
  Fp = -(-F // BD) * BD
  la, b = pad_last(la, Fp), pad_last(b, Fp)
  sq = pl.squeezed
  tok_spec = pl.BlockSpec((sq, T, BD), lambda bi, d: (bi, 0, d))
  state_spec = pl.BlockSpec((sq, BD), lambda bi, d: (bi, d))
  in_specs = [tok_spec, tok_spec]
  args = [la, b]
  has_h0 = h0 is not None
  if has_h0:
    in_specs.append(state_spec)
    args.append(pad_last(h0.astype(F32), Fp))
  kernel = functools.partial(_kernel, T=T, reverse=reverse, has_h0=has_h0)
  o, hf = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, T, Fp), out_dtype),
                 jax.ShapeDtypeStruct((B, Fp), F32)),
      grid=(B, Fp // BD),
      in_specs=in_specs,
      out_specs=(tok_spec, state_spec),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=f"diag_scan{'_reverse' if reverse else ''}",
  )(*args)
  return o[..., :F], hf[:, :F]
