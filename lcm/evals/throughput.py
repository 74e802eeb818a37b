"""Throughput helpers shared by the benchmarks: a layer's jitted fwd+bwd, and where its time
goes (XLA ops ranked by measured time, from a ``jax.profiler`` trace read with xprof).

``op_profile`` needs xprof (``pip install xprof``; in the ``bench`` extra). It is imported
only when called.
"""

from __future__ import annotations

import collections
import glob
import json
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Host-side trace events that are not XLA ops (the runtime's own spans, Python frames).
_NOT_OPS = ("Thread", "Thunk", "$", "Pjit", "Common", "PjRt", "ExecuteHelper")


def count(tree) -> int:
  """Number of elements in a pytree's leaves."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def layer_grad(module, call):
  """``(f, params, n_params)``: ``f(params, x)`` is the jitted ``jax.grad`` of
  ``sum(call(module, x))`` w.r.t. the module's ``nnx.Param``s and ``x`` (the module is split
  once into pure dicts and merged inside the trace)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def loss(params, x):
    return jnp.sum(call(nnx.merge(graphdef, params, rest), x).astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params, count(params)


def hlo_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """``{instruction name: (output shape, op_name)}`` from optimised HLO text (the names the
  profiler's events carry; ``op_name`` is the JAX operation that produced it)."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]*)"', line)
    out[m.group(1)] = (m.group(2), op.group(1) if op else "")
  return out


def rank_events(events, runs: int) -> list[dict]:
  """Trace events (``{"ph": "X", "name", "dur"}``, dur in us) -> ``[{"op", "ms", "calls"}]``
  by total time, per traced call (ops inside a loop body count once per iteration)."""
  dur, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not str(e.get("name", "")).startswith(_NOT_OPS):
      dur[e["name"]] += e.get("dur", 0)
      calls[e["name"]] += 1
  return [{"op": n, "ms": t / runs / 1e3, "calls": calls[n] / runs}
          for n, t in dur.most_common()]


def op_profile(run, runs: int = 5, hlo_text: str = "") -> list[dict]:
  """The XLA ops of ``run()`` (a blocking call, already compiled and warm) ranked by time per
  call; with ``hlo_text`` (``compiled.as_text()``) each gets its ``shape`` and ``source``."""
  from xprof.convert import raw_to_tool_data  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(runs):
        run()
    paths = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
  ops = rank_events(json.loads(data)["traceEvents"], runs)
  meta = hlo_metadata(hlo_text)
  for o in ops:
    o["shape"], o["source"] = meta.get(o["op"], ("", ""))
  return ops
