"""``python -m experiments.bench swa`` (or ``--what=swa``): block-sparse sliding-window
attention vs dense causal attention.

    python -m experiments.bench swa --repeats=5 --out=results/bench_swa

Forward + backward time (jitted ``jax.grad`` w.r.t. q, k, v, compiled and warmed up first,
the two cases interleaved) of ``block_sparse_attention`` over ``sliding_window_blocks``
(``--swa_window``, ``--swa_block_size``) vs dense causal attention (plain jnp, the same math
without the window) at ``--swa_seq_len`` (16k), B=1, H=4, D=64
(``--swa_batch/heads/head_dim``). When the dense form's [B,H,T,T] fp32 temporaries do not
fit in memory, it runs over blocks of queries (same O(T^2) work; said in the JSON's notes).
Writes JSON only (median ms, ratio, issue 6's 10x target with pass / fail).
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.bench import common
from kernels.block_sparse import block_sparse_attention, sliding_window_blocks

_SWA_T = flags.DEFINE_integer("swa_seq_len", 16384, "Sequence length T (swa).")
_SWA_B = flags.DEFINE_integer("swa_batch", 1, "Batch size B (swa).")
_SWA_H = flags.DEFINE_integer("swa_heads", 4, "Heads H (swa; q, k and v alike).")
_SWA_D = flags.DEFINE_integer("swa_head_dim", 64, "Head dim D (swa).")
_SWA_WINDOW = flags.DEFINE_integer("swa_window", 256, "Sliding window (swa).")
_SWA_BLOCK = flags.DEFINE_integer("swa_block_size", 64, "block_size of the kernel (swa).")
_SWA_IMPL = flags.DEFINE_string("swa_impl", "auto", "block_sparse_attention impl (swa).")
_SWA_DENSE_QB = flags.DEFINE_integer(
    "swa_dense_query_block", 0,
    "Dense baseline: queries per block (a divisor of T; T = unblocked); 0 = unblocked if its "
    "[B,H,T,T] fp32 temporaries fit in a quarter of the available memory, else blocked.")

# What the figures depend on (lcm.provenance).
CODE = ("kernels", "experiments/bench")

# The target (issue 6 item 4): block-sparse sliding-window attention fwd+bwd >= 10x
# faster than dense causal attention at T = 16k, on this CPU.
TARGET_T = 16384
TARGET_SPEEDUP = 10.0


def dense_causal_attention(q, k, v, *, query_block=None):
  """Plain causal softmax attention (fp32 softmax, scale 1/sqrt(D)), q/k/v [B, T, H, D].

  ``query_block=None`` (or T): one [B, H, T, T] score matrix, differentiated by autodiff.
  Otherwise ``lax.map`` over blocks of ``query_block`` queries, each against all T keys
  (the masked upper triangle is computed, as in the unblocked form: same O(T^2) work),
  under ``jax.checkpoint`` so the backward pass recomputes each block's probabilities
  instead of keeping all of them (memory O(query_block * T))."""
  b, t, h, d = q.shape
  scale = 1.0 / math.sqrt(d)
  k_pos = jnp.arange(t)

  def rows(qc, start):
    s = jnp.einsum("bqhd,bkhd->bhqk", qc, k, preferred_element_type=jnp.float32) * scale
    q_pos = start + jnp.arange(qc.shape[1])
    s = jnp.where(q_pos[:, None] >= k_pos[None, :], s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)

  if query_block is None or query_block >= t:
    return rows(q, 0)
  if t % query_block:
    raise ValueError(f"query_block={query_block} must divide T={t}.")
  n = t // query_block
  qs = q.reshape(b, n, query_block, h, d).swapaxes(0, 1)
  o = jax.lax.map(jax.checkpoint(lambda a: rows(*a)), (qs, jnp.arange(n) * query_block))
  return o.swapaxes(0, 1).reshape(b, t, h, d)


def dense_query_blocking(b, t, h, requested, available):
  """``(query_block or None, note)``: the dense baseline's blocking (see the flag)."""
  full = 4 * b * h * t * t * 4  # ~4 live [B,H,T,T] fp32 tensors in fwd+bwd (s, p, dp, ds)
  if requested:
    if requested >= t:
      return None, "unblocked (--swa_dense_query_block >= T)"
    return requested, f"query blocks of {requested} (--swa_dense_query_block)"
  if available is None or full <= available / 4:
    return None, (f"unblocked: ~{full / 2**30:.2f} GiB of [B,H,T,T] fp32 temporaries fit in "
                  f"a quarter of the available memory")
  qb = t
  while qb > 1 and (4 * b * h * qb * t * 4 > min(2**30, available / 4) or t % qb):
    qb //= 2
  return qb, (f"blocked: unblocked fwd+bwd needs ~{full / 2**30:.1f} GiB of [B,H,T,T] fp32 "
              f"temporaries (available: {available / 2**30:.1f} GiB), so the dense baseline "
              f"runs lax.map over blocks of {qb} queries (each against all T keys, "
              f"jax.checkpoint per block: probabilities recomputed in the backward pass); "
              f"the same O(T^2) math and FLOPs plus one recomputed forward")


