"""Benchmarks: ratios measured inside one process (the machine is shared and noisy).

    python -m experiments.bench --what=decode --mixers=attention,mamba2,gated_deltanet \
        --contexts=1024,32768 --out=results/bench_decode

``decode``: per-token latency of ``LM.step`` (one token, batch 1) with a state sized for
each context length, and the state's memory. Attention's KV cache grows with the context,
so its per-token cost does; a recurrent mixer's state does not. Each timing is the median
of ``--repeats`` runs of a jitted ``lax.scan`` over ``--tokens`` decode steps, with all
mixers and contexts interleaved so machine noise hits them alike. Writes JSON (+ PNG).

    python -m experiments.bench --what=kernels --repeats=3 --out=results/bench_kernels

``kernels`` (also ``python -m experiments.bench kernels``): forward + backward time
(``jax.grad`` of a scalar loss w.r.t. every input, jitted and compiled before timing) of
each op's ``xla`` implementation vs its per-token ``reference`` vs dense causal attention
(``jax.nn.dot_product_attention(..., is_causal=True)``) for ``--lengths``, all cases and a
same-run fp32 matmul interleaved in one process; plus the fitted scaling exponent of
``xla`` and the achieved GFLOP/s of ``linear_recurrence`` as a fraction of the matmul's.
Points that would not fit in reasonable time or memory are skipped with a note in the
JSON. The issue's targets are reported with pass / fail.

    python -m experiments.bench layers --repeats=3 --out=results/bench_layers

``layers`` (or ``--what=layers``): forward + backward time (jitted ``jax.grad`` of
``sum(y)`` w.r.t. the layer's parameters and its input ``x``, compiled and warmed up first)
of whole registered mixers at batch 1, fp32, against published peers timed in the same
process, all cases interleaved:

  * ``mamba2`` (d_model 256, d_state 64, head_dim 64, expand 2, chunk 256, ngroups 1,
    d_conv 4, ``impl="xla"``) at ``--layers_lengths`` (4k..64k; the scaling exponent is fit
    over them) vs the pure-JAX ``mamba2-jax`` ``Mamba2Mixer`` at the same config (PyPI
    ``mamba2-jax``) at ``--layers_peer_lengths``;
  * ``s4d`` and ``mamba`` (same d_model and d_state; Mamba expand 2) at
    ``--layers_ssm_lengths`` (Mamba's [B, T, d_inner, d_state] scan states make its longer
    points exceed ``--layers_max_temp_gib``: skipped, with a note);
  * ``titans_lmm`` (4 heads, chunk 64) vs the PyTorch ``titans-pytorch``
    ``NeuralMemory(dim=256, chunk_size=64, heads=4)`` (``loss.backward()``, torch limited
    to the cores JAX uses), plus the same peer matched to lcm's layer
    (``titans_pytorch_matched``: ``dim_head = d_model / heads`` and the memory MLP's depth and
    expansion of ``titans_lmm``; the named constructor defaults to ``dim_head = dim``, i.e.
    4x wider heads, and expansion 4). ``titans_lmm`` is timed only when registered.

The peers are optional (``pip install -e '.[bench]'`` or ``make bench``): a peer that is not
installed is reported as such. Points whose compiled temporaries exceed
``--layers_max_temp_gib`` are skipped with a note. Writes JSON (+ a log-log PNG of ms vs T)
with ms, tokens/s, parameter counts, speed-up ratios (peer ms / lcm ms), the exponent and
the issues' targets (pass / fail / None when not measured).

    python -m experiments.bench swa --repeats=5 --out=results/bench_swa

``swa`` (or ``--what=swa``): forward + backward time (jitted ``jax.grad`` w.r.t. q, k, v,
compiled and warmed up first, the two cases interleaved) of ``block_sparse_attention`` over
``sliding_window_blocks`` (``--swa_window``, ``--swa_block_size``) vs dense causal attention
(plain jnp, the same math without the window) at ``--swa_seq_len`` (16k), B=1, H=4, D=64
(``--swa_batch/heads/head_dim``). When the dense form's [B,H,T,T] fp32 temporaries do not
fit in memory, it runs over blocks of queries (same O(T^2) work; said in the JSON's notes).
Writes JSON only (median ms, ratio, issue 6's 10x target with pass / fail).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from kernels import chunked_scan, delta_rule, diag_scan
from lcm import config as config_lib
from lcm import model as model_lib
from lcm import registry
from lcm.evals import throughput

_WHAT = flags.DEFINE_enum("what", "decode", ["decode", "kernels", "layers", "swa"],
                          "Which benchmark (may also be given as the positional argument).")
_MIXERS = flags.DEFINE_list("mixers", ["attention", "mamba2", "gated_deltanet"], "Mixers.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "32768"], "Context lengths.")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Layers.")
_TOKENS = flags.DEFINE_integer("tokens", 32, "Decode steps per timing.")
_DECODE_LEVEL = flags.DEFINE_enum("decode_level", "lm", ["lm", "mixer"],
                                  "decode: time an LM's greedy decoding or one mixer's step.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timings per point (median).")
_HUGE = flags.DEFINE_bool(
    "huge_pages", True,
    "Re-run under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for "
    "malloc's large blocks; see _with_huge_pages) unless already set.")
_OUT = flags.DEFINE_string("out", "", "Write <out>.json and <out>.png when given.")
# --what=kernels
_OPS = flags.DEFINE_list("ops", ["linear_recurrence", "delta_rule", "diagonal_recurrence"],
                         "Kernel ops to time.")
_LENGTHS = flags.DEFINE_list("lengths", [str(1024 << i) for i in range(7)],
                             "Sequence lengths T (kernels).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size (kernels).")
_HEADS = flags.DEFINE_integer("heads", 4, "Heads H (kernels).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dim D = Dk = Dv (kernels).")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "chunk_size of the chunked ops (kernels).")
_LR_DECAY = flags.DEFINE_enum("lr_decay", "head", ["none", "head", "channel"],
                              "linear_recurrence log decay: none, [B,T,H] or [B,T,H,D].")
_REF_MAX = flags.DEFINE_integer("reference_max_len", 16384,
                                "Longest T timed for the per-token reference.")
_DENSE_MAX = flags.DEFINE_integer("dense_max_len", 8192,
                                  "Longest T timed for dense attention ([B,H,T,T] scores).")
_MAX_CALL_S = flags.DEFINE_float("max_call_seconds", 60.0,
                                 "A point whose warm-up call takes longer is timed once.")
_FIT_FROM = flags.DEFINE_integer("fit_from", 4096,
                                 "Scaling exponent: fit xla times for T >= this.")
_MATMUL_N = flags.DEFINE_integer("matmul_size", 1024, "Same-run fp32 matmul: [n,n] @ [n,n].")
# --what=layers
_L_LENGTHS = flags.DEFINE_list("layers_lengths", [str(4096 << i) for i in range(5)],
                               "mamba2 sequence lengths (layers; exponent fit over them).")
_L_PEER_LENGTHS = flags.DEFINE_list("layers_peer_lengths", ["4096", "16384", "65536"],
                                    "mamba2-jax peer sequence lengths (layers).")
_L_SSM_LENGTHS = flags.DEFINE_list("layers_ssm_lengths", ["4096", "8192", "16384"],
                                   "s4d and mamba sequence lengths (layers).")
_L_TITANS_LENGTHS = flags.DEFINE_list("layers_titans_lengths", ["4096"],
                                      "titans_lmm and titans-pytorch sequence lengths.")
_L_D_MODEL = flags.DEFINE_integer("layers_d_model", 256, "d_model (layers).")
_L_D_STATE = flags.DEFINE_integer("layers_d_state", 64, "d_state of mamba2/s4d/mamba.")
_L_HEAD_DIM = flags.DEFINE_integer("layers_head_dim", 64, "mamba2 head_dim (layers).")
_L_EXPAND = flags.DEFINE_integer("layers_expand", 2, "mamba2/mamba expand (layers).")
_L_CHUNK = flags.DEFINE_integer("layers_chunk_size", 256, "mamba2 chunk_size (layers).")
_L_TITANS_HEADS = flags.DEFINE_integer("layers_titans_heads", 4, "titans heads (layers).")
_L_TITANS_CHUNK = flags.DEFINE_integer("layers_titans_chunk", 64, "titans chunk (layers).")
_L_PEERS = flags.DEFINE_bool("layers_peers", True, "Time the installed peers (layers).")
_L_ONLY = flags.DEFINE_list("layers_only", [],
                            "Time only these series (layers; default all): mamba2, s4d, "
                            "mamba, titans_lmm, mamba2_jax, titans_pytorch, "
                            "titans_pytorch_matched.")
_L_MAX_TEMP = flags.DEFINE_float("layers_max_temp_gib", 8.0,
                                 "Skip a JAX point whose compiled temporaries exceed this.")
# --what=swa
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


def _lm(name: str, d_model: int, num_layers: int, scan_layers: bool = True) -> model_lib.LM:
  c = config_lib.base_config().model
  c.vocab_size, c.d_model, c.num_layers, c.pattern = 256, d_model, num_layers, name
  c.scan_layers = scan_layers
  c.mixers = ml_collections.ConfigDict({})
  return model_lib.LM(c, rngs=nnx.Rngs(0))


def _state_bytes(state) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def _at_context(state, ctx: int):
  """The state as if ``ctx`` tokens had been seen: every mixer's ``pos`` counter (and the
  LM's real-token count) set to ``ctx``; the cache contents stay zeros (same cost). Mixers
  whose per-token cost depends on the position, not on the cache capacity (landmark: exact
  grouped softmax below ``exact_len``, retrieval above), are timed at the context asked."""
  def visit(x):
    if isinstance(x, dict):
      return {k: (jnp.full_like(v, ctx) if k in ("pos", "tokens") else visit(v))
              for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return type(x)(visit(v) for v in x)
    return x
  return visit(state)


def decode_benchmark(mixers, contexts, *, d_model, num_layers, tokens, repeats,
                     level: str = "lm"):
  """{mixer: {context: {"ms_per_token", "state_bytes"}}} plus growth ratios.

  ``level="lm"``: greedy decoding of a ``num_layers`` LM; ``"mixer"``: one mixer's ``step``
  alone, its output fed back (normalised) as the next input."""
  cases = {}
  for name in mixers:
    if level == "mixer":
      model = registry.create(name, d_model=d_model, rngs=nnx.Rngs(0))
    else:
      # Layers unrolled: a scanned layer stack re-materialises every layer's KV cache as a
      # scan output at each token, an O(context) copy that would hide what the mixer costs.
      model = _lm(name, d_model, num_layers, scan_layers=False)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)

    @jax.jit
    def run(params, state, tok, graphdef=graphdef):
      def body(carry, _):
        t, s = carry
        out, s = nnx.merge(graphdef, params).step(t, s)
        if level == "mixer":
          return (out / (jnp.linalg.norm(out) + 1e-6), s), None
        return (jnp.argmax(out[:, -1:], -1).astype(jnp.int32), s), None
      (t, s), _ = jax.lax.scan(body, (tok, state), None, length=tokens)
      return t, s

    for ctx in contexts:
      state = _at_context(model.init_state(1, max_len=ctx + tokens), ctx)
      tok = (jax.random.normal(jax.random.key(0), (1, 1, d_model)) if level == "mixer"
             else jnp.zeros((1, 1), jnp.int32))
      jax.block_until_ready(run(params, state, tok))  # compile + warm up
      cases[(name, ctx)] = (run, params, state, tok, _state_bytes(state))
  times = {k: [] for k in cases}
  for _ in range(repeats):  # interleaved: noise hits every case alike
    for k, (run, params, state, tok, _) in cases.items():
      t0 = time.perf_counter()
      jax.block_until_ready(run(params, state, tok))
      times[k].append((time.perf_counter() - t0) / tokens * 1e3)
  out = {}
  for (name, ctx), ts in times.items():
    out.setdefault(name, {})[str(ctx)] = {
        "ms_per_token": float(np.median(ts)), "state_bytes": cases[(name, ctx)][4]}
  lo, hi = str(min(contexts)), str(max(contexts))
  for name in mixers:
    out[name]["latency_growth"] = out[name][hi]["ms_per_token"] / out[name][lo]["ms_per_token"]
    out[name]["memory_growth"] = out[name][hi]["state_bytes"] / out[name][lo]["state_bytes"]
  return out


# ----------------------------------------------------------------------------------
# --what=kernels
# ----------------------------------------------------------------------------------

# The issue's targets (kernels, issue 3): at T = _TARGET_T, xla >= 20x faster than the
# reference; xla time ~ T^p with p <= 1.1 from 4k to 64k; linear_recurrence fwd+bwd at
# >= 30% of a same-run fp32 matmul's GFLOP/s.
_TARGET_T = 16384
_TARGET_SPEEDUP = 20.0
_TARGET_EXPONENT = 1.1
_TARGET_MATMUL_FRACTION = 0.3


def _op_case(op, key, b, t, h, d, lr_decay):
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
  elif op == "diagonal_recurrence":
    args = (jax.nn.log_sigmoid(nrm(0, shape) + 4.0), nrm(1, shape))
    fn = lambda impl, chunk: (lambda *a: diag_scan.diagonal_recurrence(*a, impl=impl))
    desc = "log_a, b [B,T,H,D] (channels H*D); diag_scan's default chunk_size"
  else:
    raise app.UsageError(f"--ops: unknown op {op!r}.")
  return fn, args, desc


def _grad_fn(f):
  """Jitted ``grad`` of ``sum(out * w_o) + sum(final * w_s)`` w.r.t. every input (random
  fixed cotangents, passed as arguments so that nothing is constant-folded)."""
  def loss(args, w_o, w_s):
    o, s = f(*args)
    return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(s * w_s)
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


def _fit_exponent(points):
  """Least-squares slope of log(time) vs log(T) over ``{T: ms}``."""
  ts = sorted(points)
  if len(ts) < 2:
    return None
  x = np.log(np.asarray(ts, np.float64))
  y = np.log(np.asarray([points[t] for t in ts], np.float64))
  return float(np.polyfit(x, y, 1)[0])


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
    cases[name] = (compiled, args)

  key = jax.random.PRNGKey(0)
  for t in lengths:
    kq, kw, key = jax.random.split(key, 3)
    for op in ops:
      fn, args, _ = _op_case(op, kq, b, t, h, d, lr_decay)
      out_shape = jax.eval_shape(fn("xla", chunk_size), *args)
      w_o, w_s = (jax.random.normal(k_, s.shape, jnp.float32)
                  for k_, s in zip(jax.random.split(kw), out_shape))
      for impl in ("xla", "reference"):
        name = (op, impl, t)
        if impl == "reference" and t > reference_max_len:
          skipped[name] = (f"T > --reference_max_len={reference_max_len}: the per-token "
                           f"scan's time and saved per-step states grow with T")
          continue
        prepare(name, _grad_fn(fn(impl, chunk_size)), (args, w_o, w_s))
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

  times = {k: [] for k in cases}
  for _ in range(repeats):  # interleaved: noise hits every case alike
    for k, (compiled, args) in cases.items():
      # One untimed call first: the previous case (up to GBs of temporaries) leaves cold
      # caches and freed pages behind; time the steady state, as a training loop sees it.
      jax.block_until_ready(compiled(*args))
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[k].append((time.perf_counter() - t0) * 1e3)
  for k, ts in times.items():
    info[k].update(ms=float(np.median(ts)), min_ms=float(np.min(ts)), runs=len(ts))

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
    _, _, desc = _op_case(op, jax.random.PRNGKey(0), b, 16, h, d, lr_decay)
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
    r["scaling_exponent"] = {"value": _fit_exponent(fit), "lengths": sorted(fit),
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

    sp = r["speedup_vs_reference"].get(str(_TARGET_T))
    targets.append({
        "target": f"{op}: xla fwd+bwd >= {_TARGET_SPEEDUP:g}x faster than reference at "
                  f"T={_TARGET_T}",
        "value": sp, "threshold": _TARGET_SPEEDUP,
        "pass": None if sp is None else bool(sp >= _TARGET_SPEEDUP)})
    ex = r["scaling_exponent"]["value"]
    lens = r["scaling_exponent"]["lengths"]
    targets.append({
        "target": f"{op}: xla fwd+bwd scaling exponent <= {_TARGET_EXPONENT:g} over "
                  f"T={lens[0] if lens else '?'}..{lens[-1] if lens else '?'}",
        "value": ex, "threshold": _TARGET_EXPONENT,
        "pass": None if ex is None else bool(ex <= _TARGET_EXPONENT)})
    if op == "linear_recurrence":
      fr = r["gflops"].get(str(_TARGET_T), {}).get("fraction_of_matmul")
      targets.append({
          "target": f"linear_recurrence: xla fwd+bwd >= {_TARGET_MATMUL_FRACTION:.0%} of "
                    f"the same-run fp32 matmul's GFLOP/s at T={_TARGET_T}, H={h}, D={d}",
          "value": fr, "threshold": _TARGET_MATMUL_FRACTION,
          "pass": None if fr is None else bool(fr >= _TARGET_MATMUL_FRACTION)})
  for tg in targets:
    if tg["pass"] is None:
      tg["note"] = "not measured (point skipped or failed; see the op's entries)"
  return {"ops": result, "dense_attention": dense_res, "matmul": matmul,
          "targets": targets,
          "all_targets_pass": all(tg["pass"] is True for tg in targets)}


# ----------------------------------------------------------------------------------
# --what=layers
# ----------------------------------------------------------------------------------

# The issues' targets: issue 5 item 3 (mamba2 fwd+bwd at B=1, T=4096, d_model 256, d_state
# 64, head_dim 64, expand 2, chunk 256 >= 2x faster than mamba2-jax's Mamba2Mixer at the
# same config; time ~ T^p with p <= 1.1 from 4k to 64k) and issue 7 item 4 (titans_lmm
# fwd+bwd at B=1, T=4096, d_model 256, 4 heads, chunk 64 >= 10x faster than titans-pytorch's
# NeuralMemory(dim=256, chunk_size=64, heads=4)).
_LAYERS_TARGET_T = 4096
_LAYERS_EXPONENT_SPAN = (4096, 65536)
_MAMBA2_TARGET_SPEEDUP = 2.0
_MAMBA2_TARGET_EXPONENT = 1.1
_TITANS_TARGET_SPEEDUP = 10.0
_LAYERS_ISSUE_CONFIG = {"batch": 1, "d_model": 256, "d_state": 64, "head_dim": 64,
                        "expand": 2, "chunk_size": 256, "titans_heads": 4, "titans_chunk": 64}
# Peers: PyPI distribution -> import name. Installed by the `bench` extra, never required.
LAYER_PEERS = {"mamba2-jax": "mamba2_jax", "titans-pytorch": "titans_pytorch"}


def cpu_threads() -> int:
  """Cores this process may run on: XLA:CPU sizes its intra-op thread pool to them, and the
  torch peer is limited to the same number (``torch.set_num_threads``)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _peer_installed(dist: str) -> bool:
  return importlib.util.find_spec(LAYER_PEERS[dist]) is not None


