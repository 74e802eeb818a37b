"""Block-sparse flash attention: query block i attends only to the key blocks listed for it.

    o_t = sum_s softmax_s(scale * q_t . k_s) v_s   over keys s in the listed blocks of
                                                   t's block (and s <= t, t - s < window)

The building block of landmark attention's top-k block retrieval (Mohtashami & Jaggi 2023)
and of sliding-window attention at O(T * window) cost (Beltagy et al. 2020). The sparsity
format is splash attention's (the Pallas TPU ``splash_attention`` kernel): per (batch row,
head, query block) a compact, ascending list of key blocks plus its length; the kernels
walk a grid over the list slots, shrunk to the longest list, and skip (without reloading)
the slots past a row's count. Softmax as in FlashAttention (Dao et al. 2022): running max
and sum in fp32, the log-sum-exp saved for the backward pass.

Public API::

    o = block_sparse_attention(q, k, v, block_indices, block_counts, *, block_size,
                               causal=True, scale=None, window=None, impl="auto",
                               interpret=False)
    block_indices, block_counts = causal_blocks(T, block_size)
    block_indices, block_counts = sliding_window_blocks(T, block_size, window)
    block_indices, block_counts = topk_blocks(scores, k, block_size, include_local=True)

Implementations (``impl``):
  * ``"reference"``: dense [T, T] attention under the token mask built from the lists; the
    ground truth, differentiated by autodiff.
  * ``"xla"``: gathers the listed K/V blocks (``[B, H, nq, max_blocks, bs, D]``, memory
    O(T * max_blocks * bs)), one softmax over them; ``jax.custom_vjp`` whose backward
    recomputes the probabilities from the saved log-sum-exp and scatter-adds dk, dv.
    ``auto``'s choice on CPU.
  * ``"pallas_tpu"``: Mosaic kernels with scalar-prefetched lists, grid
    (B, H, nq, max_blocks), m / l / acc in VMEM scratch across the last axis.
  * ``"pallas_gpu"``: Triton kernels, grid (B, H, nq), the row's blocks looped in-kernel.
  * ``"auto"``: the row of :data:`AUTO` for the backend and T's shape class
    (``kernels.common.shape_class``): ``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU, ``xla``
    on CPU (measured: ``python -m experiments.bench auto``), and ``xla`` for a block size
    the chosen kernel cannot tile.
  ``interpret=True`` runs a Pallas implementation on CPU (any truthy value is passed to
  ``pallas_call(interpret=...)``, e.g. ``pltpu.InterpretParams()`` for the TPU kernels).

Backward of the Pallas implementations: a dq kernel over the same lists, and a dk/dv kernel
over the *transposed* lists (for each key block, the query blocks that visit it), built in
the wrapper from the lists; its grid is (B, H, nk, Mt) with ``Mt`` the longest transposed
list when the lists are concrete (e.g. from the helpers), else ``nq`` (concrete lists also
shrink the forward grid to the longest row when ``max_blocks`` is larger). dk, dv are computed
per query head and summed over each key/value head's group (GQA).

Conventions: q ``[B, T, H, D]``; k, v ``[B, T, Hkv, D]`` with H a multiple of Hkv (query
head h uses key/value head ``h // (H / Hkv)``); T a multiple of ``block_size``;
``block_indices`` int ``[B, H, nq, max_blocks]`` and ``block_counts`` int ``[B, H, nq]``
(B and H may be 1 to broadcast); entries past a row's count are ignored; listed blocks
must be distinct. ``causal=True`` applies the token mask ``s <= t`` inside every visited
block (so it only matters on the diagonal block of causal lists); ``window`` (None = none)
applies ``t - s < window`` at token level, the convention of ``layers/attention.py``.
``scale`` defaults to ``1 / sqrt(D)``. A query that sees no key gets 0. Output in q's dtype;
all softmax math in fp32.
"""

from __future__ import annotations

import functools
import math

import jax

from kernels.common import IMPLS, PALLAS_IMPLS, KernelConfig, auto_impl, interpret_key
from kernels.block_sparse.reference import (block_sparse_reference, causal_blocks,
                                            check_inputs, concrete_bounds,
                                            gathered_backward, gathered_forward,
                                            normalize_lists, sliding_window_blocks,
                                            topk_blocks, transpose_lists)

__all__ = ["block_sparse_attention", "causal_blocks", "sliding_window_blocks",
           "topk_blocks", "IMPLS", "AUTO"]

# impl="auto": the implementation measured fastest (fwd+bwd), per backend and shape class
# (kernels.common.shape_class: "short" for T < LONG_FROM = 4096 tokens, else "long"). CPU
# rows: the winners of `python -m experiments.bench auto --out=results/bench_auto`
# (results/bench_auto.json; tests/kernels/test_auto.py checks they agree): xla, 2.5-5x faster
# than the dense masked reference at 1k tokens and 9-16x at 4k over four runs; at 16k the
# reference's [B,H,T,T] temporaries do not fit. TPU / GPU rows: the Pallas kernels, not
# measured (no accelerator here).
AUTO = {("cpu", "short"): "xla", ("cpu", "long"): "xla",
        ("gpu", "short"): "pallas_gpu", ("gpu", "long"): "pallas_gpu",
        ("tpu", "short"): "pallas_tpu", ("tpu", "long"): "pallas_tpu"}


