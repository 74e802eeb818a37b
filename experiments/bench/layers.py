"""``python -m experiments.bench layers`` (or ``--what=layers``): whole lcm mixers vs the
published peers (``experiments.bench.peers``).

    python -m experiments.bench layers --repeats=3 --out=results/bench_layers
    python -m experiments.bench layers --layers_only=mamba2,mamba2_jax --repeats=9 \
        --out=results/bench_layers_mamba2

Forward + backward time (jitted ``jax.grad`` of ``sum(y)`` w.r.t. the layer's parameters and
its input ``x``, compiled and warmed up first) of whole registered mixers at batch 1, fp32,
against published peers timed in the same process, all cases interleaved:

  * ``mamba2`` (d_model 256, d_state 64, head_dim 64, expand 2, chunk 256, ngroups 1,
    d_conv 4, ``impl="xla"``) at ``--layers_lengths`` (4k..64k; the scaling exponent is fit
    over them) vs the pure-JAX ``mamba2-jax`` ``Mamba2Mixer`` at the same config at
    ``--layers_peer_lengths``;
  * ``s4d`` and ``mamba`` (same d_model and d_state; Mamba expand 2) at
    ``--layers_ssm_lengths`` (Mamba's [B, T, d_inner, d_state] scan states make its longer
    points exceed ``--layers_max_temp_gib``: skipped, with a note);
  * ``titans_lmm`` (4 heads, chunk 64) vs ``titans-pytorch``'s ``NeuralMemory`` as named in
    the issue and matched to lcm's layer (``titans_pytorch_matched``). ``titans_lmm`` is
    timed only when registered.

A peer that is not installed is reported as such. Points whose compiled temporaries exceed
``--layers_max_temp_gib`` are skipped with a note. Writes JSON (+ a log-log PNG of ms vs T)
with ms, tokens/s, parameter counts, speed-up ratios (peer ms / lcm ms), the exponent and
the issues' targets (pass / fail / None when not measured).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from experiments.bench import common, peers as peers_lib
from lcm import registry
from lcm.evals import throughput

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

# What the figures depend on (lcm.provenance): the layers, their kernels, the bench.
CODE = ("kernels", "layers", "experiments/bench")

# The issues' targets: issue 5 item 3 (mamba2 fwd+bwd at B=1, T=4096, d_model 256, d_state
# 64, head_dim 64, expand 2, chunk 256 >= 2x faster than mamba2-jax's Mamba2Mixer at the
# same config; time ~ T^p with p <= 1.1 from 4k to 64k) and issue 7 item 4 (titans_lmm
# fwd+bwd at B=1, T=4096, d_model 256, 4 heads, chunk 64 >= 10x faster than titans-pytorch's
# NeuralMemory(dim=256, chunk_size=64, heads=4)).
TARGET_T = 4096
EXPONENT_SPAN = (4096, 65536)
MAMBA2_TARGET_SPEEDUP = 2.0
MAMBA2_TARGET_EXPONENT = 1.1
TITANS_TARGET_SPEEDUP = 10.0
ISSUE_CONFIG = {"batch": 1, "d_model": 256, "d_state": 64, "head_dim": 64, "expand": 2,
                "chunk_size": 256, "titans_heads": 4, "titans_chunk": 64}


def titans_overrides(heads: int, chunk: int) -> dict:
  """titans_lmm's Config fields for the head count and the chunk size."""
  return {"num_heads": heads, "chunk_size": chunk}


def lcm_series(*, d_model, d_state, head_dim, expand, chunk_size, titans_heads,
               titans_chunk, mamba2_lengths, ssm_lengths, titans_lengths):
  """lcm's timed series: ``{key: spec}``; a spec is ``{"status": why}`` (not timed) or has
  ``kind`` ("jax"), ``lengths``, ``build() -> (module, call, info)``."""
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
        "titans_lmm", titans_overrides(titans_heads, titans_chunk), titans_lengths)
  else:
    series["titans_lmm"] = {"status": "not registered (lcm.registry.names() has no "
                                      "'titans_lmm')"}
  return series


def _prepare_point(spec, module, f, params, x, *, max_call_seconds, max_temp_bytes,
                   compiler_options):
  """``(run, point)`` of one length: the blocking fwd+bwd call (None when the point is not
  timed in the rounds) and its record (compile time, temporaries, or why it was skipped)."""
  if spec["kind"] == "jax":
    t0 = time.perf_counter()
    compiled = f.lower(params, x).compile(compiler_options)
    p = {"compile_s": round(time.perf_counter() - t0, 3)}
    mem = compiled.memory_analysis()
    if mem is not None:
      p["temp_bytes"] = int(mem.temp_size_in_bytes)
      if mem.temp_size_in_bytes > max_temp_bytes:
        return None, {**p, "skipped": (
            f"compiled temporaries {mem.temp_size_in_bytes / 2**30:.1f} GiB > "
            f"--layers_max_temp_gib={max_temp_bytes / 2**30:g}")}
    run = lambda: jax.block_until_ready(compiled(params, x))
  else:
    run, p = peers_lib.torch_runner(module, x), {}
  t0 = time.perf_counter()
  run()  # warm-up
  first_s = time.perf_counter() - t0
  if first_s > max_call_seconds:  # too slow for the rounds: one more call, timed
    t0 = time.perf_counter()
    run()
    p.update(ms=(time.perf_counter() - t0) * 1e3, runs=1, note=(
        f"timed once, right after the warm-up call, which took {first_s:.1f} s > "
        f"--max_call_seconds={max_call_seconds:g}"))
    return None, p
  return run, p


