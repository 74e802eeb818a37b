"""Titans neural memory: a memory MLP trained online by gradient descent with momentum and
forgetting, one memory per batch row and head.

Paper: Behrouz, Zhong & Mirrokni 2025, "Titans: Learning to Memorize at Test Time"
(Sec. 3.1: the update; Sec. 3.2: its chunk-parallel training).

The memory network (:class:`MemoryMLP`, see :mod:`kernels.neural_memory.mlp`) is an MLP
``M(W, x)`` whose weights ``W = (W^1, ..., W^L)`` are the recurrent state. Per token t, with
key k_t, value v_t, query q_t and the data-dependent gates ``theta_t`` (inner learning rate),
``eta_t`` (momentum, "past surprise" decay) and ``alpha_t`` (forgetting / weight decay)::

    l(W; k_t, v_t) = ||M(W, k_t) - v_t||_2^2 / Dh          associative loss
    S_t = eta_t S_{t-1} - theta_t grad_W l(W'_t; k_t, v_t)  surprise with momentum
    M_t = (1 - alpha_t) M_{t-1} + S_t                       forgetting, update
    o_t = M(M_t, q_t)                                       retrieval with the new memory

(the paper writes the plain squared norm: the same up to the constant 1/Dh in theta). With
``max_grad_norm`` tau every token's whole gradient is clipped to norm <= tau.

Chunked ("mini-batch") gradient: the gradient point ``W'_t`` is the memory at the start of
token t's chunk, ``W'_t = M_{c(t) - 1}``, with chunk boundaries at document positions that are
multiples of ``chunk_size`` C (the paper's Sec. 3.2 and its reference code: all gradients of a
chunk are taken w.r.t. the weights at the chunk start). C = 1 is the exact sequential rule
(``W'_t = M_{t-1}``). A document start resets the memory to the learned initial weights and
the momentum to 0, and restarts the chunk grid. The state ``(w0, m, s)`` holds exactly what
this needs -- ``w0`` (W' of the current chunk), ``m`` (M_t), ``s`` (S_t) -- so with the
position in the document (``doc_pos``) any split of a sequence into calls gives the same
result. All memory math is float32 (``eta`` and ``1 - alpha`` enter as logs; products of
gates are exponentials of sums of log gates).

Public API::

    o, (w0, m, s)[, chunk_states][, memories] = memory_recurrence(
        mlp, init_weights, q, k, v, log_keep, log_eta, theta, *, chunk_size, state=None,
        doc_pos=None, return_chunk_states=False, memory_at=None, impl="auto")

Implementations (``impl``):
  * ``"reference"``: per-token ``lax.scan`` with materialised weights and ``jax.grad``
    gradients (:mod:`kernels.neural_memory.reference`); the ground truth.
  * ``"xla"``: the chunk-parallel form (:mod:`kernels.neural_memory.xla`): per chunk, the
    momentum and memory recurrences in closed form and the retrieval as attention-like
    matmuls over the chunk's gradient factors, no per-token weights; a ``lax.scan`` over
    chunks, differentiated by ordinary autodiff.
  * ``"auto"``: ``"xla"`` (there is no Pallas kernel).

Shapes: q, k, v ``[B, T, H, Dh]``; log_keep, log_eta, theta ``[B, T, H]``; weights tuples over
layers of ``[H, d_in, d_out]`` (init) or ``[B, H, d_in, d_out]`` (state); ``o``
``[B, T, H, Dh]`` float32.
"""

from __future__ import annotations

import numbers

from kernels.neural_memory.mlp import ACTIVATIONS, MemoryMLP, Weights
from kernels.neural_memory.reference import memory_recurrence_reference
from kernels.neural_memory.xla import memory_recurrence_chunked

__all__ = ["ACTIVATIONS", "IMPLS", "MemoryMLP", "Weights", "memory_recurrence"]

IMPLS = ("auto", "reference", "xla")


