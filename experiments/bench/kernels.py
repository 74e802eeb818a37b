"""``python -m experiments.bench kernels`` (or ``--what=kernels``): the scan kernels' ``xla``
form vs their per-token ``reference`` vs dense causal attention.

    python -m experiments.bench kernels --repeats=3 --out=results/bench_kernels

Forward + backward time (``jax.grad`` of a scalar loss w.r.t. every input, jitted and compiled
before timing) of each op's ``xla`` implementation vs its per-token ``reference`` vs dense
causal attention (``jax.nn.dot_product_attention(..., is_causal=True)``) for ``--lengths``,
all cases and a same-run fp32 matmul interleaved in one process; plus the fitted scaling
exponent of ``xla`` and the achieved GFLOP/s of ``linear_recurrence`` as a fraction of the
matmul's. Points that would not fit in reasonable time or memory are skipped with a note in
the JSON. The issue's targets are reported with pass / fail.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.bench import common
from kernels import chunked_scan, delta_rule, diag_scan, dplr

_OPS = flags.DEFINE_list("ops", ["linear_recurrence", "delta_rule", "diagonal_recurrence"],
                         "Kernel ops to time (also: dplr).")
_LENGTHS = flags.DEFINE_list("lengths", [str(1024 << i) for i in range(7)],
                             "Sequence lengths T (kernels).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size (kernels).")
_HEADS = flags.DEFINE_integer("heads", 4, "Heads H (kernels).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dim D = Dk = Dv (kernels).")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "chunk_size of the chunked ops (kernels).")
_DPLR_CHUNK = flags.DEFINE_integer("dplr_chunk_size", 16,
                                  "chunk_size of dplr (its fastest on CPU; the others use "
                                  "--chunk_size).")
_LR_DECAY = flags.DEFINE_enum("lr_decay", "head", ["none", "head", "channel"],
                              "linear_recurrence log decay: none, [B,T,H] or [B,T,H,D].")
_REF_MAX = flags.DEFINE_integer("reference_max_len", 16384,
                                "Longest T timed for the per-token reference.")
_DENSE_MAX = flags.DEFINE_integer("dense_max_len", 8192,
                                  "Longest T timed for dense attention ([B,H,T,T] scores).")
_FIT_FROM = flags.DEFINE_integer("fit_from", 4096,
                                 "Scaling exponent: fit xla times for T >= this.")
_MATMUL_N = flags.DEFINE_integer("matmul_size", 1024, "Same-run fp32 matmul: [n,n] @ [n,n].")

# What the figures depend on (lcm.provenance: the report is stale when these change).
CODE = ("kernels", "experiments/bench")

# The targets (kernels, issue 3): at T = TARGET_T, xla >= 20x faster than the
# reference; xla time ~ T^p with p <= 1.1 from 4k to 64k; linear_recurrence fwd+bwd at
# >= 30% of a same-run fp32 matmul's GFLOP/s.
TARGET_T = 16384
TARGET_SPEEDUP = 20.0
TARGET_EXPONENT = 1.1
TARGET_MATMUL_FRACTION = 0.3


def op_case(op, key, b, t, h, d, lr_decay):
  """``(fn(impl, chunk) -> f(*inputs) -> (out, final_state), inputs, description)``."""
  ks = jax.random.split(key, 6)
  shape = (b, t, h, d)
  nrm = lambda i, s: jax.random.normal(ks[i], s, jnp.float32)
  if op == "linear_recurrence":
    q, k, v = nrm(0, shape) / math.sqrt(d), nrm(1, shape) / math.sqrt(d), nrm(2, shape)
    g = {"none": None, "head": jax.nn.log_sigmoid(nrm(3, (b, t, h)) + 4.0),
         "channel": jax.nn.log_sigmoid(nrm(3, shape) + 4.0)}[lr_decay]
    args = (q, k, v) if g is None else (q, k, v, g)
    fn = lambda impl, chunk: (lambda *a: chunked_scan.linear_recurrence(
        *a, chunk_size=chunk, impl=impl))
    desc = f"q, k, v [B,T,H,D]; log_decay {lr_decay} (head: [B,T,H], channel: [B,T,H,D])"
  elif op == "delta_rule":
    q = nrm(0, shape)
    k = nrm(1, shape)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # callers L2-normalise k
    args = (q, k, nrm(2, shape), jax.nn.sigmoid(nrm(3, (b, t, h))),
            jax.nn.log_sigmoid(nrm(4, (b, t, h)) + 4.0))
    fn = lambda impl, chunk: (lambda *a: delta_rule.delta_rule(
        *a, chunk_size=chunk, impl=impl))
    desc = "q, k (unit norm), v [B,T,H,D]; beta, log_decay [B,T,H] (Gated DeltaNet)"
  elif op == "dplr":
    kappa = nrm(1, shape)
    kappa = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
    a = -jax.nn.sigmoid(nrm(3, shape)) * kappa
    log_w = -jnp.exp(-0.5) * jax.nn.sigmoid(nrm(4, shape))  # RWKV-7's decay range
    args = (nrm(0, shape) / math.sqrt(d), nrm(5, shape) / math.sqrt(d), nrm(2, shape), a,
            kappa, log_w)
    fn = lambda impl, chunk: (lambda *x: dplr.dplr_recurrence(
        *x, chunk_size=_DPLR_CHUNK.value, impl=impl))
    desc = ("q, k, v [B,T,H,D]; a = -iclr * b, b unit norm, log_decay [B,T,H,D] "
            f"(RWKV-7's range); chunk_size {_DPLR_CHUNK.value}")
  elif op == "diagonal_recurrence":
    args = (jax.nn.log_sigmoid(nrm(0, shape) + 4.0), nrm(1, shape))
    fn = lambda impl, chunk: (lambda *a: diag_scan.diagonal_recurrence(*a, impl=impl))
    desc = "log_a, b [B,T,H,D] (channels H*D); diag_scan's default chunk_size"
  else:
    raise app.UsageError(f"--ops: unknown op {op!r}.")
  return fn, args, desc


def grad_fn(f):
  """Jitted ``grad`` of ``sum(out * w_o) + sum(final * w_s)`` w.r.t. every input (random
  fixed cotangents, passed as arguments so that nothing is constant-folded; complex outputs
  contribute their real part)."""
  def loss(args, w_o, w_s):
    o, s = f(*args)
    return jnp.sum(jnp.real(o).astype(jnp.float32) * w_o) + jnp.sum(jnp.real(s) * w_s)
  return jax.jit(jax.grad(loss))


def linear_recurrence_flops(b, t, h, dk, dv, chunk):
  """Matmul FLOPs of the chunked ``linear_recurrence`` (``xla``) forward + backward.

  Per batch row, head and chunk of C tokens the forward runs four matmuls:
  scores ``Q K^T`` (2 C^2 Dk), intra-chunk output ``scores V`` (2 C^2 Dv), the chunk's
  state contribution ``K_out^T V`` (2 C Dk Dv) and inter-chunk output ``Q_in S``
  (2 C Dk Dv). The backward (autodiff, every input differentiated) runs two matmuls of
  the same size per forward matmul (one per operand), so fwd + bwd = 3x forward. Counted
  as executed: dense [C, C] blocks (the causal half is masked element-wise, not skipped),
  ``N = ceil(T / C)`` chunks including the front padding; element-wise work (exp, masks,
  the per-channel in-sub-chunk products) and the [Dk, Dv] state hand-off are not counted.
  """
  c = max(1, min(chunk, t))
  n = -(-t // c)
  fwd = b * h * n * (2 * c * c * dk + 2 * c * c * dv + 4 * c * dk * dv)
  return 3 * fwd


def kernel_benchmark(ops, lengths, *, batch, heads, head_dim, chunk_size, repeats,
                     reference_max_len, dense_max_len, max_call_seconds, fit_from,
                     matmul_size, lr_decay="head"):
  """fwd+bwd times of ``xla`` / ``reference`` / dense causal attention per op and T, the
  scaling exponent, linear_recurrence GFLOP/s vs a same-run matmul, and the targets."""
  b, h, d = batch, heads, head_dim
  cases, skipped, info = {}, {}, {}

  def prepare(name, f, args):
    """Compile and warm up; returns None (and records why) if it fails or is too slow."""
    try:
      t0 = time.perf_counter()
      compiled = f.lower(*args).compile()
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      first_s = time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory)
      skipped[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
      return
    mem = compiled.memory_analysis()
    info[name] = {"compile_s": round(compile_s, 3),
                  "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes)}
    if first_s > max_call_seconds:
      info[name]["ms"] = first_s * 1e3
      info[name]["note"] = (f"timed once: the warm-up call took {first_s:.1f} s > "
                            f"--max_call_seconds={max_call_seconds:g}")
      return
    cases[name] = lambda: jax.block_until_ready(compiled(*args))

  key = jax.random.PRNGKey(0)
  for t in lengths:
    kq, kw, key = jax.random.split(key, 3)
    for op in ops:
      fn, args, _ = op_case(op, kq, b, t, h, d, lr_decay)
      out_shape = jax.eval_shape(fn("xla", chunk_size), *args)
      w_o, w_s = (jax.random.normal(k_, s.shape, jnp.float32)
                  for k_, s in zip(jax.random.split(kw), out_shape))
      for impl in ("xla", "reference"):
        name = (op, impl, t)
        if impl == "reference" and t > reference_max_len:
          skipped[name] = (f"T > --reference_max_len={reference_max_len}: the per-token "
                           f"scan's time and saved per-step states grow with T")
          continue
        prepare(name, grad_fn(fn(impl, chunk_size)), (args, w_o, w_s))
    name = ("dense_attention", "xla", t)
    if t > dense_max_len:
      gib = b * h * t * t * 4 / 2**30
      skipped[name] = (f"T > --dense_max_len={dense_max_len}: each [B,H,T,T] fp32 scores "
                       f"tensor is {gib:.2f} GiB (several live in fwd+bwd)")
      continue
    shape = (b, t, h, d)
    qkv = tuple(jax.random.normal(k_, shape, jnp.float32) for k_ in jax.random.split(kq, 3))
    w_o = jax.random.normal(kw, shape, jnp.float32)
    dense = jax.jit(jax.grad(lambda qkv, w: jnp.sum(
        jax.nn.dot_product_attention(*qkv, is_causal=True) * w)))
    prepare(name, dense, (qkv, w_o))
  n = matmul_size
  mats = tuple(jax.random.normal(k_, (n, n), jnp.float32) for k_ in jax.random.split(key))
  prepare(("matmul", "xla", n), jax.jit(lambda x, y: jnp.dot(
      x, y, precision=jax.lax.Precision.HIGHEST)), mats)

  for k, ts in common.time_interleaved(cases, repeats).items():
    info[k].update(common.summary(ts))

  def ms(k):
    return info[k]["ms"] if k in info and "ms" in info[k] else None

  mm_key = ("matmul", "xla", n)
  matmul = {"n": n, "ms": ms(mm_key), "gflops": None}
  if ms(mm_key):
    matmul["gflops"] = 2 * n**3 / (ms(mm_key) * 1e-3) / 1e9
  dense_res = {}
  for t in lengths:
    k = ("dense_attention", "xla", t)
    dense_res[str(t)] = ({"skipped": skipped[k]} if k in skipped else info.get(k))
  targets = []
  result = {}
  for op in ops:
    _, _, desc = op_case(op, jax.random.PRNGKey(0), b, 16, h, d, lr_decay)
    r = {"inputs": desc, "xla": {}, "reference": {}, "speedup_vs_reference": {},
         "speedup_vs_dense": {}}
    for t in lengths:
      for impl in ("xla", "reference"):
        k = (op, impl, t)
        r[impl][str(t)] = {"skipped": skipped[k]} if k in skipped else info.get(k)
      x, ref, dense = ms((op, "xla", t)), ms((op, "reference", t)), ms(
          ("dense_attention", "xla", t))
      if x and ref:
        r["speedup_vs_reference"][str(t)] = ref / x
      if x and dense:
        r["speedup_vs_dense"][str(t)] = dense / x
    fit = {t: ms((op, "xla", t)) for t in lengths if t >= fit_from and ms((op, "xla", t))}
    r["scaling_exponent"] = {"value": common.fit_exponent(fit), "lengths": sorted(fit),
                             "fit": "least squares of log(ms) vs log(T), xla fwd+bwd"}
    if op == "linear_recurrence":
      r["gflops"] = {}
      for t in lengths:
        x = ms((op, "xla", t))
        if x:
          fl = linear_recurrence_flops(b, t, h, d, d, chunk_size)
          gf = fl / (x * 1e-3) / 1e9
          r["gflops"][str(t)] = {"flops": fl, "gflops": gf, "fraction_of_matmul": (
              gf / matmul["gflops"] if matmul["gflops"] else None)}
    result[op] = r

    sp = r["speedup_vs_reference"].get(str(TARGET_T))
    targets.append({
        "target": f"{op}: xla fwd+bwd >= {TARGET_SPEEDUP:g}x faster than reference at "
                  f"T={TARGET_T}",
        "value": sp, "threshold": TARGET_SPEEDUP,
        "pass": None if sp is None else bool(sp >= TARGET_SPEEDUP)})
    ex = r["scaling_exponent"]["value"]
    lens = r["scaling_exponent"]["lengths"]
    targets.append({
        "target": f"{op}: xla fwd+bwd scaling exponent <= {TARGET_EXPONENT:g} over "
                  f"T={lens[0] if lens else '?'}..{lens[-1] if lens else '?'}",
        "value": ex, "threshold": TARGET_EXPONENT,
        "pass": None if ex is None else bool(ex <= TARGET_EXPONENT)})
    if op == "linear_recurrence":
      fr = r["gflops"].get(str(TARGET_T), {}).get("fraction_of_matmul")
      targets.append({
          "target": f"linear_recurrence: xla fwd+bwd >= {TARGET_MATMUL_FRACTION:.0%} of "
                    f"the same-run fp32 matmul's GFLOP/s at T={TARGET_T}, H={h}, D={d}",
          "value": fr, "threshold": TARGET_MATMUL_FRACTION,
          "pass": None if fr is None else bool(fr >= TARGET_MATMUL_FRACTION)})
  for tg in targets:
    if tg["pass"] is None:
      tg["note"] = "not measured (point skipped or failed; see the op's entries)"
  return {"ops": result, "dense_attention": dense_res, "matmul": matmul,
          "targets": targets,
          "all_targets_pass": all(tg["pass"] is True for tg in targets)}


def plot(report, path):
  """Log-log ms vs T per op: xla, reference and dense causal attention."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ops = list(report["result"]["ops"])
  lengths = report["lengths"]
  fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.6), squeeze=False)

  def series(d):
    pts = [(t, d[str(t)]["ms"]) for t in lengths
           if d.get(str(t)) and d[str(t)].get("ms") is not None]
    return [p[0] for p in pts], [p[1] for p in pts]

  for ax, op in zip(axes[0], ops):
    r = report["result"]["ops"][op]
    ex = r["scaling_exponent"]["value"]
    for label, d, style in (
        (f"xla (T^{ex:.2f})" if ex is not None else "xla", r["xla"], "o-"),
        ("reference", r["reference"], "s--"),
        ("dense causal attention", report["result"]["dense_attention"], "^:")):
      x, y = series(d)
      if x:
        ax.plot(x, y, style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("fwd+bwd ms")
    ax.set_title(op, fontsize=10)
    ax.legend(fontsize=8)
  fig.suptitle(f"B={report['batch']}, H={report['heads']}, D={report['head_dim']}, fp32, "
               f"{report['backend']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  lengths = [int(t) for t in _LENGTHS.value]
  result = kernel_benchmark(
      _OPS.value, lengths, batch=_BATCH.value, heads=_HEADS.value, head_dim=_HEAD_DIM.value,
      chunk_size=_CHUNK.value, repeats=common.REPEATS.value,
      reference_max_len=_REF_MAX.value, dense_max_len=_DENSE_MAX.value,
      max_call_seconds=common.MAX_CALL_S.value, fit_from=_FIT_FROM.value,
      matmul_size=_MATMUL_N.value, lr_decay=_LR_DECAY.value)
  report = {"what": "kernels", "batch": _BATCH.value, "heads": _HEADS.value,
            "head_dim": _HEAD_DIM.value, "chunk_size": _CHUNK.value, "dtype": "float32",
            "lengths": lengths, "repeats": common.REPEATS.value,
            "timing": ("ms of jitted jax.grad(sum(out * w_o) + sum(final_state * w_s)) "
                       "w.r.t. every input (fwd+bwd), compiled and warmed up first; median "
                       "(and min) of --repeats rounds over all cases interleaved in one "
                       "process, each timed call right after an untimed call of the same "
                       "case"),
            "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "result": result}
  common.write_report(report, code=CODE, plot=lambda path: plot(report, path))
