"""experiments.bench: the kernel and layer benchmarks' bookkeeping at toy sizes (no timing
claims)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.bench import common, decode, swa
from experiments.bench import kernels as kernel_bench
from experiments.bench import layers as layer_bench
from lcm import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fit_exponent_recovers_power_law():
  pts = {t: 3.0 * t**1.5 for t in (4096, 8192, 16384, 32768)}
  assert abs(common.fit_exponent(pts) - 1.5) < 1e-9
  assert common.fit_exponent({1024: 1.0}) is None


def test_linear_recurrence_flops_counts_padded_chunks():
  # one chunk of 64, Dk = Dv = 64: forward 4 matmuls of 2 * 64^3, fwd + bwd = 3x
  assert kernel_bench.linear_recurrence_flops(1, 64, 1, 64, 64, 64) == 3 * 4 * 2 * 64**3
  # T = 65 pads to two chunks; batch and heads multiply
  assert (kernel_bench.linear_recurrence_flops(2, 65, 3, 64, 64, 64)
          == 2 * 3 * 2 * 3 * 4 * 2 * 64**3)


def test_kernel_benchmark_report_at_toy_sizes():
  r = kernel_bench.kernel_benchmark(
      ["linear_recurrence", "diagonal_recurrence"], [32, 64], batch=1, heads=1, head_dim=16,
      chunk_size=16, repeats=1, reference_max_len=32, dense_max_len=32,
      max_call_seconds=60.0, fit_from=32, matmul_size=32)
  lr = r["ops"]["linear_recurrence"]
  assert lr["xla"]["32"]["ms"] > 0 and lr["xla"]["64"]["ms"] > 0
  assert "skipped" in lr["reference"]["64"] and "ms" in lr["reference"]["32"]
  assert "skipped" in r["dense_attention"]["64"] and "ms" in r["dense_attention"]["32"]
  assert set(lr["speedup_vs_reference"]) == {"32"}
  assert np.isfinite(lr["scaling_exponent"]["value"])
  assert 0 < lr["gflops"]["64"]["fraction_of_matmul"]
  # the T=16384 targets are not measured at toy sizes: reported as such, not as passing
  speed = [t for t in r["targets"] if "faster than reference" in t["target"]]
  assert len(speed) == 2 and all(t["pass"] is None and "note" in t for t in speed)
  assert r["all_targets_pass"] is False


# ------------------------------------------------------------------ --what=layers (toy)

_FAST = {"xla_backend_optimization_level": 0}  # unoptimised CPU compiles: bookkeeping only
_TOY = dict(batch=1, d_model=32, d_state=8, head_dim=16, expand=2, chunk_size=8,
            titans_heads=2, titans_chunk=4, repeats=1, compiler_options=_FAST)


@pytest.fixture(scope="module")
def toy_layers():
  """mamba2 at two lengths, s4d at one and, when it is installed, the mamba2-jax peer; one
  call shared by the tests below. (mamba and titans_lmm go through the same code path as
  s4d; they are left out to save their compiles.)"""
  return layer_bench.layer_benchmark(mamba2_lengths=(16, 32), peer_lengths=(16,),
                                     ssm_lengths=(16,), titans_lengths=(16,),
                                     peers=("mamba2-jax",),
                                     only=("mamba2", "s4d", "mamba2_jax"), **_TOY)


def _n_params(name, **overrides):
  m = registry.create(name, d_model=32, rngs=nnx.Rngs(0), **overrides)
  return sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_layer_benchmark_lcm_layers_at_toy_sizes(toy_layers):
  r = toy_layers["layers"]
  m2 = r["mamba2"]
  assert set(m2["points"]) == {"16", "32"}
  for t, p in m2["points"].items():
    assert p["ms"] > 0 and p["runs"] == 1 and p["compile_s"] >= 0
    assert p["tokens_per_s"] == pytest.approx(int(t) / (p["ms"] * 1e-3))
  assert m2["config"]["impl"] == "xla" and m2["config"]["chunk_size"] == 8
  assert m2["params"] == _n_params("mamba2", d_state=8, head_dim=16, expand=2,
                                   chunk_size=8, impl="xla")
  assert m2["scaling_exponent"]["lengths"] == [16, 32]
  assert np.isfinite(m2["scaling_exponent"]["value"])
  assert set(r["s4d"]["points"]) == {"16"} and r["s4d"]["points"]["16"]["ms"] > 0
  assert "scaling_exponent" not in r["s4d"]  # one length: no fit
  assert r["s4d"]["params"] == _n_params("s4d", d_state=8, impl="xla")
  assert r["mamba"] == {"status": "not timed (not selected)"}
  if "titans_lmm" in registry.names():
    assert r["titans_lmm"] == {"status": "not timed (not selected)"}
  else:
    assert r["titans_lmm"]["status"].startswith("not registered")
  assert "points" in r["mamba2_jax"] or r["mamba2_jax"]["status"].startswith("not installed")
  for peer in ("titans_pytorch", "titans_pytorch_matched"):
    assert r[peer] == {"status": "not timed (peer not selected)"}
  assert "titans_lmm vs titans_pytorch" not in toy_layers["comparisons"]
  # toy sizes are not the issues' configs: every target is reported unmeasured, not passing
  assert len(toy_layers["targets"]) == 3
  assert all(t["pass"] is None and "issue's" in t["note"] for t in toy_layers["targets"])
  assert toy_layers["all_targets_pass"] is False


def test_layer_benchmark_mamba2_jax_peer_same_config(toy_layers):
  pytest.importorskip("mamba2_jax")
  ours, peer = toy_layers["layers"]["mamba2"], toy_layers["layers"]["mamba2_jax"]
  assert set(peer["points"]) == {"16"} and peer["points"]["16"]["ms"] > 0
  # the same architecture at the same config: identical parameter counts
  assert peer["params"] == ours["params"]
  c = toy_layers["comparisons"]["mamba2 vs mamba2_jax"]
  assert set(c["speedup"]) == {"16"}
  assert c["speedup"]["16"] == pytest.approx(
      peer["points"]["16"]["ms"] / ours["points"]["16"]["ms"])


def test_layer_benchmark_titans_pytorch_peer_threads():
  pytest.importorskip("titans_pytorch")
  r = layer_bench.layer_benchmark(titans_lengths=(8,), peers=("titans-pytorch",),
                                  only=("titans_pytorch", "titans_pytorch_matched"), **_TOY)
  full, matched = r["layers"]["titans_pytorch"], r["layers"]["titans_pytorch_matched"]
  for p in (full, matched):
    assert set(p["points"]) == {"8"} and p["points"]["8"]["ms"] > 0
    assert p["torch_threads"] == common.cpu_threads()
  assert "dim_head" not in full["config"] and matched["config"]["dim_head"] == 16
  assert 0 < matched["params"] < full["params"]  # dim_head defaults to dim: wider heads
  assert r["layers"]["mamba2"] == {"status": "not timed (not selected)"}


def test_titans_overrides_name_heads_and_chunk():
  assert "titans_lmm" in registry.names()
  o = layer_bench.titans_overrides(4, 64)
  assert sorted(o.values()) == [4, 64]
  registry.validate("titans_lmm", 256, o)  # the names are titans_lmm.Config fields


# ------------------------------------------------------------------ --what=swa (toy)


def test_swa_benchmark_bookkeeping_and_dense_baseline():
  from kernels.block_sparse import block_sparse_attention, causal_blocks  # pylint: disable=g-import-not-at-top
  # The dense baseline: query-blocked == unblocked == the kernel over full causal lists.
  ks = jax.random.split(jax.random.PRNGKey(1), 3)
  q, k, v = (jax.random.normal(k_, (1, 32, 2, 8)) for k_ in ks)
  full = swa.dense_causal_attention(q, k, v)
  np.testing.assert_allclose(swa.dense_causal_attention(q, k, v, query_block=8), full,
                             atol=1e-5)
  idx, cnt = causal_blocks(32, 8)
  np.testing.assert_allclose(block_sparse_attention(q, k, v, idx, cnt, block_size=8), full,
                             atol=1e-5)
  # Blocking is chosen from the memory the unblocked temporaries need (4 x [B,H,T,T] fp32).
  assert swa.dense_query_blocking(1, 16384, 4, 0, 16 * 2**30)[0] == 1024
  assert swa.dense_query_blocking(1, 1024, 4, 0, 16 * 2**30)[0] is None
  assert swa.dense_query_blocking(1, 1024, 4, 256, None)[0] == 256
  # Toy run: both cases timed, the ratio is dense / sparse, the T=16k target unmeasured.
  r = swa.swa_benchmark(seq_len=64, batch=1, heads=2, head_dim=8, window=20, block_size=16,
                        repeats=2, dense_query_block=16)
  sp, dn = r["cases"]["block_sparse_swa"], r["cases"]["dense_causal"]
  for c in (sp, dn):
    assert c["ms"] > 0 and c["runs"] == 2 and len(c["all_ms"]) == 2 and c["grads_finite"]
  assert r["speedup"] == pytest.approx(dn["ms"] / sp["ms"])
  assert sp["max_blocks_per_query_block"] == 3  # ceil(19 / 16) + 1 key blocks
  assert sp["keys_scored_per_query"] == 48 and dn["keys_scored_per_query"] == 64
  assert dn["query_block"] == 16 and "16" in dn["note"]
  (tg,) = r["targets"]
  assert tg["pass"] is None and "T=64" in tg["note"] and r["all_targets_pass"] is False


@pytest.mark.parametrize("level", ["mixer", "lm"])
def test_decode_benchmark_times_landmark_at_the_context_asked(level):
  r = decode.decode_benchmark(["landmark"], [64, 256], d_model=16, num_layers=1, tokens=2,
                              repeats=1, level=level)
  lm = r["landmark"]
  assert set(lm) >= {"64", "256", "latency_growth", "memory_growth"}
  assert lm["64"]["ms_per_token"] > 0 and lm["256"]["state_bytes"] > lm["64"]["state_bytes"]
  # at_context moves every position counter, so retrieval (not the empty cache) is timed.
  st = decode.at_context({"layers": [[{"pos": jnp.zeros((), jnp.int32)}]],
                          "tokens": jnp.zeros((), jnp.int32)}, 300)
  assert int(st["layers"][0][0]["pos"]) == 300 and int(st["tokens"]) == 300


def test_with_huge_pages_reexecs_once_with_the_tunable(monkeypatch):
  calls = []
  monkeypatch.setattr(common.os, "execve", lambda *a: calls.append(a))
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.foo=1")
  common.with_huge_pages()
  (exe, argv, env), = calls
  assert exe == common.sys.executable and argv[0] == exe
  assert argv[1:] == common.sys.orig_argv[1:]
  assert env["GLIBC_TUNABLES"] == "glibc.foo=1:" + common.HUGE_PAGES_TUNABLE
  monkeypatch.setenv("GLIBC_TUNABLES", common.HUGE_PAGES_TUNABLE)
  common.with_huge_pages()
  assert len(calls) == 1  # already set: no second exec


def test_command_writes_json_with_provenance_and_png(tmp_path):
  """``python -m experiments.bench kernels`` at toy sizes: the JSON starts with its
  provenance (command, commit, code paths the figures depend on, the PNG written)."""
  out = tmp_path / "bench_kernels"
  argv = [sys.executable, "-m", "experiments.bench", "kernels", "--ops=diagonal_recurrence",
          "--lengths=32", "--heads=1", "--head_dim=8", "--matmul_size=32", "--repeats=1",
          "--nohuge_pages", f"--out={out}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(argv, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
  with open(f"{out}.json", encoding="utf-8") as f:
    report = json.load(f)
  assert list(report)[0] == "provenance"
  prov = report["provenance"]
  assert set(prov) == {"command", "commit", "dirty", "date", "code", "outputs"}
  assert prov["command"].startswith("python -m experiments.bench kernels --ops=")
  assert prov["code"] == ["experiments/bench", "kernels"]
  assert prov["outputs"] == [f"{out}.png"] and os.path.getsize(f"{out}.png") > 1000
  assert report["what"] == "kernels" and "diagonal_recurrence" in report["result"]["ops"]


# ------------------------------------------------------------ --what=context_parallel (toy)


def test_context_parallel_benchmark_reports_per_device_memory():
  """Toy T: the split program holds less per device than the unsplit one, and the report
  has what the README table reads."""
  from experiments.bench import context_parallel  # pylint: disable=g-import-not-at-top
  r = context_parallel.context_parallel_benchmark(["gla"], [1, 2], 256, 16)
  row = r["mixers"]["gla"]
  assert row["1"]["temp_fraction"] == 1.0
  assert 0 < row["2"]["temp"] < row["1"]["temp"]
  assert r["target"] is None  # n = 8 not measured


def test_longest_fit_searches_from_the_guess(monkeypatch):
  """The longest-T search against a fake memory (bytes = T, or T^2 / 1024): from a guess
  that fits it doubles, from one that does not it halves, and None when even the start
  does not fit; each T is compiled once."""
  from experiments.bench import context_parallel  # pylint: disable=g-import-not-at-top
  calls = []
  cost = {"linear": lambda t: t, "quadratic": lambda t: t * t // 1024}
  monkeypatch.setattr(context_parallel, "memory", lambda name, n, t, d: calls.append(t) or
                      {"temp": cost[name](t)})
  fit = lambda name, budget, guess: context_parallel.longest_fit(
      name, 1, 8, budget, 256, 1 << 20, guess)
  assert fit("linear", 5000, 1024) == 4096 and calls == [1024, 2048, 4096, 8192]
  calls.clear()
  assert fit("quadratic", 5000, 4096) == 2048 and calls == [4096, 2048]
  assert fit("quadratic", 10, 4096) is None
  assert fit("linear", 1 << 30, 1 << 19) == 1 << 20  # capped at stop
  assert context_parallel.linear_guess(65536, 100, 1000, 4096) == 524288  # 655,360 predicted

