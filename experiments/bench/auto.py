"""``python -m experiments.bench auto`` (or ``--what=auto``): which implementation
``impl="auto"`` should pick, per kernel, backend and shape class.

    python -m experiments.bench auto --out=results/bench_auto

For every kernel op -- ``chunked_scan.linear_recurrence`` (no decay, per-head and
per-channel decays, and Mamba-2's grouped shape), ``delta_rule.delta_rule`` (Gated
DeltaNet), ``diag_scan.diagonal_recurrence`` (real: RG-LRU-like ``[B, T, 256]`` channels and
Mamba-1's ``[B, T, d_inner=512, d_state 16 / 64]``; complex: S4D's ``[B, T, H, N/2]``) and
``block_sparse.block_sparse_attention`` (sliding window 256, blocks of 64) -- at one length
of each shape class of ``kernels.common.shape_class`` (``--auto_short_len`` 1024 and
``--auto_long_len`` 16384; block_sparse also at 4096, where its dense reference still fits),
time forward + backward (jitted ``jax.grad`` of ``sum(real(out) * w)`` over every output
w.r.t. every float input, compiled and warmed up first) of every implementation runnable on
this backend: on CPU ``reference`` and ``xla`` (Pallas in interpret mode is a correctness
tool, not a candidate); on TPU / GPU also the backend's Pallas kernel. The candidates of one
case are interleaved (order alternating per round) over ``--repeats`` rounds (3 unless
given: the ratios decided on are 1.3x and more); ms is the median. About 5 minutes on 2
shared cores.

A class's winner is the implementation with the lowest geometric mean of ms over the
class's cases, among those that ran in all of them (one skipped for memory or time --
``--auto_max_temp_gib``, ``--max_call_seconds`` -- cannot win the class). The JSON (with
provenance and the load average: the machine is shared, so only same-case ratios mean
anything) has every case's ms and ratio and ``winners[kernel][backend][class]``, the rows
of each kernel's ``AUTO`` table (``tests/kernels/test_auto.py`` checks that they agree).
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.bench import common
from kernels import block_sparse, chunked_scan, delta_rule, diag_scan, dplr
from kernels.common import LONG_FROM, PALLAS_IMPLS, platform, shape_class

_OPS = flags.DEFINE_list("auto_ops", ["chunked_scan", "delta_rule", "diag_scan",
                                      "block_sparse"],
                         "Kernels to time (auto); dplr's rows are measured by its own run, "
                         "--auto_ops=dplr --out=results/bench_auto_dplr.")
_SHORT = flags.DEFINE_integer("auto_short_len", 1024, "T of the short cases (auto).")
_LONG = flags.DEFINE_integer("auto_long_len", 16384, "T of the long cases (auto).")
_MAX_TEMP = flags.DEFINE_float("auto_max_temp_gib", 4.0,
                               "Skip a candidate whose compiled temporaries exceed this.")

# Rounds per case unless --repeats is given.
DEFAULT_REPEATS = 3

# What the figures depend on (lcm.provenance).
CODE = ("kernels", "experiments/bench")

KERNELS = {"chunked_scan": chunked_scan, "delta_rule": delta_rule, "diag_scan": diag_scan,
           "dplr": dplr,
           "block_sparse": block_sparse}


def candidates(backend: str) -> tuple[str, ...]:
  """The implementations timed on ``backend`` (``kernels.common.platform`` names)."""
  pallas = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(backend)
  return ("reference", "xla") + ((pallas,) if pallas in PALLAS_IMPLS else ())


def cases(kernel: str, short: int, long: int):
  """``[(name, T, build)]`` of a kernel: ``build(key, impl) -> (f, args)`` with ``f(*args)``
  the op's outputs (a tuple) and ``args`` the float inputs it is differentiated by."""
  out = []
  nrm = lambda k, s, dt=jnp.float32: jax.random.normal(k, s, dt)

  if kernel == "chunked_scan":
    def lr(t, decay, h=4, g=4, dk=64, dv=64, chunk=64):
      def build(key, impl):
        ks = jax.random.split(key, 4)
        args = [nrm(ks[0], (1, t, g, dk)) / math.sqrt(dk), nrm(ks[1], (1, t, g, dk)) /
                math.sqrt(dk), nrm(ks[2], (1, t, h, dv))]
        if decay != "none":
          args.append(jax.nn.log_sigmoid(nrm(ks[3], (1, t, h) + ((dk,) if decay == "channel"
                                                                  else ())) + 4.0))
        f = lambda *a: chunked_scan.linear_recurrence(*a, chunk_size=chunk, impl=impl)
        return f, tuple(args)
      return build
    for t in (short, long):
      for decay in ("none", "head", "channel"):
        out.append((f"decay={decay}, q/k/v [1,{t},4,64], chunk 64", t, lr(t, decay)))
      out.append((f"mamba2: q/k [1,{t},1,64] (one group), v [1,{t},8,64], per-head decay, "
                  f"chunk 256", t, lr(t, "head", h=8, g=1, chunk=256)))

  elif kernel == "delta_rule":
    def dr(t, h=4, d=64, chunk=64):
      def build(key, impl):
        ks = jax.random.split(key, 5)
        unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        args = (unit(nrm(ks[0], (1, t, h, d))), unit(nrm(ks[1], (1, t, h, d))),
                nrm(ks[2], (1, t, h, d)), jax.nn.sigmoid(nrm(ks[3], (1, t, h))),
                jax.nn.log_sigmoid(nrm(ks[4], (1, t, h)) + 4.0))
        return (lambda *a: delta_rule.delta_rule(*a, chunk_size=chunk, impl=impl)), args
      return build
    for t in (short, long):
      out.append((f"gated: q/k (unit)/v [1,{t},4,64], beta/log_decay [1,{t},4], chunk 64", t,
                  dr(t)))

  elif kernel == "dplr":
    def dp(t, h=4, d=64, chunk=16):
      def build(key, impl):
        ks = jax.random.split(key, 6)
        kappa = nrm(ks[0], (1, t, h, d))
        kappa = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
        args = (nrm(ks[1], (1, t, h, d)) / 8.0, nrm(ks[2], (1, t, h, d)) / 8.0,
                nrm(ks[3], (1, t, h, d)), -jax.nn.sigmoid(nrm(ks[4], (1, t, h, d))) * kappa,
                kappa, -jnp.exp(-0.5) * jax.nn.sigmoid(nrm(ks[5], (1, t, h, d))))
        return (lambda *a: dplr.dplr_recurrence(*a, chunk_size=chunk, impl=impl)), args
      return build
    for t in (short, long):
      out.append((f"RWKV-7-like: q/k/v/a/b/log_decay [1,{t},4,64], chunk 16", t, dp(t)))

  elif kernel == "diag_scan":
    def ds(t, chan, complex_=False):
      def build(key, impl):
        ks = jax.random.split(key, 3)
        shape = (1, t) + chan
        la = jax.nn.log_sigmoid(nrm(ks[0], shape) + 4.0)
        b = nrm(ks[1], shape)
        if complex_:  # S4D: complex decays (|a| < 1, rotating) and inputs
          la = la + 1j * 0.1 * nrm(ks[2], shape)
          b = b + 1j * nrm(ks[2], shape)
        return (lambda *a: diag_scan.diagonal_recurrence(*a, impl=impl)), (la, b)
      return build
    for t in (short, long):
      out.append((f"real [1,{t},256] (RG-LRU width 256)", t, ds(t, (256,))))
      out.append((f"real [1,{t},512,16] (Mamba-1 d_inner 512, d_state 16)", t,
                  ds(t, (512, 16))))
      if t < LONG_FROM:  # [1, 16k, 512, 64] is 2 GiB per array
        out.append((f"real [1,{t},512,64] (Mamba-1 d_inner 512, d_state 64)", t,
                    ds(t, (512, 64))))
      h = 64 if t < LONG_FROM else 16  # [1, 16k, 64, 32] complex: 10 s per round
      out.append((f"complex [1,{t},{h},32] (S4D H {h}, N/2 32)", t, ds(t, (h, 32), True)))

  elif kernel == "block_sparse":
    def bs(t, h=4, d=64, window=256, block=64):
      def build(key, impl):
        idx, cnt = block_sparse.sliding_window_blocks(t, block, window)
        ks = jax.random.split(key, 3)
        args = tuple(nrm(k_, (1, t, h, d)) for k_ in ks)
        f = lambda *a: (block_sparse.block_sparse_attention(
            *a, idx, cnt, block_size=block, causal=True, window=window, impl=impl),)
        return f, args
      return build
    lengths = (short, LONG_FROM, long) if short < LONG_FROM < long else (short, long)
    for t in lengths:
      out.append((f"sliding window 256, blocks of 64, q/k/v [1,{t},4,64]", t, bs(t)))
  else:
    raise ValueError(f"unknown kernel {kernel!r}; one of {sorted(KERNELS)}")
  return out