def memory_recurrence(mlp: MemoryMLP, init_weights: Weights, q, k, v, log_keep, log_eta,
                      theta, *, chunk_size: int, state=None, doc_pos=None,
                      return_chunk_states: bool = False, memory_at=None, impl: str = "auto"):
  """The Titans memory recurrence (module docstring).

  Args:
    mlp: the memory network.
    init_weights: learned initial weights, tuple of ``[H, d_in, d_out]``; every document
      (and ``state=None``) starts from them with zero momentum.
    q, k, v: ``[B, T, H, Dh]`` (any float dtype; computed in float32).
    log_keep: ``[B, T, H]``, ``log(1 - alpha_t)`` (<= 0); log_eta: ``[B, T, H]``,
      ``log eta_t`` (<= 0); theta: ``[B, T, H]``, the inner learning rate (>= 0).
    chunk_size: C, the gradient-sharing chunk (grid at document positions multiple of C).
    state: ``(w0, m, s)``, tuples of ``[B, H, d_in, d_out]`` (gradient point of the current
      chunk, memory, momentum) or None (the initial weights, zero momentum).
    doc_pos: ``[B, T]`` int, position of each token in its document (0 = document start),
      e.g. ``segment_positions(segment_ids)`` or ``pos + arange(T)`` when continuing.
      ``None``: one document whose chunk grid starts at token 0 (a fresh sequence, or a
      state taken at a chunk boundary); the single-pass fast path of ``"xla"``.
    return_chunk_states: also return the ``(w0, m, s)`` state after each physical chunk,
      stacked on a leading axis (physical chunks are C tokens, or T when T < C with
      ``doc_pos`` given; the last one is taken at the last real token).
    memory_at: optional ``[B, T]`` bool marking tokens whose memory ``M_t`` (the weights
      right after token t's update) is wanted, at most one marked token per row in each
      physical chunk (e.g. segment ends every L >= C tokens: memory caching). Then the
      memory at each physical chunk's marked token is returned too, a tuple over layers of
      ``[n, B, H, d_in, d_out]`` (a row with no mark in a chunk gets a meaningless value:
      mask it).
    impl: ``"auto"`` (= ``"xla"``), ``"xla"`` or ``"reference"``.

  Returns:
    ``o`` ``[B, T, H, Dh]`` float32 (``o_t = M(M_t, q_t)``), the final ``(w0, m, s)`` and,
    with ``return_chunk_states``, the per-chunk states, then with ``memory_at`` the marked
    memories.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")
  _check_inputs(mlp, init_weights, q, k, v, log_keep, log_eta, theta, chunk_size)
  fn = memory_recurrence_reference if impl == "reference" else memory_recurrence_chunked
  return fn(mlp, init_weights, q, k, v, log_keep, log_eta, theta, chunk_size=chunk_size,
            state=state, doc_pos=doc_pos, return_chunk_states=return_chunk_states,
            memory_at=memory_at)


def _check_inputs(mlp, init_weights, q, k, v, log_keep, log_eta, theta, chunk_size):
  """Raise a ValueError naming the argument whose shape (or chunk size) is wrong."""
  if q.ndim != 4 or q.shape[-1] != mlp.dim:
    raise ValueError(f"q must be [B, T, H, {mlp.dim}]; got {q.shape}.")
  for name, x in (("k", k), ("v", v)):
    if x.shape != q.shape:
      raise ValueError(f"{name} must have q's shape {q.shape}; got {x.shape}.")
  for name, x in (("log_keep", log_keep), ("log_eta", log_eta), ("theta", theta)):
    if x.shape != q.shape[:3]:
      raise ValueError(f"{name} must be [B, T, H] = {q.shape[:3]}; got {x.shape}.")
  want = tuple((q.shape[2], i, o) for i, o in mlp.shapes())
  got = tuple(tuple(w.shape) for w in init_weights)
  if got != want:
    raise ValueError(f"init_weights must have shapes {want}; got {got}.")
  integral = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
  if not integral or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}.")
