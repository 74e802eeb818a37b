"""kernels.chunked_scan: every implementation against the per-token reference.

Pallas kernels run in interpret mode on CPU; the lowering tests export them for TPU and
CUDA at a production shape (no hardware needed). Each (impl, decay kind, dtype) is compiled
once per module: one jitted ``value_and_grad`` returns outputs, final state and the
gradients w.r.t. q, k, v, log_decay and initial_state together.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels.chunked_scan import linear_recurrence
from kernels.common import PALLAS_IMPLS
from tests.kernels.helpers import export as _export
from tests.kernels.helpers import jit_fast as _jit
from tests.kernels.helpers import per_head_rel_err, rel_rms

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

B, T, H, DK, DV = 2, 50, 2, 8, 8  # T is not a multiple of any chunk size used
KINDS = ("none", "scalar", "channel")
PALLAS = PALLAS_IMPLS
ARGS = ("q", "k", "v", "log_decay", "initial_state")


def _inputs(kind, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (B, T, H, DK))
  k = jax.random.normal(ks[1], (B, T, H, DK)) / np.sqrt(DK)
  v = jax.random.normal(ks[2], (B, T, H, DV))
  s0 = jax.random.normal(ks[3], (B, H, DK, DV))
  reset = jax.random.uniform(ks[4], (B, T)) < 0.08
  reset = reset.at[0, 0].set(True).at[1, T - 1].set(True)
  if kind == "none":
    g = None
  elif kind == "scalar":
    # head 0: near-1 gates (long memory); head 1: strongly decaying gates
    near_one = -1e-3 * jax.random.uniform(ks[5], (B, T))
    strong = -20.0 - 30.0 * jax.random.uniform(ks[6], (B, T))
    g = jnp.stack([near_one, strong], axis=-1)
  else:
    # head 0: GLA-like gates logsigmoid(x) / 16 ... ordinary; head 1: strong (-20 .. -50)
    ordinary = jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, T, DK)) + 2.0)
    strong = -20.0 - 30.0 * jax.random.uniform(ks[6], (B, T, DK))
    g = jnp.stack([ordinary, strong], axis=2)
  cast = lambda x: x.astype(dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), log_decay=g, initial_state=s0, reset=reset)


def _weights():
  ks = jax.random.split(jax.random.PRNGKey(123), 2)
  return jax.random.normal(ks[0], (B, T, H, DV)), jax.random.normal(ks[1], (B, H, DK, DV))


@functools.lru_cache(maxsize=None)
def _value_and_grad(impl, chunk_size=32):
  """Jitted (o, final_state, grads) for one implementation."""
  wo, ws = _weights()
  interpret = impl in PALLAS

  def loss(q, k, v, g, s0, reset):
    o, sf = linear_recurrence(q, k, v, g, initial_state=s0, reset=reset,
                              chunk_size=chunk_size, impl=impl, interpret=interpret)
    return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(sf * ws), (o, sf)

  f = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)

  def run(q, k, v, g, s0, reset):
    (_, (o, sf)), grads = f(q, k, v, g, s0, reset)
    return o, sf, grads

  return _jit(run)


@functools.lru_cache(maxsize=None)
def _forward(impl, chunk_size=32):
  interpret = impl in PALLAS
  return _jit(lambda q, k, v, g, s0, reset: linear_recurrence(
      q, k, v, g, initial_state=s0, reset=reset, chunk_size=chunk_size, impl=impl,
      interpret=interpret))


def _call(fn, x, **over):
  x = {**x, **over}
  return fn(x["q"], x["k"], x["v"], x["log_decay"], x["initial_state"], x["reset"])


def _per_head_rel_err(ref, got):
  return per_head_rel_err(ref, got, (B, T, H))


_rel_rms = rel_rms


@functools.lru_cache(maxsize=None)
def _reference_result(kind, dtype_name="float32"):
  x = _inputs(kind, jnp.dtype(dtype_name))
  x32 = {n: (None if a is None else (a.astype(jnp.float32) if n in ("q", "k", "v") else a))
         for n, a in x.items()}
  return _call(_value_and_grad("reference"), x32)


def _check_all(kind, impl, chunk_size, fwd_tol, grad_tol):
  x = _inputs(kind)
  o_r, s_r, g_r = _reference_result(kind)
  o, s, grads = _call(_value_and_grad(impl, chunk_size), x)
  assert o.dtype == x["q"].dtype and s.dtype == jnp.float32
  assert o.shape == (B, T, H, DV) and s.shape == (B, H, DK, DV)
  assert _per_head_rel_err(o_r, o) < fwd_tol
  assert _per_head_rel_err(s_r, s) < fwd_tol
  for name, gr, gg in zip(ARGS, g_r, grads):
    if gr is None:
      assert gg is None
      continue
    err = _per_head_rel_err(gr, gg)
    assert err < grad_tol, f"d{name}: {err}"


# ---------------------------------------------------------------------------------------
# Correctness against the reference (fp32): outputs, final state, all gradients, with an
# initial state and resets, near-1 and strongly decaying gates (see _inputs).
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_xla_matches_reference(kind, chunk_size):
  _check_all(kind, "xla", chunk_size, 1e-5, 1e-4)


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("kind", KINDS)
def test_pallas_matches_reference(kind, impl):
  _check_all(kind, impl, 32, 1e-5, 1e-4)


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_other_chunk_sizes_forward(impl, chunk_size):
  x = _inputs("channel")
  o_r, s_r, _ = _reference_result("channel")
  o, s = _call(_forward(impl, chunk_size), x)
  assert _per_head_rel_err(o_r, o) < 1e-5
  assert _per_head_rel_err(s_r, s) < 1e-5


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_head_dims_forward(impl):
  """Dk = 128 (TPU: lane-dense [B, T, H*D] view) with Dv = 48 (TPU: transposed layout;
  GPU: zero-padded to 64), per-channel decays, initial state and a reset."""
  ks = jax.random.split(jax.random.PRNGKey(11), 5)
  b_, t_, h_, dk, dv = 1, 40, 2, 128, 48
  q = jax.random.normal(ks[0], (b_, t_, h_, dk)) / np.sqrt(dk)
  k = jax.random.normal(ks[1], (b_, t_, h_, dk)) / np.sqrt(dk)
  v = jax.random.normal(ks[2], (b_, t_, h_, dv))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b_, t_, h_, dk)) + 3.0)
  s0 = jax.random.normal(ks[4], (b_, h_, dk, dv))
  reset = jnp.zeros((b_, t_), bool).at[0, 25].set(True)
  o, s = _jit(lambda *a: linear_recurrence(*a[:4], initial_state=a[4], reset=a[5],
                                           chunk_size=32, impl=impl, interpret=True))(
                                               q, k, v, g, s0, reset)
  o_r, s_r = _jit(lambda *a: linear_recurrence(*a[:4], initial_state=a[4], reset=a[5],
                                               impl="reference"))(q, k, v, g, s0, reset)
  np.testing.assert_allclose(o, o_r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(o_r))))
  np.testing.assert_allclose(s, s_r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(s_r))))


def test_auto_is_xla_on_cpu_and_defaults():
  x = _inputs("scalar")
  args = (x["q"], x["k"], x["v"], x["log_decay"])  # no initial state, no reset
  o, s = _jit(lambda *a: linear_recurrence(*a))(*args)
  o_r, s_r = _jit(lambda *a: linear_recurrence(*a, impl="reference"))(*args)
  assert _per_head_rel_err(o_r, o) < 1e-5 and _per_head_rel_err(s_r, s) < 1e-5


# ---------------------------------------------------------------------------------------
# bf16 inputs with fp32 accumulation: relative RMS error against the fp32 reference.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,impl", [("scalar", "xla"), ("channel", "xla"),
                                       ("channel", "pallas_tpu"), ("channel", "pallas_gpu")])
def test_bf16_relative_rms(kind, impl):
  x = _inputs(kind, jnp.bfloat16)
  o_r, s_r, g_r = _reference_result(kind, "bfloat16")  # fp32 math on the same bf16 values
  o, s, grads = _call(_value_and_grad(impl, 32), x)
  assert o.dtype == jnp.bfloat16
  assert _rel_rms(o_r, o) < 1e-2
  assert _rel_rms(s_r, s) < 1e-2
  for name, gr, gg in zip(ARGS, g_r, grads):
    if name == "log_decay":  # judge the ordinary-gate head; the strong head is ~0
      gr, gg = gr[:, :, 0], gg[:, :, 0]
    assert _rel_rms(gr, gg) < 1e-2, name


# ---------------------------------------------------------------------------------------
# Documents, continuation, extremes.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ("reference", "xla") + PALLAS)
def test_reset_blocks_information(impl):
  x = _inputs("channel")
  start = 29  # a document starts here in batch row 0
  reset = x["reset"].at[0, start].set(True)
  o1, s1 = _call(_forward(impl), x, reset=reset)
  noise = jax.random.normal(jax.random.PRNGKey(7), (B, start, H, DK))
  changed = dict(
      q=x["q"].at[0, :start].add(noise[0]), k=x["k"].at[0, :start].add(noise[0]),
      v=x["v"].at[0, :start].mul(-3.0),
      log_decay=x["log_decay"].at[0, :start].add(-0.5),
      initial_state=x["initial_state"] * 5.0)
  o2, s2 = _call(_forward(impl), x, reset=reset, **changed)
  # Equal up to rounding (earlier log decays in the same chunk shift the cumulative sums);
  # any leak of the changed tokens would be O(1).
  np.testing.assert_allclose(o2[0, start:], o1[0, start:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s2[0], s1[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(o2[0, :start], o1[0, :start])


@pytest.mark.parametrize("impl", ("xla",) + PALLAS)
def test_two_calls_continue_exactly(impl):
  """Prefill in two calls (final_state -> initial_state) equals one call; split at a token
  that is not a chunk boundary."""
  x = _inputs("channel")
  split = 21
  first = {n: (a[:, :split] if n != "initial_state" and a is not None else a)
           for n, a in x.items()}
  second = {n: (a[:, split:] if n != "initial_state" and a is not None else a)
            for n, a in x.items()}
  fwd = _forward(impl)
  o_all, s_all = _call(fwd, x)
  o_a, s_a = _call(fwd, first)
  o_b, s_b = _call(fwd, second, initial_state=s_a)
  np.testing.assert_allclose(jnp.concatenate([o_a, o_b], axis=1), o_all, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(s_b, s_all, rtol=1e-5, atol=1e-5)


def test_extreme_gates_finite_xla_pallas():
  # Gates far beyond the realistic range: -1e4 per step (exp underflows to exactly 0).
  x = _inputs("channel")
  g = x["log_decay"].at[:, :, 1].set(-1e4)
  for impl in ("xla", "pallas_tpu"):
    o, s, grads = _call(_value_and_grad(impl, 32), x, log_decay=g)
    for a in (o, s) + tuple(grads):
      assert np.all(np.isfinite(np.asarray(a))), impl


def _saturated_then_mild(kind):
  """Mild gates (-0.01) with one saturated gate (-3000) per head, mid-chunk, followed by
  more mild gates in the same chunk: the cumulative log decay after it is ~ -3000, so a
  pair decay computed as ``b_i - b_j`` would lose ``eps * 3000 ~ 4e-4`` absolutely."""
  g = jnp.full((B, T, H) if kind == "scalar" else (B, T, H, DK), -0.01)
  g = g.at[:, 20, 0].set(-3000.0).at[:, 36, 1].set(-3000.0)
  if kind == "channel":  # another one in only half of head 0's key channels
    g = g.at[:, 6, 0, : DK // 2].set(-3000.0)
  return g


@pytest.mark.parametrize("impl,chunk_size", [("xla", 32), ("xla", 64)] + [(i, 32) for i in PALLAS])
@pytest.mark.parametrize("kind", ("scalar", "channel"))
def test_saturated_gate_then_mild_gates(kind, impl, chunk_size):
  """Decays after a saturated gate stay exact (fp32): forward to 1e-5, gradients to 1e-4.
  (xla at chunk 64 builds per-head pair decays from 16-token sub-chunks: pair_decays.)"""
  x = _inputs(kind)
  g = _saturated_then_mild(kind)
  x32 = {**x, "log_decay": g}
  ref = _call(_value_and_grad("reference"), x32)
  got = _call(_value_and_grad(impl, chunk_size), x32)
  o_r, s_r, g_r = ref
  o, s, grads = got
  assert _per_head_rel_err(o_r, o) < 1e-5
  assert _per_head_rel_err(s_r, s) < 1e-5
  for name, gr, gg in zip(ARGS, g_r, grads):
    err = _per_head_rel_err(gr, gg)
    assert err < 1e-4, f"d{name}: {err}"


def test_tpu_kernel_under_interpret_params_race_detection():
  """The TPU kernel once under the TPU interpreter (memory spaces, DMAs, race checks)."""
  ks = jax.random.split(jax.random.PRNGKey(3), 5)
  b_, t_, h_, d_ = 1, 32, 1, 8
  q = jax.random.normal(ks[0], (b_, t_, h_, d_))
  k = jax.random.normal(ks[1], (b_, t_, h_, d_))
  v = jax.random.normal(ks[2], (b_, t_, h_, d_))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b_, t_, h_)) + 2)
  s0 = jax.random.normal(ks[4], (b_, h_, d_, d_))
  reset = jnp.zeros((b_, t_), bool).at[0, 20].set(True)
  params = pltpu.InterpretParams(detect_races=True)
  try:
    o, s = linear_recurrence(q, k, v, g, initial_state=s0, reset=reset, chunk_size=16,
                             impl="pallas_tpu", interpret=params)
    o_r, s_r = linear_recurrence(q, k, v, g, initial_state=s0, reset=reset,
                                 impl="reference")
    np.testing.assert_allclose(o, o_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s, s_r, rtol=1e-5, atol=1e-5)
    # The interpreter records races in a module-level state (no public accessor yet).
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # noqa: PLC0415
    assert ipc.races is not None and not ipc.races.races_found
  finally:
    pltpu.reset_tpu_interpret_mode_state()


def test_xla_long_sequence_stays_finite_and_exact():
  """Numerics at length (T = 1,000,000): near-1 gates, state carried across ~62k chunks."""
  t_long = 1_000_000
  ks = jax.random.split(jax.random.PRNGKey(5), 4)
  shape = (1, t_long, 1, 4)
  q = jax.random.normal(ks[0], shape)
  k = jax.random.normal(ks[1], shape) * 0.5
  v = jax.random.normal(ks[2], shape)
  g = -1e-3 * jax.random.uniform(ks[3], shape[:3])
  o, s = _jit(lambda *a: linear_recurrence(*a, chunk_size=16, impl="xla"))(q, k, v, g)
  o_r, s_r = _jit(lambda *a: linear_recurrence(*a, impl="reference"))(q, k, v, g)
  assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(s)))
  window = slice(t_long - 1024, t_long)
  np.testing.assert_allclose(o[:, window], o_r[:, window], rtol=1e-3,
                             atol=1e-3 * float(jnp.max(jnp.abs(o_r[:, window]))))
  np.testing.assert_allclose(s, s_r, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(s_r))))


# ---------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
  x = _inputs("scalar")
  q, k, v = x["q"], x["k"], x["v"]
  with pytest.raises(ValueError, match="log_decay"):
    linear_recurrence(q, k, v, jnp.zeros((B, T)))
  with pytest.raises(ValueError, match="initial_state"):
    linear_recurrence(q, k, v, initial_state=jnp.zeros((B, H, DK, DK + 1)))
  with pytest.raises(ValueError, match="reset"):
    linear_recurrence(q, k, v, reset=jnp.zeros((B, T + 1), bool))
  with pytest.raises(ValueError, match="k must"):
    linear_recurrence(q, k[:, :-1], v)
  with pytest.raises(ValueError, match="impl"):
    linear_recurrence(q, k, v, impl="cuda")
  with pytest.raises(ValueError, match="multiple of 16"):
    linear_recurrence(q, k, v, impl="pallas_tpu", chunk_size=24, interpret=True)


# ---------------------------------------------------------------------------------------
# Lowering for hardware we do not have: export at a production shape, forward and backward.
# ---------------------------------------------------------------------------------------

PROD = dict(B=1, T=8192, H=8, D=128)


def _prod_args(kind):
  b_, t_, h_, d_ = PROD["B"], PROD["T"], PROD["H"], PROD["D"]
  sd = jax.ShapeDtypeStruct
  g = {"none": None, "scalar": sd((b_, t_, h_), jnp.float32),
       "channel": sd((b_, t_, h_, d_), jnp.float32)}[kind]
  bf = lambda: sd((b_, t_, h_, d_), jnp.bfloat16)
  return (bf(), bf(), bf(), g, sd((b_, h_, d_, d_), jnp.float32), sd((b_, t_), jnp.bool_))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_lowering_production_shape(impl, platform, kind):
  args = _prod_args(kind)

  def fwd(q, k, v, g, s0, reset):
    return linear_recurrence(q, k, v, g, initial_state=s0, reset=reset, chunk_size=64,
                             impl=impl)

  def loss(q, k, v, g, s0, reset):
    o, sf = fwd(q, k, v, g, s0, reset)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(sf)

  argnums = (0, 1, 2, 4) if kind == "none" else (0, 1, 2, 3, 4)
  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  exp_f = _export(fwd, args, platform)
  assert exp_f.mlir_module().count(marker) == 1
  exp_b = _export(jax.grad(loss, argnums=argnums), args, platform)
  # backward = the dq, dv, dk kernels (+ the forward, for the final state without the last
  # token, when there are decays; without decays the forward is dead code under grad)
  assert exp_b.mlir_module().count(marker) == (3 if kind == "none" else 4)


@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_grouped_lowering_reads_groups_without_repeating_them(impl, platform):
  """Mamba2's case (one B/C group for all 8 heads, scalar decays): forward and backward
  export, and every kernel call gets q/k with G heads, not a repeated [B,T,H,D] copy."""
  q, _, v, g, s0, reset = _prod_args("scalar")
  b_, t_, _, d_ = q.shape
  qg = jax.ShapeDtypeStruct((b_, t_, 1, d_), q.dtype)
  args = (qg, qg, v, g, s0, reset)

  def fwd(q, k, v, g, s0, reset):
    return linear_recurrence(q, k, v, g, initial_state=s0, reset=reset, chunk_size=64,
                             impl=impl)

  def loss(*a):
    o, sf = fwd(*a)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(sf)

  grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert _export(fwd, args, platform).mlir_module().count(marker) == 1
  assert _export(grad, args, platform).mlir_module().count(marker) == 4
  # The forward, dq, dv and dk kernels: each reads a q/k group (B*T*D elements, in either
  # layout); with q/k repeated to H heads no operand would have that size.
  kernels = _pallas_calls(jax.make_jaxpr(grad)(*args).jaxpr)
  assert len(kernels) == 4
  for eqn in kernels:
    assert b_ * t_ * d_ in [int(np.prod(x.aval.shape)) for x in eqn.invars]


def _pallas_calls(jaxpr):
  """Every ``pallas_call`` equation in ``jaxpr`` and its sub-jaxprs."""
  from jax.extend import core as jex_core  # pylint: disable=import-outside-toplevel
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      out.append(eqn)
      continue
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else [p]):
        if isinstance(sub, jex_core.ClosedJaxpr):
          out += _pallas_calls(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          out += _pallas_calls(sub)
  return out


# ---------------------------------------------------------------------------------------
# Grouped q/k (Mamba2's B/C groups, GQA) and the per-head pair decays of the xla form.
# ---------------------------------------------------------------------------------------


GROUPED_H, GROUPED_G = 4, 2


@functools.lru_cache(maxsize=None)
def _grouped_case(kind):
  """q/k with G = 2 groups for H = 4 heads, and the weights of the loss."""
  h, grp = GROUPED_H, GROUPED_G
  ks = jax.random.split(jax.random.PRNGKey(7), 6)
  q = jax.random.normal(ks[0], (B, T, grp, DK))
  k = jax.random.normal(ks[1], (B, T, grp, DK)) / np.sqrt(DK)
  v = jax.random.normal(ks[2], (B, T, h, DV))
  s0 = jax.random.normal(ks[3], (B, h, DK, DV))
  reset = jax.random.uniform(ks[4], (B, T)) < 0.08
  shape = {"none": None, "scalar": (B, T, h), "channel": (B, T, h, DK)}[kind]
  g = None if shape is None else -jax.nn.softplus(jax.random.normal(ks[5], shape))
  wo = jax.random.normal(ks[5], (B, T, h, DV))
  return (q, k, v, g, s0, reset), wo


@functools.lru_cache(maxsize=None)
def _grouped_run(kind, impl, chunk_size, expand):
  """(o, final state), gradients w.r.t. q, k, v, [log_decay,] initial_state; ``expand``:
  q/k repeated to H heads before the call."""
  (q, k, v, g, s0, reset), wo = _grouped_case(kind)
  rep = lambda x: jnp.repeat(x, GROUPED_H // GROUPED_G, axis=2)

  def loss(q, k, v, g, s0):
    qq, kk = (rep(q), rep(k)) if expand else (q, k)
    o, sf = linear_recurrence(qq, kk, v, g, initial_state=s0, reset=reset,
                              chunk_size=chunk_size, impl=impl, interpret=impl in PALLAS)
    return jnp.sum(o * wo) + jnp.sum(sf), (o, sf)

  argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
  (_, out), grads = _jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(
      q, k, v, g, s0)
  return out, grads


@pytest.mark.parametrize("impl,chunk_size", [("xla", 16), ("xla", 64), ("reference", 16),
                                             ("pallas_gpu", 16), ("pallas_tpu", 16)])
@pytest.mark.parametrize("kind", KINDS)
def test_grouped_qk_equals_repeated_qk(kind, impl, chunk_size):
  """q/k with G < H heads == the same q/k repeated to H heads (outputs, state, gradients;
  the gradient of a shared q/k group is the sum over its heads). The repeated side is the
  per-token reference (one compile per decay kind, shared by the implementations; each
  implementation's own agreement with the reference is tested above), judged per head:
  1e-5 (measured <= 6e-7; a wrong group for a head is an O(1) error)."""
  (o_g, s_g), d_g = _grouped_run(kind, impl, chunk_size, False)
  (o_r, s_r), d_r = _grouped_run(kind, "reference", 16, True)
  assert o_g.shape == (B, T, GROUPED_H, DV) and s_g.shape == (B, GROUPED_H, DK, DV)
  assert d_g[0].shape == (B, T, GROUPED_G, DK)  # dq: one gradient per group
  # per head (or group): axis 2 of [B, T, ., ...], axis 1 of a state [B, H, DK, DV]
  err = lambda want, got: per_head_rel_err(
      want, got, (B, T, want.shape[2] if want.shape[:2] == (B, T) else GROUPED_H))
  assert err(o_r, o_g) < 1e-5 and err(s_r, s_g) < 1e-5
  for i, (want, got) in enumerate(zip(d_r, d_g)):
    assert got.shape == want.shape
    assert err(want, got) < 1e-5, i


def test_grouped_qk_needs_heads_to_divide():
  q = jnp.zeros((1, 8, 3, 4))
  with pytest.raises(ValueError, match="multiple of q/k's heads G=3"):
    linear_recurrence(q, q, jnp.zeros((1, 8, 4, 4)), impl="xla")


def test_pair_decays_equal_the_dense_exact_form_and_its_autodiff_gradient():
  """pair_decays (sub-chunked forward, row/column-sum backward) == exp of the exact segment
  sums, masked, and jax.grad of that -- with saturated gates, mild gates and a document mask."""
  from kernels.common import segment_sum  # pylint: disable=import-outside-toplevel
  from kernels.chunked_scan.reference import PAIR_SUB_CHUNK, pair_decays  # pylint: disable=import-outside-toplevel
  c = 8 * PAIR_SUB_CHUNK
  ks = jax.random.split(jax.random.PRNGKey(11), 3)
  g = -jax.nn.softplus(jax.random.normal(ks[0], (3, 2, c)) - 2.0)
  g = g.at[0, 0, 37].set(-3000.0).at[1, 1, 5].set(-80.0)
  seg = jnp.cumsum(jax.random.uniform(ks[1], (3, 1, c)) < 0.03, axis=-1)
  mask = jnp.tril(jnp.ones((c, c), bool)) & (seg[..., :, None] == seg[..., None, :])
  dense = lambda g: jnp.exp(jnp.where(mask, segment_sum(g), -jnp.inf))
  got, want = _jit(lambda g: pair_decays(g, mask))(g), _jit(dense)(g)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)  # fp32 rounding of ~50-term sums
  assert float(jnp.sum(got)) > c  # not all masked
  w = jax.random.normal(ks[2], want.shape)
  d_got = _jit(jax.grad(lambda g: jnp.sum(pair_decays(g, mask) * w)))(g)
  d_want = _jit(jax.grad(lambda g: jnp.sum(dense(g) * w)))(g)
  np.testing.assert_allclose(d_got, d_want, rtol=0, atol=1e-5 * float(jnp.abs(d_want).max()))


@pytest.mark.parametrize("tile,chunk_size", [(8, 16), (8, 32), (16, 48)])
def test_causal_tiles_match_reference(monkeypatch, tile, chunk_size):
  """The per-head-decay xla form with causal tiles (``tiled_intra_chunk``: lower tiles
  only, decays factored at the tile boundary) == the per-token reference: outputs, final
  state and every gradient, with resets (incl. inside tiles and at tile starts), an initial
  state, near-1 and saturated gates, grouped q/k. The tile is made small here so that
  chunks of 2-4 tiles fit the test shape; production uses CAUSAL_TILE (64)."""
  from kernels.chunked_scan import reference  # pylint: disable=import-outside-toplevel
  calls = []
  real = reference.tiled_intra_chunk  # pylint: disable=protected-access

  def spy(*a):
    calls.append(a[-1])
    return real(*a)

  monkeypatch.setattr(reference, "CAUSAL_TILE", tile)
  monkeypatch.setattr(reference, "tiled_intra_chunk", spy)
  x = _inputs("scalar")
  x["reset"] = x["reset"].at[0, 2 * tile].set(True).at[1, 2 * tile + 3].set(True)
  o_r, s_r, g_r = _call(_value_and_grad("reference"), x)
  wo, ws = _weights()

  def loss(q, k, v, g, s0, reset):
    o, sf = linear_recurrence(q, k, v, g, initial_state=s0, reset=reset,
                              chunk_size=chunk_size, impl="xla")
    return jnp.sum(o * wo) + jnp.sum(sf * ws), (o, sf)

  (_, (o, s)), grads = _jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
      x["q"], x["k"], x["v"], x["log_decay"], x["initial_state"], x["reset"])
  assert calls == [tile]  # traced once (the scan step), with the patched tile
  assert _per_head_rel_err(o_r, o) < 1e-5 and _per_head_rel_err(s_r, s) < 1e-5
  for name, gr, gg in zip(ARGS, g_r, grads):
    assert _per_head_rel_err(gr, gg) < 1e-4, name
  # grouped q/k (one group, two heads) through the tiled path == repeated q/k
  q1, k1 = x["q"][:, :, :1], x["k"][:, :, :1]
  grouped = _jit(lambda q, k, v, g, r: linear_recurrence(
      q, k, v, g, reset=r, chunk_size=chunk_size, impl="xla")[0])(
          q1, k1, x["v"], x["log_decay"], x["reset"])
  repeated = _jit(lambda q, k, v, g, r: linear_recurrence(
      jnp.repeat(q, H, 2), jnp.repeat(k, H, 2), v, g, reset=r, chunk_size=chunk_size,
      impl="reference")[0])(q1, k1, x["v"], x["log_decay"], x["reset"])
  assert _per_head_rel_err(repeated, grouped) < 1e-5


def test_causal_tiles_at_the_production_tile():
  """chunk 128 = two CAUSAL_TILE tiles: the tiled xla form == the reference (T = 300 is
  not a multiple of the chunk; resets; per-head decays)."""
  from kernels.chunked_scan.reference import CAUSAL_TILE  # pylint: disable=import-outside-toplevel
  ks = jax.random.split(jax.random.PRNGKey(5), 5)
  t, c = 300, 2 * CAUSAL_TILE
  q = jax.random.normal(ks[0], (1, t, 1, 8))
  k = jax.random.normal(ks[1], (1, t, 1, 8)) / np.sqrt(8)
  v = jax.random.normal(ks[2], (1, t, 2, 8))
  g = -jax.nn.softplus(jax.random.normal(ks[3], (1, t, 2)))
  reset = (jax.random.uniform(ks[4], (1, t)) < 0.01).at[0, c + CAUSAL_TILE].set(True)
  f = lambda impl: _jit(jax.value_and_grad(
      lambda q, k, v, g: jnp.sum(jnp.sin(linear_recurrence(
          q, k, v, g, reset=reset, chunk_size=c, impl=impl)[0])), argnums=(0, 1, 2, 3)))
  (l_r, g_r), (l_x, g_x) = f("reference")(q, k, v, g), f("xla")(q, k, v, g)
  np.testing.assert_allclose(l_x, l_r, rtol=1e-5)
  for a, b in zip(g_x, g_r):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(jnp.abs(b).max()))
