"""``python -m experiments.bench context_parallel``: per-device memory of one mixer layer's
forward + backward with its sequence split over ``sequence`` = 1, 2, 4, 8 devices.

    JAX_NUM_CPU_DEVICES=8 python -m experiments.bench context_parallel \
        --out=results/context_parallel

For each mixer (``--cp_mixers``) and each split n (``--cp_sizes``), ``jax.grad`` of a loss
on the mixer's output w.r.t. its input and parameters is compiled (not run) for one row of
``--cp_seq_len`` tokens (65,536) of width ``--cp_d_model`` on a mesh ``(sequence,) = (n,)``,
traced inside ``layers.context_parallel.sequence_context`` as the trainer does, and
``Compiled.memory_analysis()`` gives the per-device bytes: ``temp`` (activations and
scratch: what the split is for), ``argument`` and ``output``. The report gives each n's
temp as a fraction of n = 1's and issue 27's target (n = 8: <= 0.2x for attention and every
recurrent mixer) with pass / fail. With ``--cp_budget_mb`` > 0 it also finds, per mixer
and n, the longest T of the form ``--cp_search_from x 2^k`` (up to ``--cp_search_to``)
whose temp fits the budget: starting from the T that linear scaling of the measured temp
predicts, doubling while it fits, else halving (about two compiles per mixer and n when
memory is linear in T); the plot then has a second panel.

Compile-only, so it runs on CPU with simulated devices (``JAX_NUM_CPU_DEVICES``) and says
what the partitioned program holds per device; step time needs n real devices (simulated
CPU devices share this machine's cores), so it is not measured here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from experiments.bench import common
from layers import context_parallel
from lcm import registry

_MIXERS = flags.DEFINE_list(
    "cp_mixers", ["attention", "swa", "mamba2", "gla", "gated_deltanet", "mamba", "s4d",
                  "titans_lmm"], "Mixers (context_parallel; also landmark, titans_mac, "
    "memory_caching: results/context_parallel_more).")
_SIZES = flags.DEFINE_list("cp_sizes", ["1", "2", "4", "8"], "Splits n (context_parallel).")
_T = flags.DEFINE_integer("cp_seq_len", 65536, "Tokens per row (context_parallel).")
_D = flags.DEFINE_integer("cp_d_model", 64, "Model width (context_parallel).")
_BUDGET = flags.DEFINE_integer("cp_budget_mb", 0,
                               "Per-device temp budget for the longest-T search; 0 = off.")
_SEARCH_FROM = flags.DEFINE_integer("cp_search_from", 4096,
                                    "Smallest T of the search (T = this x 2^k).")
_SEARCH_TO = flags.DEFINE_integer("cp_search_to", 1 << 20, "Last T of the search.")

CODE = ("layers", "kernels", "experiments/bench")

# Small heads and chunk sizes that every split of the default T divides.
OVERRIDES = {
    "attention": {"num_heads": 2},
    "swa": {"num_heads": 2, "window": 256, "block_size": 64},
    "mamba2": {"d_state": 16, "head_dim": 16, "chunk_size": 64},
    "gla": {"num_heads": 2, "chunk_size": 64},
    "gated_deltanet": {"num_heads": 2, "chunk_size": 64},
    "deltanet": {"num_heads": 2, "chunk_size": 64},
    "mamba": {"d_state": 8, "chunk_size": 64},
    "titans_lmm": {"num_heads": 2, "chunk_size": 16},
    # Blocks of 64 positions (the paper: 50, which 65,536 / 8 is not a multiple of);
    # the exact grouped softmax below 512 positions, top-4 retrieval beyond.
    "landmark": {"num_heads": 2, "block_size": 64, "exact_len": 512, "top_k": 4},
    "titans_mac": {"num_heads": 2, "chunk_size": 16, "segment_len": 64, "attn_heads": 2},
    # GLA inner; 256 cached segments (the aggregation is dense over them).
    "memory_caching": {"num_heads": 2, "chunk_size": 64, "segment_len": 256},
}
TARGET_N, TARGET_FRACTION = 8, 0.2


def memory(name: str, n: int, seq_len: int, d_model: int) -> dict[str, int]:
  """Per-device bytes of the compiled fwd + bwd of mixer ``name`` split over n devices."""
  devices = jax.devices()
  if len(devices) < n:
    raise SystemExit(f"context_parallel: --cp_sizes has {n} but there are {len(devices)} "
                     f"devices; on CPU set JAX_NUM_CPU_DEVICES={n}")
  mesh = Mesh(np.asarray(devices[:n]), (context_parallel.AXIS,),
              axis_types=(AxisType.Auto,))
  mixer = registry.create(name, d_model=d_model, rngs=nnx.Rngs(0), **OVERRIDES.get(name, {}))
  graphdef, params = nnx.split(mixer)
  params = nnx.to_pure_dict(params)

  def loss(params, x):
    with context_parallel.sequence_context(mesh):
      y = nnx.merge(graphdef, params)(x)
    return jnp.mean(y.astype(jnp.float32) ** 2)

  x = jax.ShapeDtypeStruct((1, seq_len, d_model), jnp.float32,
                           sharding=NamedSharding(mesh, P(None, context_parallel.AXIS)))
  p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                  sharding=NamedSharding(mesh, P())), params)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(p, x).compile()
  ma = compiled.memory_analysis()
  return {"temp": int(ma.temp_size_in_bytes), "argument": int(ma.argument_size_in_bytes),
          "output": int(ma.output_size_in_bytes)}


def longest_fit(name: str, n: int, d_model: int, budget: int, start: int, stop: int,
                guess: int | None = None):
  """The largest T = start * 2^k <= stop whose temp fits in ``budget`` bytes (None if not
  even ``start``). ``guess`` (a T of that form, e.g. predicted from a measured temp by
  linear scaling) is tried first: doubling from it while it fits, else halving until it
  fits, so a mixer whose memory is linear in T costs about two compiles."""
  fits = lambda t: memory(name, n, t, d_model)["temp"] <= budget
  t = min(max(guess or start, start), stop)
  if fits(t):
    while t * 2 <= stop and fits(t * 2):
      t *= 2
    return t
  while t > start:
    t //= 2
    if fits(t):
      return t
  return None


def linear_guess(seq_len: int, temp: int, budget: int, start: int) -> int:
  """start * 2^k nearest below the T where temp would reach ``budget`` if linear in T."""
  target = seq_len * budget / max(temp, 1)
  t = start
  while t * 2 <= target:
    t *= 2
  return t


def context_parallel_benchmark(mixers, sizes, seq_len, d_model, budget_mb=0,
                               search_from=4096, search_to=1 << 20) -> dict:
  rows = {}
  for name in mixers:
    per_n = {n: memory(name, n, seq_len, d_model) for n in sizes}
    base = per_n[sizes[0]]["temp"]
    rows[name] = {str(n): dict(m, temp_mib=round(m["temp"] / 2**20, 1),
                               temp_fraction=m["temp"] / base) for n, m in per_n.items()}
    if budget_mb:
      for n in sizes:
        guess = linear_guess(seq_len, per_n[n]["temp"], budget_mb << 20, search_from)
        rows[name][str(n)]["longest_T_in_budget"] = longest_fit(
            name, n, d_model, budget_mb << 20, search_from, search_to, guess)
  target = None
  if sizes[0] == 1 and TARGET_N in sizes:
    worst = {k: v[str(TARGET_N)]["temp_fraction"] for k, v in rows.items()}
    target = {"n": TARGET_N, "max_fraction": TARGET_FRACTION, "fractions": worst,
              "met": {k: f <= TARGET_FRACTION for k, f in worst.items()}}
  return {"benchmark": "context_parallel", "seq_len": seq_len, "d_model": d_model, "batch": 1,
          "sizes": list(sizes), "budget_mb": budget_mb, "mixers": rows, "target": target,
          "machine": common.machine(),
          "notes": "Compiled (not run) jax.grad of mean(y^2) w.r.t. params and x, one mixer "
                   "layer, mesh (sequence,) = (n,), bytes per device from "
                   "Compiled.memory_analysis(); temp = activations and scratch. Step time "
                   "is not measured: simulated CPU devices share the machine's cores."}


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  search = bool(report.get("budget_mb"))
  fig, axes = plt.subplots(1, 2 if search else 1, figsize=(11 if search else 6, 4),
                           squeeze=False)
  ax = axes[0, 0]
  sizes = report["sizes"]
  for name, row in report["mixers"].items():
    ax.plot(sizes, [row[str(n)]["temp"] / 2**20 for n in sizes], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence split n (devices)")
  ax.set_ylabel("per-device temp memory (MiB)")
  ax.set_title(f"one layer fwd+bwd, T = {report['seq_len']:,}")
  ax.legend(fontsize=7)
  if search:
    ax = axes[0, 1]
    for name, row in report["mixers"].items():
      ts = [row[str(n)].get("longest_T_in_budget") for n in sizes]
      ax.plot(sizes, [t if t else float("nan") for t in ts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence split n (devices)")
    ax.set_ylabel("longest T (tokens)")
    ax.set_title(f"longest T within {report['budget_mb']} MiB temp per device")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  sizes = [int(s) for s in _SIZES.value]
  report = context_parallel_benchmark(_MIXERS.value, sizes, _T.value, _D.value,
                                      _BUDGET.value, _SEARCH_FROM.value, _SEARCH_TO.value)
  common.write_report(report, code=CODE, plot=lambda path: plot(report, path))