def fwd_bwd(f):
  """Jitted ``grad`` of ``sum(real(out_i) * w_i)`` over the outputs w.r.t. every input."""
  def loss(args, ws):
    outs = jax.tree.leaves(f(*args))
    return sum(jnp.sum(jnp.real(o).astype(jnp.float32) * w) for o, w in zip(outs, ws))
  return jax.jit(jax.grad(loss))


def time_case(build, impls, *, repeats, max_call_seconds, max_temp_bytes, seed=0):
  """``{impl: {"ms", "min_ms", "runs", "compile_s", "temp_bytes"} or {"skipped": why}}`` of
  one case, the runnable candidates interleaved."""
  key = jax.random.PRNGKey(seed)
  info, runs = {}, {}
  for impl in impls:
    try:
      f, args = build(key, impl)
      shapes = jax.eval_shape(f, *args)
      ws = [jax.random.normal(k_, s.shape, jnp.float32) for k_, s in
            zip(jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(shapes))),
                jax.tree.leaves(shapes))]
      t0 = time.perf_counter()
      compiled = fwd_bwd(f).lower(args, ws).compile()
      p = {"compile_s": round(time.perf_counter() - t0, 3)}
      mem = compiled.memory_analysis()
      if mem is not None:
        p["temp_bytes"] = int(mem.temp_size_in_bytes)
        if mem.temp_size_in_bytes > max_temp_bytes:
          info[impl] = {**p, "skipped": (
              f"compiled temporaries {mem.temp_size_in_bytes / 2**30:.1f} GiB > "
              f"--auto_max_temp_gib={max_temp_bytes / 2**30:g}")}
          continue
      run = lambda compiled=compiled, args=args, ws=ws: jax.block_until_ready(
          compiled(args, ws))
      t0 = time.perf_counter()
      run()
      first_s = time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory)
      info[impl] = {"skipped": f"failed: {type(e).__name__}: {str(e)[:200]}"}
      continue
    if first_s > max_call_seconds:
      info[impl] = {**p, "skipped": (f"the warm-up call took {first_s:.1f} s > "
                                     f"--max_call_seconds={max_call_seconds:g}")}
      continue
    info[impl], runs[impl] = p, run
  for impl, ts in common.time_interleaved(runs, repeats, untimed_first=False,
                                          alternate=True).items():
    info[impl].update(common.summary(ts))
  return info