def block_sparse_attention(q, k, v, block_indices, block_counts, *, block_size: int,
                           causal: bool = True, scale=None, window=None, impl: str = "auto",
                           interpret=False):
  """Attention of each query block to its listed key blocks only (flash-style).

  Args:
    q: ``[B, T, H, D]``.
    k, v: ``[B, T, Hkv, D]``, H a multiple of Hkv.
    block_indices: int ``[B, H, nq, max_blocks]``, ``nq = T / block_size``: for query block
      i, the key blocks it visits, ascending; entries past ``block_counts`` are padding.
    block_counts: int ``[B, H, nq]``: the length of each list (0: the block sees nothing,
      its output is 0).
    block_size: tokens per block (query and key blocks alike); must divide T. The Pallas
      implementations need a multiple of 16 (GPU: a power of two >= 16).
    causal: apply the token-level causal mask ``s <= t``.
    scale: softmax scale; default ``1 / sqrt(D)``.
    window: None, or the sliding window: key s is visible to query t only if
      ``t - s < window`` (use with :func:`sliding_window_blocks`).
    impl: one of ``"auto", "reference", "xla", "pallas_tpu", "pallas_gpu"``.
    interpret: run a Pallas implementation in interpret mode (CPU); may be a
      ``pltpu.InterpretParams`` for ``"pallas_tpu"``.

  Returns:
    ``o`` ``[B, T, H, D]`` in q's dtype.
  """
  check_inputs(q, k, v, block_indices, block_counts, block_size, window)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")
  block_size = int(block_size)
  if impl == "auto":
    impl = auto_impl(AUTO, q.shape[1])
    if impl in PALLAS_IMPLS and not _pallas_block_ok(impl, block_size):
      impl = "xla"  # a block size the kernels cannot tile
  window = None if window is None else int(window)
  causal = bool(causal)
  if impl == "reference":
    return block_sparse_reference(q, k, v, block_indices, block_counts,
                                  block_size=block_size, causal=causal, scale=scale,
                                  window=window)
  B, T, H, D = q.shape
  nk = T // block_size
  scale = (1.0 / math.sqrt(D)) if scale is None else float(scale)
  if impl in PALLAS_IMPLS:
    if not _pallas_block_ok(impl, block_size):
      need = "a power of two >= 16" if impl == "pallas_gpu" else "a multiple of 16"
      raise ValueError(f"impl={impl!r} needs block_size to be {need}; got {block_size}.")
  longest, max_visitors = concrete_bounds(block_indices, block_counts, B, H, nk)
  if longest is not None and longest < block_indices.shape[-1]:
    block_indices = block_indices[..., :longest]  # shrink the grid to the longest row
  idx, cnt = normalize_lists(block_indices, block_counts, B, H, nk)
  cfg = KernelConfig(impl=impl, bs=block_size, causal=causal, window=window, scale=scale,
                     interpret=interpret_key(interpret), max_visitors=max_visitors)
  return _attention(q, k, v, idx, cnt, cfg)


# ----------------------------------------------------------------------------------
# Dispatch to an implementation and the custom VJP shared by xla and the Pallas kernels.
# ----------------------------------------------------------------------------------


def _pallas_block_ok(impl, block_size):
  """TPU: a multiple of 16 (bf16 sublane tiles); GPU: a power of two >= 16 (``tl.dot``)."""
  if block_size % 16:
    return False
  return impl != "pallas_gpu" or block_size & (block_size - 1) == 0


def _backend(impl):
  if impl == "pallas_tpu":
    from kernels.block_sparse import pallas_tpu
    return pallas_tpu
  from kernels.block_sparse import pallas_gpu
  return pallas_gpu


def _static(cfg):
  return dict(bs=cfg.bs, causal=cfg.causal, window=cfg.window, scale=cfg.scale)


def _forward(q, k, v, idx, cnt, cfg):
  """``(o [B, T, H, D], lse [B, H, T] fp32)``."""
  if cfg.impl == "xla":
    o, lse = gathered_forward(q, k, v, idx, cnt, **_static(cfg))
    return o, lse.reshape(lse.shape[0], lse.shape[1], -1)
  return _backend(cfg.impl).forward(q, k, v, idx, cnt, interpret=cfg.interpret,
                                    **_static(cfg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, idx, cnt, cfg):
  return _forward(q, k, v, idx, cnt, cfg)[0]


def _attention_fwd(q, k, v, idx, cnt, cfg):
  o, lse = _forward(q, k, v, idx, cnt, cfg)
  return o, (q, k, v, o, lse, idx, cnt)


def _attention_bwd(cfg, res, do):
  q, k, v, o, lse, idx, cnt = res
  B, T, H, D = q.shape
  Hkv = k.shape[2]
  if cfg.impl == "xla":
    dq, dk, dv = gathered_backward(q, k, v, o, lse.reshape(B, H, T // cfg.bs, cfg.bs), do,
                                   idx, cnt, **_static(cfg))
    return dq, dk, dv, None, None
  idx_t, cnt_t = transpose_lists(idx, cnt, T // cfg.bs, cfg.max_visitors)
  dq, dk, dv = _backend(cfg.impl).backward(q, k, v, o, lse, do, idx, cnt, idx_t, cnt_t,
                                           interpret=cfg.interpret, **_static(cfg))
  # dk, dv come per query head [B, T, H, D] fp32: sum each key/value head's group.
  group = lambda x: x.reshape(B, T, Hkv, H // Hkv, D).sum(axis=3)
  return (dq.astype(q.dtype), group(dk).astype(k.dtype), group(dv).astype(v.dtype), None,
          None)


_attention.defvjp(_attention_fwd, _attention_bwd)