def _titans_overrides(heads: int, chunk: int) -> dict:
  """titans_lmm's Config fields for the head count and the chunk size."""
  return {"num_heads": heads, "chunk_size": chunk}


def _layer_series(*, d_model, d_state, head_dim, expand, chunk_size, titans_heads,
                  titans_chunk, mamba2_lengths, peer_lengths, ssm_lengths, titans_lengths,
                  peers):
  """The timed series: ``{key: spec}``; a spec is ``{"status": why}`` (not timed) or has
  ``kind`` ("jax" / "torch"), ``lengths``, ``build() -> (module, call, info)``. ``peers``:
  True (every installed peer), False, or a collection of PyPI names (``LAYER_PEERS``)."""
  series = {}

  def lcm_layer(name, overrides, lengths, note=""):
    def build():
      module = registry.create(name, d_model=d_model, rngs=nnx.Rngs(0), **overrides)
      cfg = registry.config_fields(name)
      cfg.update(overrides)
      info = {"source": f"lcm.registry.create({name!r}, d_model={d_model}, **config)",
              "config": cfg}
      if note:
        info["note"] = note
      return module, lambda m, x: m(x), info
    return {"kind": "jax", "lengths": list(lengths), "build": build}

  ssm = {"d_state": d_state, "impl": "xla"}
  series["mamba2"] = lcm_layer("mamba2", {**ssm, "head_dim": head_dim, "expand": expand,
                                          "chunk_size": chunk_size, "ngroups": 1,
                                          "d_conv": 4}, mamba2_lengths)
  series["s4d"] = lcm_layer("s4d", ssm, ssm_lengths,
                            "no segment_ids: S4D's __call__ uses its FFT convolution "
                            "(Config.parallel='fft')")
  series["mamba"] = lcm_layer("mamba", {**ssm, "expand": expand}, ssm_lengths)
  if "titans_lmm" in registry.names():
    series["titans_lmm"] = lcm_layer(
        "titans_lmm", _titans_overrides(titans_heads, titans_chunk), titans_lengths)
  else:
    series["titans_lmm"] = {"status": "not registered (lcm.registry.names() has no "
                                      "'titans_lmm')"}

  selected = set(LAYER_PEERS) if peers is True else set(peers or ())

  def missing(dist):
    if dist not in selected:
      return {"status": "not timed (peer not selected)"}
    if not _peer_installed(dist):
      return {"status": f"not installed ({dist}): pip install -e '.[bench]' or make bench"}
    return None

  series["mamba2_jax"] = missing("mamba2-jax")
  if series["mamba2_jax"] is None:
    def build_mamba2_jax():
      import mamba2_jax  # pylint: disable=g-import-not-at-top
      cfg = dict(hidden_size=d_model, state_size=d_state, head_dim=head_dim,
                 chunk_size=chunk_size, expand=expand, conv_kernel=4, num_hidden_layers=1)
      module = mamba2_jax.Mamba2Mixer(mamba2_jax.Mamba2Config(**cfg), layer_idx=0,
                                      rngs=nnx.Rngs(0))
      info = {"source": f"mamba2_jax {mamba2_jax.__version__}: Mamba2Mixer(Mamba2Config("
                        f"**config), layer_idx=0)",
              "config": {**cfg, "n_groups": "1 (fixed by the package)"}}
      return module, lambda m, x: m(x)[0], info
    series["mamba2_jax"] = {"kind": "jax", "lengths": list(peer_lengths),
                            "build": build_mamba2_jax}

  # The matched peer: lcm's head width and memory-MLP shape (titans_lmm's Config when
  # registered, else the package's defaults: depth 2, expansion 4).
  ours = (registry.config_fields("titans_lmm") if "titans_lmm" in registry.names() else {})
  mlp = {"depth": ours.get("depth", 2), "expansion_factor": float(ours.get("expansion", 4.0))}
  for key, dim_head in (("titans_pytorch", None), ("titans_pytorch_matched",
                                                   d_model // titans_heads)):
    series[key] = missing("titans-pytorch")
    if series[key] is not None:
      continue

    def build_titans(dim_head=dim_head):
      import torch  # pylint: disable=g-import-not-at-top
      import titans_pytorch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(cpu_threads())
      torch.manual_seed(0)
      kw = dict(dim=d_model, chunk_size=titans_chunk, heads=titans_heads)
      if dim_head is not None:
        kw.update(dim_head=dim_head, default_model_kwargs=dict(mlp))
      module = titans_pytorch.NeuralMemory(**kw)
      version = importlib.metadata.version("titans-pytorch")
      info = {"source": f"titans_pytorch {version} (torch {torch.__version__}): "
                        f"NeuralMemory(**config); loss = retrieved.sum(); loss.backward()",
              "config": kw, "torch_threads": torch.get_num_threads()}
      if dim_head is None:
        info["note"] = (f"the issue's constructor; dim_head defaults to dim={d_model}, so each "
                        f"of the {titans_heads} heads has a {d_model}-wide memory MLP")
      else:
        info["note"] = (f"matched to lcm's titans_lmm: dim_head = d_model / heads = "
                        f"{dim_head}, memory MLP depth {mlp['depth']}, expansion "
                        f"{mlp['expansion_factor']:g}")
      return module, None, info
    series[key] = {"kind": "torch", "lengths": list(titans_lengths), "build": build_titans}
  return series


def layer_benchmark(*, batch=1, d_model=256, d_state=64, head_dim=64, expand=2,
                    chunk_size=256, titans_heads=4, titans_chunk=64,
                    mamba2_lengths=(4096, 8192, 16384, 32768, 65536), peer_lengths=(4096,),
                    ssm_lengths=(4096,), titans_lengths=(4096,), peers=True, repeats=3,
                    max_call_seconds=120.0, max_temp_bytes=8 * 2**30, seed=0,
                    compiler_options=None, only=None):
  """fwd+bwd ms / tokens/s / parameter counts of lcm's mamba2, s4d, mamba, titans_lmm and
  the installed peers, peer-to-lcm speed-ups, mamba2's scaling exponent and the targets.

  Every case is ``grad(sum(y))`` w.r.t. the parameters and ``x ~ N(0, 1)`` ``[batch, T,
  d_model]`` fp32: jitted and compiled first for JAX (``--what=kernels``'s protocol), the
  autograd ``backward()`` for torch; then ``repeats`` rounds over all cases interleaved, each
  timed call right after an untimed call of the same case; ms is the median.
  ``compiler_options`` go to XLA's ``compile`` (tests pass a fast, unoptimised setting).
  ``only``: the series keys to time (default all: ``mamba2``, ``s4d``, ``mamba``,
  ``titans_lmm``, ``mamba2_jax``, ``titans_pytorch``, ``titans_pytorch_matched``).
  """
  series = _layer_series(
      d_model=d_model, d_state=d_state, head_dim=head_dim, expand=expand,
      chunk_size=chunk_size, titans_heads=titans_heads, titans_chunk=titans_chunk,
      mamba2_lengths=mamba2_lengths, peer_lengths=peer_lengths, ssm_lengths=ssm_lengths,
      titans_lengths=titans_lengths, peers=peers)
  out, cases = {}, {}
  key = jax.random.PRNGKey(seed)
  for name, spec in series.items():
    if only is not None and name not in only and "status" not in spec:
      spec = {"status": "not timed (not selected)"}
    if "status" in spec:
      out[name] = {"status": spec["status"]}
      continue
    try:
      module, call, info = spec["build"]()
    except Exception as e:  # pylint: disable=broad-except  (a peer's import or API)
      out[name] = {"status": f"failed to build: {type(e).__name__}: {str(e)[:300]}"}
      continue
    points = {}
    if spec["kind"] == "jax":
      f, params, n_params = throughput.layer_grad(module, call)
    else:
      n_params = int(sum(p.numel() for p in module.parameters()))
    out[name] = {**info, "params": n_params, "points": points}
    for t in spec["lengths"]:
      key, kx = jax.random.split(key)
      x = jax.random.normal(kx, (batch, t, d_model), jnp.float32)
      try:
        if spec["kind"] == "jax":
          t0 = time.perf_counter()
          compiled = f.lower(params, x).compile(compiler_options)
          p = {"compile_s": round(time.perf_counter() - t0, 3)}
          mem = compiled.memory_analysis()
          if mem is not None:
            p["temp_bytes"] = int(mem.temp_size_in_bytes)
            if mem.temp_size_in_bytes > max_temp_bytes:
              points[str(t)] = {**p, "skipped": (
                  f"compiled temporaries {mem.temp_size_in_bytes / 2**30:.1f} GiB > "
                  f"--layers_max_temp_gib={max_temp_bytes / 2**30:g}")}
              continue
          run = (lambda compiled=compiled, params=params, x=x:
                 jax.block_until_ready(compiled(params, x)))
        else:
          import torch  # pylint: disable=g-import-not-at-top
          xt = torch.from_numpy(np.array(x)).requires_grad_(True)

          def run(module=module, xt=xt):
            module.zero_grad(set_to_none=True)
            xt.grad = None
            y = module(xt)
            (y[0] if isinstance(y, tuple) else y).sum().backward()
          p = {}
        t0 = time.perf_counter()
        run()  # warm-up
        first_s = time.perf_counter() - t0
        if first_s > max_call_seconds:  # too slow for the rounds: one more call, timed
          t0 = time.perf_counter()
          run()
          p.update(ms=(time.perf_counter() - t0) * 1e3, runs=1, note=(
              f"timed once, right after the warm-up call, which took {first_s:.1f} s > "
              f"--max_call_seconds={max_call_seconds:g}"))
      except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory)
        points[str(t)] = {"skipped": f"failed: {type(e).__name__}: {str(e)[:300]}"}
        continue
      points[str(t)] = p
      if "ms" not in p:
        cases[(name, t)] = run

  times = {k: [] for k in cases}
  for _ in range(repeats):  # interleaved: noise hits every case alike
    for k, run in cases.items():
      run()  # untimed: the previous case left cold caches (and the other runtime's threads)
      t0 = time.perf_counter()
      run()
      times[k].append((time.perf_counter() - t0) * 1e3)
  for (name, t), ts in times.items():
    out[name]["points"][str(t)].update(ms=float(np.median(ts)), min_ms=float(np.min(ts)),
                                       runs=len(ts))

  def ms(name, t):
    p = out.get(name, {}).get("points", {}).get(str(t), {})
    return p.get("ms")

  for name, r in out.items():
    for t, p in r.get("points", {}).items():
      if p.get("ms"):
        p["tokens_per_s"] = batch * int(t) / (p["ms"] * 1e-3)
    fit = {int(t): p["ms"] for t, p in r.get("points", {}).items() if p.get("ms")}
    if len(fit) >= 2:
      r["scaling_exponent"] = {"value": _fit_exponent(fit), "lengths": sorted(fit),
                               "fit": "least squares of log(ms) vs log(T), fwd+bwd"}

  comparisons = {}
  for ours, peer in (("mamba2", "mamba2_jax"), ("titans_lmm", "titans_pytorch"),
                     ("titans_lmm", "titans_pytorch_matched")):
    if "points" not in out[ours] or "points" not in out[peer]:
      continue
    speedup = {t: ms(peer, t) / ms(ours, t) for t in out[peer]["points"]
               if ms(peer, t) and ms(ours, t)}
    comparisons[f"{ours} vs {peer}"] = {
        "params": {ours: out[ours]["params"], peer: out[peer]["params"]},
        "speedup": speedup, "speedup_is": f"{peer} ms / {ours} ms (> 1: lcm is faster)"}

  issue_config = {"batch": batch, "d_model": d_model, "d_state": d_state,
                  "head_dim": head_dim, "expand": expand, "chunk_size": chunk_size,
                  "titans_heads": titans_heads, "titans_chunk": titans_chunk}
  targets = []

  def target(text, value, threshold, higher_is_better, why_none, fields):
    off = [k for k in fields if issue_config[k] != _LAYERS_ISSUE_CONFIG[k]]
    ok = None
    if value is not None and not off:
      ok = bool(value >= threshold) if higher_is_better else bool(value <= threshold)
    tg = {"target": text, "value": value, "threshold": threshold, "pass": ok}
    if off:
      tg["note"] = (f"not a target measurement: this run's {', '.join(off)} differ from the "
                    f"issue's ({', '.join(f'{k}={_LAYERS_ISSUE_CONFIG[k]}' for k in off)})")
    elif ok is None:
      tg["note"] = why_none
    targets.append(tg)

  mamba2_fields = ("batch", "d_model", "d_state", "head_dim", "expand", "chunk_size")
  titans_fields = ("batch", "d_model", "titans_heads", "titans_chunk")

  tt = str(_LAYERS_TARGET_T)
  target(f"mamba2: fwd+bwd >= {_MAMBA2_TARGET_SPEEDUP:g}x faster than mamba2-jax "
         f"Mamba2Mixer at B=1, T={tt}, d_model 256, d_state 64, head_dim 64, expand 2, "
         f"chunk 256", comparisons.get("mamba2 vs mamba2_jax", {}).get("speedup", {}).get(tt),
         _MAMBA2_TARGET_SPEEDUP, True,
         f"not measured (peer not installed, or a T={tt} point skipped)", mamba2_fields)
  ex = out["mamba2"].get("scaling_exponent", {})
  lens = ex.get("lengths", [])
  spans = bool(lens) and lens[0] <= _LAYERS_EXPONENT_SPAN[0] and (
      lens[-1] >= _LAYERS_EXPONENT_SPAN[1])
  target(f"mamba2: fwd+bwd scaling exponent <= {_MAMBA2_TARGET_EXPONENT:g} over "
         f"T={_LAYERS_EXPONENT_SPAN[0]}..{_LAYERS_EXPONENT_SPAN[1]}",
         ex.get("value") if spans else None, _MAMBA2_TARGET_EXPONENT, False,
         f"not measured: fit over T={lens} does not span {_LAYERS_EXPONENT_SPAN}",
         mamba2_fields)
  target(f"titans_lmm: fwd+bwd >= {_TITANS_TARGET_SPEEDUP:g}x faster than titans-pytorch "
         f"NeuralMemory(dim=256, chunk_size=64, heads=4) at B=1, T={tt}",
         comparisons.get("titans_lmm vs titans_pytorch", {}).get("speedup", {}).get(tt),
         _TITANS_TARGET_SPEEDUP, True,
         f"not measured (titans_lmm: {out['titans_lmm'].get('status', 'timed')}; "
         f"titans_pytorch: {out['titans_pytorch'].get('status', 'timed')}; or a T={tt} "
         f"point skipped)", titans_fields)
  return {"layers": out, "comparisons": comparisons, "targets": targets,
          "all_targets_pass": all(tg["pass"] is True for tg in targets)}


def _plot_layers(report, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  # a peer is drawn in its lcm counterpart's colour, dashed (dotted: the matched variant)
  counterpart = {"mamba2_jax": "mamba2", "titans_pytorch": "titans_lmm",
                 "titans_pytorch_matched": "titans_lmm"}
  colours = {}
  for i, name in enumerate(n for n in report["result"]["layers"] if n not in counterpart):
    colours[name] = f"C{i}"
  for name, r in report["result"]["layers"].items():
    pts = sorted((int(t), p["ms"]) for t, p in r.get("points", {}).items() if p.get("ms"))
    if not pts:
      continue
    ex = r.get("scaling_exponent", {}).get("value")
    peer = name in counterpart
    label = f"{name} ({'peer' if peer else 'lcm'})" + (
        f", T^{ex:.2f}" if ex is not None else "")
    style = ("s:" if name.endswith("matched") else "s--") if peer else "o-"
    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label,
            color=colours.get(counterpart.get(name, name)))
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length T")
  ax.set_ylabel("fwd+bwd ms (batch 1)")
  ax.legend(fontsize=7)
  ax.set_title(f"d_model {report['d_model']}, fp32, {report['backend']}, "
               f"{report['threads']} threads", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main_layers():
  ints = lambda v: [int(t) for t in v]
  load_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
  result = layer_benchmark(
      batch=1, d_model=_L_D_MODEL.value, d_state=_L_D_STATE.value, head_dim=_L_HEAD_DIM.value,
      expand=_L_EXPAND.value, chunk_size=_L_CHUNK.value, titans_heads=_L_TITANS_HEADS.value,
      titans_chunk=_L_TITANS_CHUNK.value, mamba2_lengths=ints(_L_LENGTHS.value),
      peer_lengths=ints(_L_PEER_LENGTHS.value), ssm_lengths=ints(_L_SSM_LENGTHS.value),
      titans_lengths=ints(_L_TITANS_LENGTHS.value), peers=_L_PEERS.value,
      repeats=_REPEATS.value, max_call_seconds=_MAX_CALL_S.value,
      max_temp_bytes=int(_L_MAX_TEMP.value * 2**30), only=_L_ONLY.value or None)
  report = {"what": "layers", "batch": 1, "d_model": _L_D_MODEL.value, "dtype": "float32",
            "repeats": _REPEATS.value,
            "timing": ("ms of grad(sum(y)) w.r.t. the layer's parameters and x ~ N(0,1) "
                       "[1, T, d_model] (fwd+bwd): JAX jitted, compiled and warmed up first; "
                       "torch autograd loss.backward(); median (and min) of --repeats rounds "
                       "over all cases interleaved in one process, each timed call right "
                       "after an untimed call of the same case"),
            "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "threads": cpu_threads(),
            "threads_note": ("XLA:CPU runs its intra-op pool on the schedulable cores; torch "
                             "is set to the same number (torch.set_num_threads)"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]},
            "result": result}
  _write(report, lambda path: _plot_layers(report, path))


def _plot_kernels(report, path):
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


def _plot(result, contexts, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
  for name, r in result.items():
    a1.plot(contexts, [r[str(c)]["ms_per_token"] for c in contexts], "o-", label=name)
    a2.plot(contexts, [r[str(c)]["state_bytes"] / 2**20 for c in contexts], "o-", label=name)
  for a, y in ((a1, "ms / token (batch 1)"), (a2, "decode state (MiB)")):
    a.set_xscale("log", base=2)
    a.set_xlabel("context length")
    a.set_ylabel(y)
    a.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _write(report, plot):
  print(json.dumps(report, indent=2))
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value + ".json", "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    plot(_OUT.value + ".png")


def main_kernels():
  lengths = [int(t) for t in _LENGTHS.value]
  result = kernel_benchmark(
      _OPS.value, lengths, batch=_BATCH.value, heads=_HEADS.value, head_dim=_HEAD_DIM.value,
      chunk_size=_CHUNK.value, repeats=_REPEATS.value,
      reference_max_len=_REF_MAX.value, dense_max_len=_DENSE_MAX.value,
      max_call_seconds=_MAX_CALL_S.value, fit_from=_FIT_FROM.value,
      matmul_size=_MATMUL_N.value, lr_decay=_LR_DECAY.value)
  report = {"what": "kernels", "batch": _BATCH.value, "heads": _HEADS.value,
            "head_dim": _HEAD_DIM.value, "chunk_size": _CHUNK.value, "dtype": "float32",
            "lengths": lengths, "repeats": _REPEATS.value,
            "timing": ("ms of jitted jax.grad(sum(out * w_o) + sum(final_state * w_s)) "
                       "w.r.t. every input (fwd+bwd), compiled and warmed up first; median "
                       "(and min) of --repeats rounds over all cases interleaved in one "
                       "process, each timed call right after an untimed call of the same "
                       "case"),
            "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "result": result}
  _write(report, lambda path: _plot_kernels(report, path))


# ----------------------------------------------------------------------------------
# --what=swa
# ----------------------------------------------------------------------------------

# The issue's target (issue 6 item 4): block-sparse sliding-window attention fwd+bwd >= 10x
# faster than dense causal attention at T = 16k, on this CPU.
_SWA_TARGET_T = 16384
_SWA_TARGET_SPEEDUP = 10.0


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


def _available_bytes() -> int | None:
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _dense_query_block(b, t, h, requested, available):
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
  from kernels.block_sparse import (block_sparse_attention,  # pylint: disable=g-import-not-at-top
                                    sliding_window_blocks)
  b, t, h, d = batch, seq_len, heads, head_dim
  if available_bytes is None:
    available_bytes = _available_bytes()
  qb, dense_note = _dense_query_block(b, t, h, dense_query_block, available_bytes)
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
    cases[name] = compiled
  times = {name: [] for name in cases}
  order = list(cases)
  for r in range(repeats):  # interleaved, alternating order: noise hits both alike
    for name in (order if r % 2 == 0 else order[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(cases[name](qkv, w))
      times[name].append((time.perf_counter() - t0) * 1e3)
  for name, ts in times.items():
    info[name].update(ms=float(np.median(ts)), min_ms=float(np.min(ts)), runs=len(ts),
                      all_ms=[round(x, 3) for x in ts])
  sparse_ms, dense_ms = info["block_sparse_swa"]["ms"], info["dense_causal"]["ms"]
  speedup = dense_ms / sparse_ms
  info["block_sparse_swa"].update(
      window=window, block_size=block_size, impl=impl, max_blocks_per_query_block=max_blocks,
      keys_scored_per_query=max_blocks * block_size)
  info["dense_causal"].update(query_block=qb, keys_scored_per_query=t, note=dense_note)
  tg = {"target": (f"block-sparse SWA fwd+bwd >= {_SWA_TARGET_SPEEDUP:g}x faster than dense "
                   f"causal attention at T={_SWA_TARGET_T}"),
        "value": speedup, "threshold": _SWA_TARGET_SPEEDUP,
        "pass": bool(speedup >= _SWA_TARGET_SPEEDUP) if t == _SWA_TARGET_T else None}
  if t != _SWA_TARGET_T:
    tg["note"] = f"not a target measurement: T={t}, the issue's is T={_SWA_TARGET_T}"
  return {"cases": info, "speedup": speedup,
          "speedup_is": "dense_causal ms / block_sparse_swa ms (median of each)",
          "targets": [tg], "all_targets_pass": tg["pass"] is True}


def main_swa():
  t = _SWA_T.value
  result = swa_benchmark(seq_len=t, batch=_SWA_B.value, heads=_SWA_H.value,
                         head_dim=_SWA_D.value, window=_SWA_WINDOW.value,
                         block_size=_SWA_BLOCK.value, repeats=_REPEATS.value,
                         impl=_SWA_IMPL.value, dense_query_block=_SWA_DENSE_QB.value)
  report = {"what": "swa", "seq_len": t, "batch": _SWA_B.value, "heads": _SWA_H.value,
            "head_dim": _SWA_D.value, "window": _SWA_WINDOW.value,
            "block_size": _SWA_BLOCK.value, "dtype": "float32", "repeats": _REPEATS.value,
            "timing": ("ms of jitted jax.grad(sum(attn(q, k, v) * w)) w.r.t. q, k, v "
                       "(fwd+bwd), compiled and warmed up first; median (and min) of "
                       "--repeats rounds, the two cases interleaved in one process"),
            "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "notes": [result["cases"]["dense_causal"]["note"]],
            "result": result}
  _write(report, lambda path: None)


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def _with_huge_pages() -> None:
  """Re-executes this command with glibc's malloc asking for transparent huge pages
  (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35; ignored elsewhere), unless the
  variable already names that tunable.

  Why: XLA:CPU takes each call's temporaries (100+ MB for a layer's fwd+bwd at T=4096)
  from fresh ``mmap``ed memory, so with 4 KiB pages every call page-faults all of it
  again. Measured in session 11 (mamba2 vs mamba2-jax, T=4096, same process): 1.9M minor
  faults -> 88k for the whole run, mamba2 120 -> 85 ms, mamba2-jax 230 -> 176 ms, and the
  run-to-run spread of the medians shrank from ~+-10% to ~+-2% (the ratio stayed ~2.07).
  Kernel THP must be ``always`` or ``madvise`` (``/sys/kernel/mm/transparent_hugepage``).
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGE_PAGES_TUNABLE)
                                                 if t))
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def main(argv):
  if _HUGE.value:
    _with_huge_pages()
  logging.set_verbosity(logging.WARNING)
  modes = ("decode", "kernels", "layers", "swa")
  if len(argv) > 2 or (len(argv) == 2 and argv[1] not in modes):
    raise app.UsageError(f"one optional positional argument, one of {', '.join(modes)}; "
                         f"got {argv[1:]}")
  what = argv[1] if len(argv) == 2 else _WHAT.value
  if what == "kernels":
    main_kernels()
    return
  if what == "layers":
    main_layers()
    return
  if what == "swa":
    main_swa()
    return
  contexts = [int(c) for c in _CONTEXTS.value]
  result = decode_benchmark(_MIXERS.value, contexts, d_model=_D_MODEL.value,
                            num_layers=_LAYERS.value, tokens=_TOKENS.value,
                            repeats=_REPEATS.value, level=_DECODE_LEVEL.value)
  report = {"what": "decode", "level": _DECODE_LEVEL.value, "d_model": _D_MODEL.value,
            "num_layers": _LAYERS.value, "batch": 1, "backend": jax.default_backend(),
            "load_average": os.getloadavg()[0], "result": result}
  _write(report, lambda path: _plot(result, contexts, path))


if __name__ == "__main__":
  app.run(main)