def class_winners(rows, impls):
  """``{class: {"winner", "geomean_ms", "eligible", ...}}`` from a kernel's case rows: the
  lowest geometric mean of ms among the candidates timed in every case of the class."""
  out = {}
  for cls in ("short", "long"):
    mine = [r for r in rows if r["class"] == cls]
    if not mine:
      continue
    timed = [i for i in impls if all("ms" in r["impls"].get(i, {}) for r in mine)]
    geo = {i: float(np.exp(np.mean([np.log(r["impls"][i]["ms"]) for r in mine])))
           for i in timed}
    winner = min(geo, key=geo.get) if geo else None
    per_case = [r["winner"] for r in mine]
    out[cls] = {"winner": winner, "geomean_ms": geo, "cases": len(mine),
                "eligible": timed, "per_case_winners": per_case,
                "unanimous": len(set(per_case)) == 1}
    if winner is not None and len(geo) > 1:
      out[cls]["geomean_ratio_vs_winner"] = {i: g / geo[winner] for i, g in geo.items()}
  return out


def auto_benchmark(kernels, *, short, long, repeats, max_call_seconds, max_temp_bytes,
                   backend=None):
  """``{"kernels": {kernel: {"cases": [...], "classes": {...}}}, "winners": {kernel:
  {backend: {class: impl}}}}`` (see the module docstring)."""
  backend = backend or platform()
  impls = candidates(backend)
  result, winners = {}, {}
  for kernel in kernels:
    rows = []
    for name, t, build in cases(kernel, short, long):
      info = time_case(build, impls, repeats=repeats, max_call_seconds=max_call_seconds,
                       max_temp_bytes=max_temp_bytes)
      timed = {i: p["ms"] for i, p in info.items() if "ms" in p}
      winner = min(timed, key=timed.get) if timed else None
      row = {"case": name, "T": t, "class": shape_class(t), "impls": info, "winner": winner}
      print(f"auto: {kernel}: {name}: " + ", ".join(
          f"{i} {p['ms']:.1f} ms" if "ms" in p else f"{i} skipped" for i, p in info.items()),
            file=sys.stderr, flush=True)
      if winner is not None:
        row["ms_ratio_vs_winner"] = {i: ms / timed[winner] for i, ms in timed.items()}
      rows.append(row)
    classes = class_winners(rows, impls)
    result[kernel] = {"candidates": list(impls), "cases": rows, "classes": classes}
    winners[kernel] = {backend: {c: v["winner"] for c, v in classes.items()}}
  return {"kernels": result, "winners": winners}


def main():
  load_start = list(os.getloadavg())
  repeats = common.REPEATS.value if flags.FLAGS["repeats"].present else DEFAULT_REPEATS
  result = auto_benchmark(_OPS.value, short=_SHORT.value, long=_LONG.value, repeats=repeats,
                          max_call_seconds=common.MAX_CALL_S.value,
                          max_temp_bytes=int(_MAX_TEMP.value * 2**30))
  report = {"what": "auto", "dtype": "float32", "repeats": repeats,
            "shape_classes": {
                "rule": (f"kernels.common.shape_class: 'short' for T < {LONG_FROM} tokens, "
                         f"else 'long'"),
                "short_len": _SHORT.value, "long_len": _LONG.value},
            "timing": ("ms of jitted jax.grad(sum(real(out_i) * w_i)) w.r.t. every float "
                       "input (fwd+bwd), compiled and warmed up first; median (and min) of "
                       "--repeats rounds, a case's candidates interleaved in one process "
                       "(order alternating per round)"),
            **common.machine(),
            "load_average": {"start": load_start, "end": list(os.getloadavg())},
            "result": result}
  common.write_report(report, code=CODE)
