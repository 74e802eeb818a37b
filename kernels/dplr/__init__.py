"""Diagonal-plus-low-rank recurrence (the generalised delta rule): RWKV-7's core.

    S_t = (diag(exp(log_decay_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T,      o_t = S_t^T q_t

``S_t``: ``[Dk, Dv]``; a per-key-channel decay plus a rank-one term whose removal direction
``b`` may differ from both its write direction ``a`` and the written key ``k``.

Special cases (``*`` elementwise, ``beta`` ``[B,T,H]``, ``g`` the gate)::

  gated delta rule (kernels.delta_rule): S_t = e^g (I - beta k k^T) S_{t-1} + beta k v^T
      -> a = -beta e^g k,  b = k,  written key beta k,  log_decay = g broadcast over Dk
  RWKV-7 (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State Evolution"; the
  paper writes the state transposed, ``wkv_t = wkv_{t-1} (diag(w_t) - kappa_hat^T
  (a_t * kappa_hat)) + v^T k``, i.e. rows are values):
      -> a = -(iclr * kappa_hat),  b = kappa_hat,  k = the replacement key k~,
         log_decay = log w  (w = exp(-e^{-0.5} sigmoid(.)) in (0.545, 1))

Public API::

    o, final_state = dplr_recurrence(q, k, v, a, b, log_decay, *, initial_state=None,
                                     reset=None, chunk_size=64, impl="auto",
                                     interpret=False)

Implementations (``impl``):
  * ``"reference"``: per-token ``lax.scan`` (the ground truth).
  * ``"xla"``: chunked (:mod:`kernels.dplr.reference`). The state-free preparation
    (:func:`reference.prepare`: per-channel pair decays as segment sums, the UT transform
    ``(I - M)^{-1}`` of the rank-one removals) runs for groups of chunks at once
    (``lax.map`` with a batch, rematerialised in the backward); the state part
    (:func:`reference.apply`) is a ``lax.scan`` over chunks (:func:`reference.forward`).
    Its ``custom_vjp`` backward is its own chunked pass: a reverse scan carrying the state
    cotangent (:func:`reference.backward`), then the VJP of :func:`reference.apply` at the
    saved chunk states, parallel over chunks; gradients then flow through the preparation.
  * ``"pallas_tpu"`` / ``"pallas_gpu"``: the same, with the two scans as Pallas kernels.
  * ``"auto"``: the row of :data:`AUTO` for the backend and T's shape class (CPU: ``reference``
    below 4096 tokens, ``xla`` from there).
  ``interpret=True`` runs a Pallas implementation on CPU.

Inputs: q, k, a, b, log_decay ``[B,T,H,Dk]``; v ``[B,T,H,Dv]``; ``initial_state``
``[B,H,Dk,Dv]``; ``reset`` ``[B,T]`` bool (state zeroed before that token). No implicit
scaling or normalisation. ``log_decay`` is normally <= 0 (anything down to -60 per step,
and 0, are exact); positive values are allowed while ``exp`` of their sum over a chunk
stays finite (an overflow there is a NaN that masks cannot stop). Outputs: ``o``
``[B,T,H,Dv]`` in q's dtype, ``final_state`` ``[B,H,Dk,Dv]`` float32. All accumulation is
float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels.common import IMPLS, KernelConfig, auto_impl, interpret_key, scan_chunks, scan_resets, unscan_chunks
from kernels.dplr.reference import PREPARED, apply, check_inputs, dplr_reference, prepare

__all__ = ["dplr_recurrence", "IMPLS", "AUTO"]

# impl="auto": CPU rows measured by `python -m experiments.bench auto --auto_ops=dplr
# --out=results/bench_auto_dplr` (tests/kernels/test_auto.py checks they agree): at T=1024
# the per-token reference is 1.17x faster than xla, at T=16384 xla wins by 1.01x (a tie; the
# reference's backward also keeps every token's [Dk, Dv] state). On CPU the chunked form's
# cost is the element-wise [C, C, Dk] pair decays (docs/performance.md). TPU / GPU rows
# name the Pallas kernels, not measured (no accelerator here).
AUTO = {("cpu", "short"): "reference", ("cpu", "long"): "xla",
        ("gpu", "short"): "pallas_gpu", ("gpu", "long"): "pallas_gpu",
        ("tpu", "short"): "pallas_tpu", ("tpu", "long"): "pallas_tpu"}

_INPUTS = ("q", "k", "v", "a", "b", "g")


def dplr_recurrence(q, k, v, a, b, log_decay, *, initial_state=None, reset=None,
                    chunk_size: int = 64, impl: str = "auto", interpret=False):
  """``S_t = (diag(exp(log_decay_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``.

  Args:
    q, k, a, b, log_decay: ``[B, T, H, Dk]``.
    v: ``[B, T, H, Dv]``.
    initial_state: ``[B, H, Dk, Dv]`` or ``None`` (zeros).
    reset: ``[B, T]`` bool or ``None``; True at the first token of a document.
    chunk_size: chunk length of the chunked implementations (T need not divide it);
      Pallas implementations need a multiple of 16 (``pallas_gpu``: a power of two).
    impl: one of ``"auto", "reference", "xla", "pallas_tpu", "pallas_gpu"``.
    interpret: run a Pallas implementation in interpret mode (CPU).

  Returns:
    ``(o, final_state)``: ``o`` ``[B, T, H, Dv]`` in q's dtype; ``final_state``
    ``[B, H, Dk, Dv]`` float32.
  """
  check_inputs(q, k, v, a, b, log_decay, initial_state, reset)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")
  if impl == "auto":
    impl = auto_impl(AUTO, q.shape[1])
  if reset is not None:
    reset = reset.astype(bool)
  if impl == "reference":
    return dplr_reference(q, k, v, a, b, log_decay, initial_state, reset)
  B, T, H, Dk = q.shape
  Dv = v.shape[-1]
  chunk_size = int(chunk_size)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
  f32 = jnp.float32
  s0 = (jnp.zeros((B, H, Dk, Dv), f32) if initial_state is None
        else initial_state.astype(f32))
  if impl == "xla" or T < 16:
    # Shorter than a kernel chunk (decoding): one unpadded chunk of T tokens.
    C = max(1, min(chunk_size, T))
    cfg = KernelConfig(impl="xla", interpret=False, cdt="float32")
    c = prepare_all(q, k, v, a, b, log_decay, reset, C)
    o, sf = _chunked(*(c[n] for n in PREPARED), s0, cfg)
    return unscan_chunks(jnp.moveaxis(o, 2, 0), T).astype(q.dtype), sf
  if chunk_size % 16:
    raise ValueError(f"impl={impl!r} needs chunk_size to be a positive multiple of 16; "
                     f"got {chunk_size}.")
  if impl == "pallas_gpu" and chunk_size & (chunk_size - 1):
    raise ValueError(f"impl='pallas_gpu' needs chunk_size to be a power of two (Triton "
                     f"tiles); got {chunk_size}.")
  cfg = KernelConfig(impl=impl, interpret=interpret_key(interpret),
                     cdt=jnp.dtype(q.dtype).name)
  c = prepare_all(q, k, v, a, b, log_decay, reset, chunk_size)
  o, sf = _chunked(*(c[n] for n in PREPARED), s0, cfg)
  o = jnp.moveaxis(o, 2, 0)  # [N,B,H,C,Dv]
  return unscan_chunks(o, T).astype(q.dtype), sf


# ----------------------------------------------------------------------------------
# Chunked: preparation in XLA (groups of chunks), the state part in a scan (xla) or the
# Pallas kernels, with one custom VJP for both.
# ----------------------------------------------------------------------------------

# Chunks prepared together (lax.map's batch): the [C, C, Dk] decay tensors of this many
# chunks are alive at once, and the UT transform's row loop runs once per group.
PREPARE_GROUP = 32


def _seg(r):
  return jnp.cumsum(r, axis=-1)[:, None]  # [B,1,C]: one chunk


def prepare_all(q, k, v, a, b, log_decay, reset, chunk_size):
  """:func:`reference.prepare` of every chunk, :data:`PREPARE_GROUP` chunks at a time
  (``lax.map`` with a batch, each group rematerialised in the backward), returned
  chunk-major ``[B,H,N,C,...]`` (``decay`` ``[B,H,N,Dk]``). T is front-padded to a
  multiple of ``chunk_size`` with no-op tokens."""
  f32 = jnp.float32
  C = int(chunk_size)
  xs = {n: scan_chunks(x.astype(f32), C) for n, x in zip(_INPUTS, (q, k, v, a, b, log_decay))}
  B = q.shape[0]
  r = (jnp.zeros((xs["q"].shape[0], B, C), jnp.int32) if reset is None
       else scan_resets(reset, C))

  @jax.checkpoint
  def one(xr):
    x, r_ = xr
    c = prepare(*(x[n] for n in _INPUTS), _seg(r_))
    return {n: c[n][:, :, 0] for n in PREPARED}

  c = lax.map(one, (xs, r), batch_size=min(PREPARE_GROUP, xs["q"].shape[0]))  # [N,B,H,...]
  return {n: jnp.moveaxis(x, 0, 2) for n, x in c.items()}


def _backend(impl):
  if impl == "xla":
    from kernels.dplr import reference
    return reference
  if impl == "pallas_tpu":
    from kernels.dplr import pallas_tpu
    return pallas_tpu
  from kernels.dplr import pallas_gpu
  return pallas_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _chunked(q_in, w, u, p, o_v, a_out, k_out, v, decay, s0, cfg):
  """Prepared chunk-major inputs -> ``(o [B,H,N,C,Dv], S_final)``: the state part by
  ``cfg.impl``'s forward (``reference.forward``'s scan or a Pallas kernel)."""
  return _backend(cfg.impl).forward(q_in, w, u, p, o_v, a_out, k_out, v, decay, s0,
                                    compute_dtype=cfg.cdt, interpret=cfg.interpret)


def _chunked_fwd(q_in, w, u, p, o_v, a_out, k_out, v, decay, s0, cfg):
  o, sf, h = _backend(cfg.impl).forward(q_in, w, u, p, o_v, a_out, k_out, v, decay, s0,
                                        want_states=True, compute_dtype=cfg.cdt,
                                        interpret=cfg.interpret)
  return (o, sf), (q_in, w, u, p, o_v, a_out, k_out, v, decay, h)


def _chunked_bwd(cfg, res, cts):
  q_in, w, u, p, o_v, a_out, k_out, v, decay, h = res
  do, dsf = cts
  f32 = jnp.float32
  do = do.astype(f32)
  # Sequential part: the state cotangent, chunks last to first (kernel).
  dh, ds0 = _backend(cfg.impl).backward(q_in, w, p, a_out, decay, do, dsf.astype(f32),
                                        compute_dtype=cfg.cdt, interpret=cfg.interpret)
  # Chunk-local part: VJP of the state part at the saved states, parallel over chunks.
  _, vjp = jax.vjp(lambda *xs: apply(h, *xs), q_in, w, u, p, o_v, a_out, k_out, v, decay)
  return vjp((do, dh)) + (ds0,)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
