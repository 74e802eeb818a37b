"""Chunked gated linear recurrence: linear attention, RetNet, Mamba2/SSD and GLA cores.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t        (S_t: [Dk, Dv])

Papers: Katharopoulos et al. 2020 ("Transformers are RNNs", no decay); Sun et al. 2023
(RetNet, one fixed decay per head); Dao & Gu 2024 (Mamba2 / SSD, one data-dependent decay
per head, "state passing" between chunks); Yang et al. 2023 (GLA, one decay per key channel,
chunkwise-parallel form with secondary chunking).

Public API::

    o, final_state = linear_recurrence(q, k, v, log_decay=None, *, initial_state=None,
                                       reset=None, chunk_size=64, impl="auto",
                                       interpret=False)

Implementations (``impl``):
  * ``"reference"``: per-token ``lax.scan``; the ground truth (slow, O(T) sequential steps).
  * ``"xla"``: chunked jnp form (:func:`reference.linear_recurrence_chunked`), fp32 compute,
    differentiated by ordinary autodiff; ``auto``'s choice on CPU.
  * ``"pallas_tpu"``: Mosaic TPU kernel, grid (B, H, chunks) with the state in VMEM scratch.
  * ``"pallas_gpu"``: Pallas Triton kernel, grid (B, H, Dv blocks), chunks looped in-kernel.
  * ``"auto"``: the row of :data:`AUTO` for the backend and T's shape class
    (``kernels.common.shape_class``): ``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU, ``xla``
    on CPU (measured: ``python -m experiments.bench auto``).
  ``interpret=True`` runs a Pallas implementation on CPU (any truthy value is passed to
  ``pallas_call(interpret=...)``, e.g. ``pltpu.InterpretParams()`` for the TPU kernel).

Backward of the Pallas implementations (``jax.custom_vjp``): dedicated kernels, not autodiff
of the forward. With ``R_t = dL/dS_t`` the adjoint state, ``R_t = D_{t+1} R_{t+1} + q_t do_t^T``
runs backwards in time and is itself a linear recurrence, so the same chunked kernels compute

  * ``dq_t = S_t do_t``: forward recurrence with (q, k, v) -> (do, v, k) and the decay on the
    *value* side of the kernel (per-channel decays act on the output here);
  * ``dv_t = R_t^T k_t``: time-reversed recurrence with (q, k, v) -> (k, q, do), decays
    shifted by one token, initial state ``dL/dS_final``;
  * ``dk_t = R_t v_t``: time-reversed recurrence with (q, k, v) -> (v, do, q), decay on the
    value side, initial state ``(dL/dS_final)^T``;
  * ``d initial_state = D_0 R_0`` (the final state of the dv pass, decayed once more);
  * ``d g``: with ``B_t`` the cumulative log decay, ``dL/dB_t = q_t*dq_t - k_t*dk_t`` (plus
    ``rowsum(dS_final * S_final)`` at the last token), reverse-cumsummed within each
    document (zero at reset tokens). Terms that carry no decay (a token with itself, and
    the last token's own ``k v^T`` in the final state) cancel analytically; they are left
    out (``strict`` passes, and a final state without the last token that the forward
    kernel returns), so strongly decaying gates keep accurate gradients instead of
    rounding noise.

Inputs: q, k ``[B,T,H,Dk]`` (or grouped ``[B,T,G,Dk]``, ``H % G == 0``); v ``[B,T,H,Dv]``;
``log_decay`` ``None``, ``[B,T,H]`` or ``[B,T,H,Dk]`` (natural-log decays, normally <= 0);
``initial_state`` ``[B,H,Dk,Dv]``;
``reset`` ``[B,T]`` bool, True where a document starts (the state is zeroed *before* that
token is added). No implicit scaling of q. Outputs: ``o`` ``[B,T,H,Dv]`` in q's dtype,
``final_state`` ``[B,H,Dk,Dv]`` float32. All accumulation is float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.common import (IMPLS, KernelConfig, auto_impl, interpret_key, pad_time,
                            suffix_sum)
from kernels.chunked_scan.reference import (check_inputs, expand_groups,
                                            linear_recurrence_chunked,
                                            linear_recurrence_reference)

__all__ = ["linear_recurrence", "IMPLS", "AUTO"]

# impl="auto": the implementation measured fastest (fwd+bwd), per backend and shape class
# (kernels.common.shape_class: "short" for T < LONG_FROM = 4096 tokens, else "long"). CPU
# rows: the winners of `python -m experiments.bench auto --out=results/bench_auto`
# (results/bench_auto.json; tests/kernels/test_auto.py checks they agree): xla, 1.1-3x
# faster than the per-token reference with per-channel decays (the slimmest margin: 1.1x at
# 1k in the committed run) and 2.9-9x with none or per-head ones, at 1k and 16k tokens
# (Mamba-2's reference does not fit at 16k); ranges over four runs on the shared 2-core
# machine. TPU / GPU rows: the Pallas kernels, not measured (no accelerator here).
AUTO = {("cpu", "short"): "xla", ("cpu", "long"): "xla",
        ("gpu", "short"): "pallas_gpu", ("gpu", "long"): "pallas_gpu",
        ("tpu", "short"): "pallas_tpu", ("tpu", "long"): "pallas_tpu"}


def linear_recurrence(q, k, v, log_decay=None, *, initial_state=None, reset=None,
                      chunk_size: int = 64, impl: str = "auto", interpret=False):
  """Gated linear recurrence ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``.

  Args:
    q, k: ``[B, T, H, Dk]``, or ``[B, T, G, Dk]`` with ``H % G == 0`` (grouped: head ``h``
      reads group ``h // (H // G)``, Mamba2's shared B/C groups or GQA). The ``xla`` form
      computes grouped ``q k^T`` once per group; the Pallas kernels read a group's q/k
      block for each of its heads (no repeated copy; the backward sums over the group);
      ``reference`` repeats q/k to ``H`` heads.
    v: ``[B, T, H, Dv]``.
    log_decay: ``None`` (no decay), ``[B, T, H]`` or ``[B, T, H, Dk]``; natural log of the
      per-step decay (normally <= 0). Arbitrarily negative values are fine.
    initial_state: ``[B, H, Dk, Dv]`` or ``None`` (zeros).
    reset: ``[B, T]`` bool or ``None``; True at the first token of a document.
    chunk_size: chunk length of the chunked implementations; T need not divide it.
      Pallas implementations need a multiple of 16 (per-channel decays use sub-chunks of 16).
    impl: one of ``"auto", "reference", "xla", "pallas_tpu", "pallas_gpu"``.
    interpret: run a Pallas implementation in interpret mode (CPU); may be a
      ``pltpu.InterpretParams`` for ``"pallas_tpu"``.

  Returns:
    ``(o, final_state)``: ``o`` ``[B, T, H, Dv]`` in q's dtype; ``final_state``
    ``[B, H, Dk, Dv]`` float32 (pass it as ``initial_state`` to continue the sequence).
  """
  check_inputs(q, k, v, log_decay, initial_state, reset)
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")
  if impl == "auto":
    impl = auto_impl(AUTO, q.shape[1])
  if reset is not None:
    reset = reset.astype(bool)
  if impl == "reference":
    return linear_recurrence_reference(q, k, v, log_decay, initial_state, reset)
  t = q.shape[1]
  if impl == "xla" or t < 16:
    # Shorter than a kernel chunk (decoding): the chunked form with one chunk of T tokens,
    # instead of padding a single token to a full chunk.
    return linear_recurrence_chunked(q, k, v, log_decay, initial_state, reset,
                                     max(1, min(int(chunk_size), t)))
  chunk_size = int(chunk_size)
  if chunk_size < 16 or chunk_size % 16:
    raise ValueError(f"impl={impl!r} needs chunk_size to be a positive multiple of 16; "
                     f"got {chunk_size}.")
  cfg = KernelConfig(impl=impl, chunk=chunk_size, interpret=interpret_key(interpret))
  return _pallas_recurrence(q, k, v, log_decay, initial_state, reset, cfg)


# ----------------------------------------------------------------------------------
# Pallas implementations: shared preparation and the custom VJP.
# ----------------------------------------------------------------------------------


def _backend(impl):
  if impl == "pallas_tpu":
    from kernels.chunked_scan import pallas_tpu
    return pallas_tpu
  from kernels.chunked_scan import pallas_gpu
  return pallas_gpu


def _run_kernel(cfg, q, k, v, g, s0, reset, *, decay_on="key", strict=False,
                out_dtype=None, want_excl=False):
  """Pad T (front) to a multiple of the chunk, build the within-chunk log-decay sums and
  reset counts, and call the backend kernel. Returns ``(o [B,T,H,Dv], S_final)``.

  The kernel gets the per-token log decays ``g``, their within-chunk inclusive prefix sums
  ``b`` (decay from the chunk start) and exclusive suffix sums ``r`` (decay to the chunk
  end), each a sum of exactly the gates in between; pair decays inside a chunk are
  segment sums of ``g`` built in the kernel (see ``kernels.common``)."""
  B, T = q.shape[:2]
  C = cfg.chunk
  N = -(-T // C)
  Tp = N * C
  q, k, v = (pad_time(x, Tp) for x in (q, k, v))
  decays = None
  if g is not None:
    g = pad_time(g.astype(jnp.float32), Tp)
    gc = g.reshape((B, N, C) + g.shape[2:])
    b = jnp.cumsum(gc, axis=2).reshape(g.shape)
    r = suffix_sum(gc, axis=2).reshape(g.shape)
    decays = (g, b, r)
  seg = None
  if reset is not None:
    rs = pad_time(reset.astype(jnp.int32), Tp).reshape(B, N, C)
    seg = jnp.cumsum(rs, axis=2).reshape(B, Tp)
  o, *states = _backend(cfg.impl).forward(
      q, k, v, decays, seg, s0, chunk=C, decay_on=decay_on, strict=strict,
      out_dtype=out_dtype or q.dtype, want_excl=want_excl, interpret=cfg.interpret)
  return (o[:, Tp - T:], *states)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _pallas_recurrence(q, k, v, g, s0, reset, cfg):
  return _run_kernel(cfg, q, k, v, g, s0, reset)


def _pallas_fwd(q, k, v, g, s0, reset, cfg):
  if g is None:
    o, sf = _run_kernel(cfg, q, k, v, g, s0, reset)
    sf_excl = None
  else:
    o, sf, sf_excl = _run_kernel(cfg, q, k, v, g, s0, reset, want_excl=True)
  return (o, sf), (q, k, v, g, s0, reset, sf_excl)


def _shift_reverse(x, fill):
  """Token t of the result is ``x[T - t]`` (``fill`` at t = 0): the per-step inputs of the
  time-reversed adjoint recurrence, whose step t applies the decay of original step t+1."""
  if x is None:
    return None
  pad = jnp.full_like(x[:, :1], fill)
  return jnp.flip(jnp.concatenate([x[:, 1:], pad], axis=1), axis=1)


def _pallas_bwd(cfg, res, cts):
  q, k, v, g, s0, reset, sf_excl = res
  do, dsf = cts
  f32 = jnp.float32
  B, T, G, Dk = q.shape
  H = v.shape[2]
  kind = "none" if g is None else ("scalar" if g.ndim == 3 else "channel")
  dsf = dsf.astype(f32)
  do_c = do.astype(q.dtype)
  flip = lambda x: jnp.flip(x, axis=1)
  g_rev = _shift_reverse(g, 0.0)
  r_rev = _shift_reverse(reset, False)
  # dq_t = S_t do_t  (strict: without the i = j term k_t (v_t . do_t)).
  s0_t = None if s0 is None else jnp.swapaxes(s0.astype(f32), -1, -2)
  dq_s, _ = _run_kernel(cfg, do_c, v.astype(q.dtype), k, g, s0_t, reset,
                        decay_on="value", strict=True, out_dtype=f32)
  # dv_t = R_t^T k_t (full); its final state is R_0.
  dv, r0 = _run_kernel(cfg, flip(k), flip(q), flip(do_c).astype(k.dtype), g_rev, dsf, r_rev,
                       decay_on="key", strict=False, out_dtype=f32)
  dv = flip(dv)
  # dk_t = R_t v_t  (strict: without the i = j term q_t (do_t . v_t)).
  dk_s, _ = _run_kernel(cfg, flip(v).astype(q.dtype), flip(do_c), flip(q), g_rev,
                        jnp.swapaxes(dsf, -1, -2), r_rev,
                        decay_on="value", strict=True, out_dtype=f32)
  dk_s = flip(dk_s)
  # The dq / dk kernels return one gradient per head [B,T,H,Dk]; grouped q/k sum them over
  # the heads of their group at the end.
  qf, kf = (expand_groups(x, H).astype(f32) for x in (q, k))
  vf, dof = v.astype(f32), do.astype(f32)
  vdo = jnp.sum(vf * dof, axis=-1, keepdims=True)  # [B,T,H,1]
  group_sum = lambda x: x if G == H else x.reshape(B, T, G, H // G, Dk).sum(axis=3)
  dq = group_sum(dq_s + kf * vdo)
  dk = group_sum(dk_s + qf * vdo)
  # initial state: d S0 = D_0 R_0 (zero where a document starts at token 0).
  ds0 = None
  if s0 is not None:
    d0 = r0
    if kind == "scalar":
      d0 = d0 * jnp.exp(g[:, 0].astype(f32))[:, :, None, None]
    elif kind == "channel":
      d0 = d0 * jnp.exp(g[:, 0].astype(f32))[..., None]
    if reset is not None:
      d0 = jnp.where(reset[:, 0][:, None, None, None], 0.0, d0)
    ds0 = d0.astype(s0.dtype)
  dg = None
  if kind != "none":
    # dL/dB_t = q_t dq_t - k_t dk_t (+ the final state's dependence at the last token).
    # At the last token, k_T dk_T (strict) is exactly the final state's own k_T v_T^T term,
    # which cancels analytically; use S_final without that term instead of subtracting.
    db = qf * dq_s - kf * dk_s  # [B,T,H,Dk]
    fin = jnp.sum(dsf * sf_excl, axis=-1)  # [B,H,Dk]
    db = db.at[:, -1].set(qf[:, -1] * dq_s[:, -1] + fin)
    if kind == "scalar":
      db = jnp.sum(db, axis=-1)
    dg = _segment_reverse_cumsum(db, reset)
    if reset is not None:
      rmask = reset.reshape(reset.shape + (1,) * (dg.ndim - 2))
      dg = jnp.where(rmask, 0.0, dg)
    dg = dg.astype(g.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, ds0, None)


def _segment_reverse_cumsum(x, reset):
  """``y_t = sum_{s >= t, same document} x_s`` along axis 1."""
  if reset is None:
    return jnp.flip(jnp.cumsum(jnp.flip(x, 1), axis=1), 1)
  # Reverse scan that restarts after each document's first token (reset marks starts).
  r = reset.reshape(reset.shape + (1,) * (x.ndim - 2))
  nxt_reset = jnp.concatenate([r[:, 1:], jnp.zeros_like(r[:, :1])], axis=1)

  def combine(a, b):  # elements (value, stop): y_t = x_t + (0 if stop_t else y_{t+1})
    va, sa = a
    vb, sb = b
    return jnp.where(sb, vb, va + vb), sa | sb

  xs = (jnp.flip(x, 1), jnp.flip(jnp.broadcast_to(nxt_reset, x.shape), 1))
  y, _ = jax.lax.associative_scan(combine, xs, axis=1)
  return jnp.flip(y, 1)


_pallas_recurrence.defvjp(_pallas_fwd, _pallas_bwd)