def layer_benchmark(*, batch=1, d_model=256, d_state=64, head_dim=64, expand=2,
                    chunk_size=256, titans_heads=4, titans_chunk=64,
                    mamba2_lengths=(4096, 8192, 16384, 32768, 65536), peer_lengths=(4096,),
                    ssm_lengths=(4096,), titans_lengths=(4096,), peers=True, repeats=3,
                    max_call_seconds=120.0, max_temp_bytes=8 * 2**30, seed=0,
                    compiler_options=None, only=None):
  """fwd+bwd ms / tokens/s / parameter counts of lcm's mamba2, s4d, mamba, titans_lmm and
  the installed peers, peer-to-lcm speed-ups, mamba2's scaling exponent and the targets.

  Every case is ``grad(sum(y))`` w.r.t. the parameters and ``x ~ N(0, 1)`` ``[batch, T,
  d_model]`` fp32: jitted and compiled first for JAX (``kernels``' protocol), the autograd
  ``backward()`` for torch; then ``repeats`` rounds over all cases interleaved, each timed
  call right after an untimed call of the same case; ms is the median.
  ``compiler_options`` go to XLA's ``compile`` (tests pass a fast, unoptimised setting).
  ``only``: the series keys to time (default all: ``mamba2``, ``s4d``, ``mamba``,
  ``titans_lmm``, ``mamba2_jax``, ``titans_pytorch``, ``titans_pytorch_matched``).
  """
  dims = dict(d_model=d_model, d_state=d_state, head_dim=head_dim, expand=expand,
              chunk_size=chunk_size, titans_heads=titans_heads, titans_chunk=titans_chunk,
              titans_lengths=titans_lengths)
  series = lcm_series(mamba2_lengths=mamba2_lengths, ssm_lengths=ssm_lengths, **dims)
  series.update(peers_lib.peer_series(peer_lengths=peer_lengths, peers=peers, **dims))
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
    f = params = None
    if spec["kind"] == "jax":
      f, params, n_params = throughput.layer_grad(module, call)
    else:
      n_params = peers_lib.torch_params(module)
    out[name] = {**info, "params": n_params, "points": points}
    for t in spec["lengths"]:
      key, kx = jax.random.split(key)
      x = jax.random.normal(kx, (batch, t, d_model), jnp.float32)
      try:
        run, p = _prepare_point(spec, module, f, params, x,
                                max_call_seconds=max_call_seconds,
                                max_temp_bytes=max_temp_bytes,
                                compiler_options=compiler_options)
      except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory)
        points[str(t)] = {"skipped": f"failed: {type(e).__name__}: {str(e)[:300]}"}
        continue
      points[str(t)] = p
      if run is not None:
        cases[(name, t)] = run

  # untimed call first: the previous case left cold caches (and the other runtime's threads)
  for (name, t), ts in common.time_interleaved(cases, repeats).items():
    out[name]["points"][str(t)].update(common.summary(ts))
  for r in out.values():
    for t, p in r.get("points", {}).items():
      if p.get("ms"):
        p["tokens_per_s"] = batch * int(t) / (p["ms"] * 1e-3)
    fit = {int(t): p["ms"] for t, p in r.get("points", {}).items() if p.get("ms")}
    if len(fit) >= 2:
      r["scaling_exponent"] = {"value": common.fit_exponent(fit), "lengths": sorted(fit),
                               "fit": "least squares of log(ms) vs log(T), fwd+bwd"}
  issue_config = {"batch": batch, **{k: v for k, v in dims.items() if k in ISSUE_CONFIG}}
  comparisons = _comparisons(out)
  targets = _targets(out, comparisons, issue_config)
  return {"layers": out, "comparisons": comparisons, "targets": targets,
          "all_targets_pass": all(tg["pass"] is True for tg in targets)}


def _comparisons(out):
  """Peer ms / lcm ms per length, for each (lcm layer, peer) pair that was timed."""
  def ms(name, t):
    return out.get(name, {}).get("points", {}).get(str(t), {}).get("ms")

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
  return comparisons


