"""lcm.evals.throughput: the layer-gradient helper and the op profiler's parsing."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcm import registry
from lcm.evals import throughput


def test_layer_grad_is_the_gradient_of_the_summed_output():
  module = registry.create("linear_attention", d_model=8, rngs=nnx.Rngs(0))
  f, params, n = throughput.layer_grad(module, lambda m, x: m(x))
  assert n == throughput.count(params) == sum(np.size(p) for p in jax.tree.leaves(params))
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 8))
  _, dx = f(params, x)
  eps = 1e-3  # central difference along one input coordinate
  e = jnp.zeros_like(x).at[0, 2, 3].set(eps)
  fd = (jnp.sum(module(x + e)) - jnp.sum(module(x - e))) / (2 * eps)
  np.testing.assert_allclose(dx[0, 2, 3], fd, rtol=1e-2, atol=1e-3)


def test_hlo_metadata_maps_instructions_to_shapes_and_jax_ops():
  compiled = jax.jit(lambda a, b: jnp.sin(a @ b)).lower(
      jnp.ones((16, 32)), jnp.ones((32, 8))).compile()
  meta = throughput.hlo_metadata(compiled.as_text())
  shapes = {shape for shape, _ in meta.values()}
  assert any(s.startswith("f32[16,8]") for s in shapes), shapes
  sources = " ".join(src for _, src in meta.values())
  assert "sin" in sources and "dot_general" in sources, sources


def test_rank_events_sums_per_op_divides_by_runs_and_drops_runtime_spans():
  events = [{"ph": "X", "name": "fusion.1", "dur": 3000}, {"ph": "X", "name": "dot.2", "dur": 1000},
            {"ph": "X", "name": "fusion.1", "dur": 1000},
            {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
            {"ph": "X", "name": "$api.py:1 block_until_ready", "dur": 9000},
            {"ph": "i", "name": "dot.2", "dur": 5000}]
  ranked = throughput.rank_events(events, runs=2)
  assert [r["op"] for r in ranked] == ["fusion.1", "dot.2"]
  assert ranked[0]["ms"] == pytest.approx(2.0) and ranked[0]["calls"] == 1.0
  assert ranked[1]["ms"] == pytest.approx(0.5) and ranked[1]["calls"] == 0.5


@pytest.mark.skipif(importlib.util.find_spec("xprof") is None,
                    reason="xprof not installed (the bench extra)")
def test_op_profile_finds_the_matmul():
  a = jnp.ones((256, 256))
  f = jax.jit(lambda a: jnp.tanh(a @ a)).lower(a).compile()
  run = lambda: jax.block_until_ready(f(a))
  run()
  ops = throughput.op_profile(run, runs=2, hlo_text=f.as_text())
  assert ops and all(o["ms"] >= 0 for o in ops)
  assert any("dot" in o["source"] or o["op"].startswith("dot") for o in ops), ops