def swa_benchmark(*, seq_len, batch, heads, head_dim, window, block_size, repeats,
                  impl="auto", dense_query_block=0, available_bytes=None):
  """Block-sparse sliding-window attention vs dense causal attention, fwd+bwd.

  Both: ``jax.jit(jax.grad(sum(attn(q, k, v) * w)))`` w.r.t. q, k, v (fp32, random inputs
  and a fixed random cotangent w), compiled and warmed up first, then ``repeats`` rounds with
  the two cases interleaved (order alternating per round); medians and their ratio."""
  b, t, h, d = batch, seq_len, heads, head_dim
  if available_bytes is None:
    available_bytes = common.available_bytes()
  qb, dense_note = dense_query_blocking(b, t, h, dense_query_block, available_bytes)
  idx, cnt = sliding_window_blocks(t, block_size, window)
  max_blocks = int(idx.shape[-1])

  def sparse(q, k, v):
    return block_sparse_attention(q, k, v, idx, cnt, block_size=block_size, causal=True,
                                  window=window, impl=impl)

  def dense(q, k, v):
    return dense_causal_attention(q, k, v, query_block=qb)

  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  shape = (b, t, h, d)
  qkv = tuple(jax.random.normal(k_, shape, jnp.float32) for k_ in ks[:3])
  w = jax.random.normal(ks[3], shape, jnp.float32)
  cases, info = {}, {}
  for name, f in (("block_sparse_swa", sparse), ("dense_causal", dense)):
    g = jax.jit(jax.grad(lambda qkv, w, f=f: jnp.sum(f(*qkv) * w)))
    t0 = time.perf_counter()
    compiled = g.lower(qkv, w).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grads = jax.block_until_ready(compiled(qkv, w))
    mem = compiled.memory_analysis()
    info[name] = {"compile_s": round(compile_s, 3),
                  "first_call_s": round(time.perf_counter() - t0, 3),
                  "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
                  "grads_finite": bool(all(jnp.all(jnp.isfinite(x)) for x in grads))}
    cases[name] = lambda compiled=compiled: jax.block_until_ready(compiled(qkv, w))
  times = common.time_interleaved(cases, repeats, untimed_first=False, alternate=True)
  for name, ts in times.items():
    info[name].update(common.summary(ts), all_ms=[round(x, 3) for x in ts])
  sparse_ms, dense_ms = info["block_sparse_swa"]["ms"], info["dense_causal"]["ms"]
  speedup = dense_ms / sparse_ms
  info["block_sparse_swa"].update(
      window=window, block_size=block_size, impl=impl, max_blocks_per_query_block=max_blocks,
      keys_scored_per_query=max_blocks * block_size)
  info["dense_causal"].update(query_block=qb, keys_scored_per_query=t, note=dense_note)
  tg = {"target": (f"block-sparse SWA fwd+bwd >= {TARGET_SPEEDUP:g}x faster than dense "
                   f"causal attention at T={TARGET_T}"),
        "value": speedup, "threshold": TARGET_SPEEDUP,
        "pass": bool(speedup >= TARGET_SPEEDUP) if t == TARGET_T else None}
  if t != TARGET_T:
    tg["note"] = f"not a target measurement: T={t}, the issue's is T={TARGET_T}"
  return {"cases": info, "speedup": speedup,
          "speedup_is": "dense_causal ms / block_sparse_swa ms (median of each)",
          "targets": [tg], "all_targets_pass": tg["pass"] is True}


def main():
  t = _SWA_T.value
  result = swa_benchmark(seq_len=t, batch=_SWA_B.value, heads=_SWA_H.value,
                         head_dim=_SWA_D.value, window=_SWA_WINDOW.value,
                         block_size=_SWA_BLOCK.value, repeats=common.REPEATS.value,
                         impl=_SWA_IMPL.value, dense_query_block=_SWA_DENSE_QB.value)
  report = {"what": "swa", "seq_len": t, "batch": _SWA_B.value, "heads": _SWA_H.value,
            "head_dim": _SWA_D.value, "window": _SWA_WINDOW.value,
            "block_size": _SWA_BLOCK.value, "dtype": "float32",
            "repeats": common.REPEATS.value,
            "timing": ("ms of jitted jax.grad(sum(attn(q, k, v) * w)) w.r.t. q, k, v "
                       "(fwd+bwd), compiled and warmed up first; median (and min) of "
                       "--repeats rounds, the two cases interleaved in one process"),
            "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "notes": [result["cases"]["dense_causal"]["note"]],
            "result": result}
  common.write_report(report, code=CODE)