def _targets(out, comparisons, issue_config):
  """The issues' targets, pass / fail, or None (with a note) when not measured."""
  targets = []

  def target(text, value, threshold, higher_is_better, why_none, fields):
    off = [k for k in fields if issue_config[k] != ISSUE_CONFIG[k]]
    ok = None
    if value is not None and not off:
      ok = bool(value >= threshold) if higher_is_better else bool(value <= threshold)
    tg = {"target": text, "value": value, "threshold": threshold, "pass": ok}
    if off:
      tg["note"] = (f"not a target measurement: this run's {', '.join(off)} differ from the "
                    f"issue's ({', '.join(f'{k}={ISSUE_CONFIG[k]}' for k in off)})")
    elif ok is None:
      tg["note"] = why_none
    targets.append(tg)

  mamba2_fields = ("batch", "d_model", "d_state", "head_dim", "expand", "chunk_size")
  titans_fields = ("batch", "d_model", "titans_heads", "titans_chunk")

  tt = str(TARGET_T)
  target(f"mamba2: fwd+bwd >= {MAMBA2_TARGET_SPEEDUP:g}x faster than mamba2-jax "
         f"Mamba2Mixer at B=1, T={tt}, d_model 256, d_state 64, head_dim 64, expand 2, "
         f"chunk 256", comparisons.get("mamba2 vs mamba2_jax", {}).get("speedup", {}).get(tt),
         MAMBA2_TARGET_SPEEDUP, True,
         f"not measured (peer not installed, or a T={tt} point skipped)", mamba2_fields)
  ex = out["mamba2"].get("scaling_exponent", {})
  lens = ex.get("lengths", [])
  spans = bool(lens) and lens[0] <= EXPONENT_SPAN[0] and lens[-1] >= EXPONENT_SPAN[1]
  target(f"mamba2: fwd+bwd scaling exponent <= {MAMBA2_TARGET_EXPONENT:g} over "
         f"T={EXPONENT_SPAN[0]}..{EXPONENT_SPAN[1]}",
         ex.get("value") if spans else None, MAMBA2_TARGET_EXPONENT, False,
         f"not measured: fit over T={lens} does not span {EXPONENT_SPAN}", mamba2_fields)
  target(f"titans_lmm: fwd+bwd >= {TITANS_TARGET_SPEEDUP:g}x faster than titans-pytorch "
         f"NeuralMemory(dim=256, chunk_size=64, heads=4) at B=1, T={tt}",
         comparisons.get("titans_lmm vs titans_pytorch", {}).get("speedup", {}).get(tt),
         TITANS_TARGET_SPEEDUP, True,
         f"not measured (titans_lmm: {out['titans_lmm'].get('status', 'timed')}; "
         f"titans_pytorch: {out['titans_pytorch'].get('status', 'timed')}; or a T={tt} "
         f"point skipped)", titans_fields)
  return targets


def plot(report, path):
  """Log-log fwd+bwd ms vs T: lcm's layers solid, each peer dashed in its counterpart's
  colour (dotted: the matched variant)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  counterpart = peers_lib.COUNTERPART
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


def main():
  ints = lambda v: [int(t) for t in v]
  load_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
  result = layer_benchmark(
      batch=1, d_model=_L_D_MODEL.value, d_state=_L_D_STATE.value, head_dim=_L_HEAD_DIM.value,
      expand=_L_EXPAND.value, chunk_size=_L_CHUNK.value, titans_heads=_L_TITANS_HEADS.value,
      titans_chunk=_L_TITANS_CHUNK.value, mamba2_lengths=ints(_L_LENGTHS.value),
      peer_lengths=ints(_L_PEER_LENGTHS.value), ssm_lengths=ints(_L_SSM_LENGTHS.value),
      titans_lengths=ints(_L_TITANS_LENGTHS.value), peers=_L_PEERS.value,
      repeats=common.REPEATS.value, max_call_seconds=common.MAX_CALL_S.value,
      max_temp_bytes=int(_L_MAX_TEMP.value * 2**30), only=_L_ONLY.value or None)
  report = {"what": "layers", "batch": 1, "d_model": _L_D_MODEL.value, "dtype": "float32",
            "repeats": common.REPEATS.value,
            "timing": ("ms of grad(sum(y)) w.r.t. the layer's parameters and x ~ N(0,1) "
                       "[1, T, d_model] (fwd+bwd): JAX jitted, compiled and warmed up first; "
                       "torch autograd loss.backward(); median (and min) of --repeats rounds "
                       "over all cases interleaved in one process, each timed call right "
                       "after an untimed call of the same case"),
            "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "threads": common.cpu_threads(),
            "threads_note": ("XLA:CPU runs its intra-op pool on the schedulable cores; torch "
                             "is set to the same number (torch.set_num_threads)"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]},
            "result": result}
  common.write_report(report, code=CODE, plot=lambda path: plot(report, path))
