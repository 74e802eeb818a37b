"""Pallas Mosaic-TPU kernel for the diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``.

The recurrence of S4D (Gu et al. 2022), the Mamba-1 selective scan (Gu & Dao 2023) and the
RG-LRU (De et al. 2024, Griffin; its reference Pallas scan keeps time on a leading axis in
the same way). Channels are flattened and laid out as ``[B, T, G, 128]`` (G = channels /
128), so one token of a channel block is a whole ``(rows, 128)`` vreg tile and indexing a
token is a dynamic index on an untiled leading axis (no sublane shuffles, any dtype).

Grid ``(B, G / rows, num_chunks)``: batch and channel blocks are ``"parallel"``, the chunk
axis is ``"arbitrary"`` (sequential) and the fp32 carry ``(rows, 128)`` lives in VMEM
scratch across it. Inside a chunk a ``fori_loop`` walks the C tokens with the carry in
registers, ``exp`` of the log decay on the EUP, the multiply-add on the VPU.

``reverse=True`` runs the *adjoint* recurrence used by the backward pass: chunks and tokens
are visited last to first and each step is ``y_t = b_t + c;  c = a_t * y_t`` (output
``y_t``), i.e. ``y_t = b_t + a_{t+1} y_{t+1}`` with ``c`` starting at the given initial
state; the returned final carry is ``a_0 y_0``. No flipped or shifted copies are made.

Only real dtypes (fp32 / bf16 inputs, fp32 carry); complex inputs use the ``"xla"`` path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import pad_last

F32 = jnp.float32
LANES = 128


def _kernel(*refs, C, reverse, has_h0, unroll):
  it = iter(refs)
  la_ref, b_ref = next(it), next(it)
  h0_ref = next(it) if has_h0 else None
  o_ref, hf_ref, carry_ref = next(it), next(it), next(it)
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _init():
    if has_h0:
      carry_ref[...] = h0_ref[...].astype(F32)
    else:
      carry_ref[...] = jnp.zeros(carry_ref.shape, F32)

  def step(i, c):
    t = C - 1 - i if reverse else i
    a = jnp.exp(la_ref[t].astype(F32))  # (rows, 128)
    x = b_ref[t].astype(F32)
    if reverse:
      y = x + c
      o_ref[t] = y.astype(o_ref.dtype)
      return a * y
    c = a * c + x
    o_ref[t] = c.astype(o_ref.dtype)
    return c

  c = lax.fori_loop(0, C, step, carry_ref[...], unroll=unroll)
  carry_ref[...] = c

  @pl.when(n == pl.num_programs(2) - 1)
  def _final():
    hf_ref[...] = c


def _rows(*dtypes):
  """Sublane rows of one native tile for the narrowest dtype (8 for 32-bit, 16 for bf16)."""
  return max(8 * (4 // jnp.dtype(d).itemsize) for d in dtypes)


def forward(la, b, h0, *, chunk, reverse=False, out_dtype=None, interpret=False,
            unroll=8):
  """Run the kernel on prepared inputs.

  Args:
    la: ``[B, Tp, F]`` log decays (real; ``-inf`` allowed: a reset), ``Tp % chunk == 0``.
    b: ``[B, Tp, F]`` inputs.
    h0: ``None`` or ``[B, F]`` initial carry.
    reverse: run the adjoint recurrence last token to first (see the module docstring).
    unroll: tokens per unrolled loop body on hardware (its gcd with the chunk; interpret
      mode uses 1).
  Returns:
    ``(out [B, Tp, F] out_dtype, final carry [B, F] fp32)``.
  """
  B, Tp, F = b.shape
  C = int(chunk)
  N = Tp // C
  out_dtype = out_dtype or b.dtype
  rows = _rows(la.dtype, b.dtype, out_dtype)
  G = -(-F // LANES)
  if G <= rows:
    DB, Gp = G, G  # a block spanning the whole axis is always a legal tile
  else:
    DB, Gp = rows, -(-G // rows) * rows
  Fp = Gp * LANES
  la, b = pad_last(la, Fp), pad_last(b, Fp)
  tiles = lambda x: x.reshape(B, Tp, Gp, LANES)
  sq = pl.squeezed
  chunk_idx = (lambda n: N - 1 - n) if reverse else (lambda n: n)
  tok_spec = pl.BlockSpec((sq, C, DB, LANES), lambda bi, d, n: (bi, chunk_idx(n), d, 0))
  state_spec = pl.BlockSpec((sq, DB, LANES), lambda bi, d, n: (bi, d, 0))
  in_specs = [tok_spec, tok_spec]
  args = [tiles(la), tiles(b)]
  has_h0 = h0 is not None
  if has_h0:
    in_specs.append(state_spec)
    args.append(pad_last(h0.astype(F32), Fp).reshape(B, Gp, LANES))
  kernel = functools.partial(_kernel, C=C, reverse=reverse, has_h0=has_h0,
                             unroll=1 if interpret else math.gcd(max(1, int(unroll)), C))
  o, hf = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((B, Tp, Gp, LANES), out_dtype),
                 jax.ShapeDtypeStruct((B, Gp, LANES), F32)),
      grid=(B, Gp // DB, N),
      in_specs=in_specs,
      out_specs=(tok_spec, state_spec),
      scratch_shapes=[pltpu.VMEM((DB, LANES), F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name=f"diag_scan{'_reverse' if reverse else ''}",
  )(*args)
  return o.reshape(B, Tp, Fp)[..., :F], hf.reshape(B, Fp)[:, :F]
