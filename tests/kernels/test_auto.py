"""``impl="auto"``: each kernel's ``AUTO`` table agrees with the committed measurement
(``results/bench_auto.json``, written by ``python -m experiments.bench auto``), and the ops
dispatch by it for a short and a long sequence."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import pytest

from kernels import block_sparse, chunked_scan, common, delta_rule, diag_scan, dplr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = {"chunked_scan": chunked_scan, "delta_rule": delta_rule, "diag_scan": diag_scan,
           "block_sparse": block_sparse}
CLASSES = ("short", "long")
SHORT, LONG = 64, common.LONG_FROM  # one length of each class


@pytest.fixture(scope="module")
def measured():
  with open(os.path.join(ROOT, "results", "bench_auto.json"), encoding="utf-8") as f:
    return json.load(f)


def test_bench_auto_json_has_provenance_and_every_kernel(measured):
  prov = measured["provenance"]
  assert prov["command"].startswith("python -m experiments.bench auto")
  assert {"kernels", "experiments/bench"} <= set(prov["code"]) and prov["commit"]
  assert set(measured["result"]["winners"]) == set(KERNELS)
  assert measured["backend"] == "cpu" and len(measured["load_average"]["start"]) == 3


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_cpu_table_agrees_with_the_measured_winners(measured, name):
  table = KERNELS[name].AUTO
  winners = measured["result"]["winners"][name]["cpu"]
  assert {c: table[("cpu", c)] for c in CLASSES} == winners
  # the winner was timed in every case of its class and beat the other candidates there
  for c in CLASSES:
    cls = measured["result"]["kernels"][name]["classes"][c]
    assert winners[c] in cls["eligible"]
    assert min(cls["geomean_ms"], key=cls["geomean_ms"].get) == winners[c]


def test_dplr_cpu_table_agrees_with_its_own_measurement():
  """dplr's rows come from its own run (``--auto_ops=dplr --out=results/bench_auto_dplr``)."""
  with open(os.path.join(ROOT, "results", "bench_auto_dplr.json"), encoding="utf-8") as f:
    measured = json.load(f)
  assert measured["provenance"]["command"].startswith("python -m experiments.bench auto")
  winners = measured["result"]["winners"]["dplr"]["cpu"]
  assert {c: dplr.AUTO[("cpu", c)] for c in CLASSES} == winners
  for c in CLASSES:
    cls = measured["result"]["kernels"]["dplr"]["classes"][c]
    assert min(cls["geomean_ms"], key=cls["geomean_ms"].get) == winners[c]


@pytest.mark.parametrize("name", sorted(KERNELS) + ["dplr"])
def test_accelerator_rows_are_the_pallas_kernels(name, monkeypatch):
  table = {**KERNELS, "dplr": dplr}[name].AUTO
  assert set(table) == {(b, c) for b in ("cpu", "gpu", "tpu") for c in CLASSES}
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(common, "platform", lambda backend=backend: backend)
    for t in (SHORT, LONG):
      assert common.auto_impl(table, t) == f"pallas_{backend}" == table[(backend,
                                                                          common.shape_class(t))]


def test_shape_class_rule():
  assert common.shape_class(1) == common.shape_class(common.LONG_FROM - 1) == "short"
  assert common.shape_class(common.LONG_FROM) == common.shape_class(1 << 20) == "long"
  assert common.auto_impl() == common.auto_impl(None, 1024) == "xla"  # no table: legacy


class Dispatched(Exception):
  """Raised by a stubbed implementation: which one ``impl="auto"`` called."""


def _stub(monkeypatch, module, names):
  """Replace ``module``'s implementation functions {attribute: impl} by stubs raising
  ``Dispatched(impl)``."""
  for attr, impl in names.items():
    def stub(*args, impl=impl, **kwargs):
      raise Dispatched(impl)
    monkeypatch.setattr(module, attr, stub)


def _dispatched(call):
  with pytest.raises(Dispatched) as e:
    call()
  return str(e.value)


@pytest.mark.parametrize("t", [SHORT, LONG])
def test_auto_dispatches_per_table(monkeypatch, t):
  """On CPU, each op's ``impl="auto"`` runs ``AUTO[("cpu", class of T)]`` (the backend is
  pinned to "cpu" so the test means the same on any machine)."""
  monkeypatch.setattr(common, "platform", lambda: "cpu")
  backend = "cpu"
  expect = lambda module: module.AUTO[(backend, common.shape_class(t))]
  x = jnp.zeros((1, t, 1, 16), jnp.float32)
  g = jnp.zeros((1, t, 1), jnp.float32)

  _stub(monkeypatch, chunked_scan, {"linear_recurrence_reference": "reference",
                                    "linear_recurrence_chunked": "xla"})
  assert _dispatched(lambda: chunked_scan.linear_recurrence(x, x, x, g)) == expect(
      chunked_scan)

  _stub(monkeypatch, delta_rule, {"delta_rule_reference": "reference",
                                  "delta_rule_chunked": "xla"})
  assert _dispatched(lambda: delta_rule.delta_rule(x, x, x, g, g)) == expect(delta_rule)

  _stub(monkeypatch, diag_scan, {"diagonal_recurrence_reference": "reference",
                                 "diagonal_recurrence_chunked": "xla"})
  assert _dispatched(lambda: diag_scan.diagonal_recurrence(x, x)) == expect(diag_scan)
  xc = x.astype(jnp.complex64)  # complex (S4D): the same row on CPU
  assert _dispatched(lambda: diag_scan.diagonal_recurrence(xc, xc)) == expect(diag_scan)

  _stub(monkeypatch, block_sparse, {"block_sparse_reference": "reference",
                                    "gathered_forward": "xla"})
  idx, cnt = block_sparse.sliding_window_blocks(t, 16, 32)
  assert _dispatched(lambda: block_sparse.block_sparse_attention(
      x, x, x, idx, cnt, block_size=16, window=32)) == expect(block_sparse)
