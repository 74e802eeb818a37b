"""kernels.diag_scan: every implementation against the per-token reference.

Pallas kernels run in interpret mode on CPU; the lowering tests export them for TPU and
CUDA at production shapes (no hardware needed). Each (impl, shape, dtype) is compiled once
per module: one jitted ``value_and_grad`` returns outputs, final state and the gradients
w.r.t. log_a, b and initial_state together.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels.common import PALLAS_IMPLS
from kernels.diag_scan import diagonal_recurrence
from tests.kernels.helpers import export as _export
from tests.kernels.helpers import jit_fast as _jit
from tests.kernels.helpers import rel_rms, worst_group_rel_err

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

B, T = 2, 50  # T is not a multiple of any chunk size used
SHAPES = {"btd": (B, T, 6), "btdn": (B, T, 3, 4)}  # S4D / RG-LRU style; Mamba-1 style
PALLAS = PALLAS_IMPLS
IMPLS = ("xla",) + PALLAS
ARGS = ("log_a", "b", "initial_state")
GROUPS = ("near_one", "ordinary", "strong")  # decay regime of channel c: GROUPS[c % 3]


@functools.lru_cache(maxsize=None)
def _inputs_np(shape_name, seed=0):
  """Test inputs (numpy RNG: no per-op compiles). Channel c is in decay regime
  ``GROUPS[c % 3]``: near-1 (-1e-3 .. 0), ordinary (log-sigmoid gates), strong (-50 .. -20)."""
  shape = SHAPES[shape_name]
  rng = np.random.default_rng(seed)
  near_one = -1e-3 * rng.uniform(size=shape)
  ordinary = -np.logaddexp(0.0, -(rng.normal(size=shape) + 2.0))  # log_sigmoid
  strong = -20.0 - 30.0 * rng.uniform(size=shape)
  group = np.arange(shape[-1]) % 3
  log_a = np.where(group == 0, near_one, np.where(group == 1, ordinary, strong))
  b = rng.normal(size=shape)
  h0 = rng.normal(size=(B,) + shape[2:])
  reset = rng.uniform(size=(B, T)) < 0.08
  reset[0, 0] = True
  reset[1, T - 1] = True
  return log_a, b, h0, reset


def _inputs(shape_name="btd", dtype=jnp.float32, seed=0):
  log_a, b, h0, reset = _inputs_np(shape_name, seed)
  return dict(log_a=jnp.asarray(log_a, dtype), b=jnp.asarray(b, dtype),
              initial_state=jnp.asarray(h0, jnp.float32), reset=jnp.asarray(reset))


@functools.lru_cache(maxsize=None)
def _weights(shape):
  """Fixed random cotangent weights for the loss (numpy: concrete constants in a jit)."""
  rng = np.random.default_rng(123)
  return (rng.normal(size=shape).astype(np.float32),
          rng.normal(size=(shape[0],) + shape[2:]).astype(np.float32))


@functools.lru_cache(maxsize=None)
def _value_and_grad(impl, chunk_size=16):
  """Jitted (h, final_state, grads) for one implementation."""
  interpret = impl in PALLAS

  def loss(la, b, h0, reset):
    h, hf = diagonal_recurrence(la, b, initial_state=h0, reset=reset, chunk_size=chunk_size,
                                impl=impl, interpret=interpret)
    wh, ws = _weights(b.shape)
    val = jnp.sum(jnp.real(h.astype(hf.dtype) * wh)) + jnp.sum(jnp.real(hf * ws))
    return val, (h, hf)

  f = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

  def run(la, b, h0, reset):
    (_, (h, hf)), grads = f(la, b, h0, reset)
    return h, hf, grads

  return _jit(run)


@functools.lru_cache(maxsize=None)
def _forward(impl, chunk_size=16):
  interpret = impl in PALLAS
  return _jit(lambda la, b, h0, reset: diagonal_recurrence(
      la, b, initial_state=h0, reset=reset, chunk_size=chunk_size, impl=impl,
      interpret=interpret))


def _call(fn, x, **over):
  x = {**x, **over}
  return fn(x["log_a"], x["b"], x["initial_state"], x["reset"])


def _per_group_rel_err(ref, got):
  """Worst relative error over the decay regimes (last axis, channel % 3)."""
  return worst_group_rel_err(
      ref, got, [lambda a, gi=gi: a[..., gi::3] for gi in range(len(GROUPS))])


_rel_rms = rel_rms


@functools.lru_cache(maxsize=None)
def _reference_result(shape_name, dtype_name="float32"):
  x = _inputs(shape_name, jnp.dtype(dtype_name))
  x32 = {n: (a.astype(jnp.float32) if n in ("log_a", "b") else a) for n, a in x.items()}
  return _call(_value_and_grad("reference"), x32)


def _check_all(shape_name, impl, chunk_size=16, fwd_tol=1e-5, grad_tol=1e-5):
  x = _inputs(shape_name)
  h_r, s_r, g_r = _reference_result(shape_name)
  h, s, grads = _call(_value_and_grad(impl, chunk_size), x)
  shape = SHAPES[shape_name]
  assert h.dtype == x["b"].dtype and s.dtype == jnp.float32
  assert h.shape == shape and s.shape == (B,) + shape[2:]
  assert _per_group_rel_err(h_r, h) < fwd_tol
  assert _per_group_rel_err(s_r, s) < fwd_tol
  for name, gr, gg in zip(ARGS, g_r, grads):
    assert gg.shape == gr.shape and gg.dtype == gr.dtype, name
    err = _per_group_rel_err(gr, gg)
    assert err < grad_tol, f"d{name}: {err}"


# ---------------------------------------------------------------------------------------
# Correctness against the reference (fp32): outputs, final state, all gradients, with an
# initial state and resets, near-1, ordinary and strongly decaying (to -50) channels.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, shape_name):
  _check_all(shape_name, impl)


@pytest.mark.parametrize("chunk_size", [7, 32, 64])
@pytest.mark.parametrize("impl", ("xla", "pallas_tpu"))
def test_other_chunk_sizes(impl, chunk_size):
  """T = 50 against chunks of 7, 32, 64 (one chunk longer than T), gradients too (the TPU
  reverse kernel walks the same front-padded chunks backwards)."""
  _check_all("btd", impl, chunk_size)


def test_associative_form_matches_reference():
  """The log-depth ``associative_scan`` form (not dispatched; kept for accelerators)."""
  from kernels.diag_scan.reference import diagonal_recurrence_associative  # noqa: PLC0415
  x = _inputs("btdn")
  h_r, s_r, _ = _reference_result("btdn")
  h, s = _call(_jit(diagonal_recurrence_associative), x)
  assert _per_group_rel_err(h_r, h) < 1e-5 and _per_group_rel_err(s_r, s) < 1e-5


def test_auto_with_defaults_matches_the_reference():
  x = _inputs("btdn")
  h, s = diagonal_recurrence(x["log_a"], x["b"])  # no state, no reset
  h_r, s_r = diagonal_recurrence(x["log_a"], x["b"], impl="reference")
  assert _per_group_rel_err(h_r, h) < 1e-5 and _per_group_rel_err(s_r, s) < 1e-5


def test_broadcast_time_invariant_decay():
  """A time-invariant ``[D]`` log decay (S4D with a fixed step) broadcasts, and its gradient
  is summed over batch and time, for the custom-VJP path as for autodiff."""
  x = _inputs("btd")
  la = -jnp.linspace(1e-3, 5.0, SHAPES["btd"][-1])
  res = {}
  for impl in ("reference", "pallas_gpu"):
    f = lambda la_, b_, impl=impl: jnp.sum(diagonal_recurrence(
        la_, b_, initial_state=x["initial_state"], reset=x["reset"], impl=impl,
        interpret=True)[0] * _weights(b_.shape)[0])
    res[impl] = jax.grad(f, argnums=(0, 1))(la, x["b"])
  assert res["pallas_gpu"][0].shape == la.shape
  for gr, gg in zip(res["reference"], res["pallas_gpu"]):
    np.testing.assert_allclose(gg, gr, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(gr))))


# ---------------------------------------------------------------------------------------
# bf16 inputs with fp32 accumulation: relative RMS error against the fp32 reference.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_relative_rms(impl):
  x = _inputs("btdn", jnp.bfloat16)
  h_r, s_r, g_r = _reference_result("btdn", "bfloat16")  # fp32 math on the same bf16 values
  h, s, grads = _call(_value_and_grad(impl), x)
  assert h.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  assert _rel_rms(h_r, h) < 1e-2
  assert _rel_rms(s_r, s) < 1e-2
  for name, gr, gg in zip(ARGS, g_r, grads):
    assert _rel_rms(gr, gg) < 1e-2, name


# ---------------------------------------------------------------------------------------
# Complex decays and inputs (S4D): reference and xla; "auto" never routes complex to Pallas.
# ---------------------------------------------------------------------------------------


def _complex_inputs():
  """S4D-Lin: ``A_n = -1/2 + i pi n``, ZOH ``log_a = dt A``, ``b = (exp(dt A) - 1)/A * B u``."""
  bn, t_, d_, n_ = B, T, 3, 4
  rng = np.random.default_rng(9)
  dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=(d_, 1)))
  a = -0.5 + 1j * np.pi * np.arange(n_)
  log_a = np.broadcast_to(dt * a, (bn, t_, d_, n_))
  bmat = rng.normal(size=(d_, n_)) + 1j * rng.normal(size=(d_, n_))
  u = rng.normal(size=(bn, t_, d_, 1))
  b = (np.exp(dt * a) - 1.0) / a * bmat * u
  h0 = rng.normal(size=(bn, d_, n_)) * (1 + 1j)
  c64 = lambda v: jnp.asarray(v, jnp.complex64)
  log_a, b, h0 = c64(log_a), c64(b), c64(h0)
  reset = jnp.zeros((bn, t_), bool).at[1, 17].set(True)
  return dict(log_a=log_a, b=b, initial_state=h0, reset=reset)


def test_complex_xla_matches_reference():
  x = _complex_inputs()
  h_r, s_r, g_r = _call(_value_and_grad("reference"), x)
  h, s, grads = _call(_value_and_grad("xla"), x)
  assert h.dtype == jnp.complex64 and s.dtype == jnp.complex64
  scale = lambda r: float(np.max(np.abs(np.asarray(r))))
  for r, g_ in [(h_r, h), (s_r, s)] + list(zip(g_r, grads)):
    assert np.max(np.abs(np.asarray(g_) - np.asarray(r))) < 1e-5 * scale(r)
  h_auto, _ = _call(_forward("auto"), x)  # auto: AUTO's row, xla instead of Pallas
  assert np.max(np.abs(np.asarray(h_auto) - np.asarray(h_r))) < 1e-5 * scale(h_r)
  with pytest.raises(ValueError, match="real inputs only"):
    diagonal_recurrence(x["log_a"], x["b"], impl="pallas_tpu", interpret=True)


# ---------------------------------------------------------------------------------------
# Documents, continuation, extremes.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ("reference",) + IMPLS)
def test_reset_blocks_information(impl):
  x = _inputs("btd")
  start = 29  # a document starts here in batch row 0
  reset = x["reset"].at[0, start].set(True)
  h1, s1 = _call(_forward(impl), x, reset=reset)
  changed = dict(b=x["b"].at[0, :start].mul(-3.0).at[0, :start].add(1.0),
                 log_a=x["log_a"].at[0, :start].add(-0.5),
                 initial_state=x["initial_state"] * 5.0)
  h2, s2 = _call(_forward(impl), x, reset=reset, **changed)
  np.testing.assert_array_equal(h2[0, start:], h1[0, start:])
  np.testing.assert_array_equal(s2[0], s1[0])
  assert not np.allclose(h2[0, :start], h1[0, :start])


@pytest.mark.parametrize("impl", IMPLS)
def test_two_calls_continue_exactly(impl):
  """Prefill in two calls (final_state -> initial_state) equals one call; the split is
  not a chunk boundary."""
  x = _inputs("btdn")
  split = 21
  first = {n: (a[:, :split] if n != "initial_state" else a) for n, a in x.items()}
  second = {n: (a[:, split:] if n != "initial_state" else a) for n, a in x.items()}
  fwd = _forward(impl)
  h_all, s_all = _call(fwd, x)
  h_a, s_a = _call(fwd, first)
  h_b, s_b = _call(fwd, second, initial_state=s_a)
  np.testing.assert_allclose(jnp.concatenate([h_a, h_b], axis=1), h_all, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(s_b, s_all, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_decays_finite(impl):
  """log_a = -1e4 (exp underflows to exactly 0) in the strong channels: finite values and
  gradients, and those channels reduce to h_t = b_t."""
  x = _inputs("btd")
  strong = (jnp.arange(SHAPES["btd"][-1]) % 3) == 2
  la = jnp.where(strong, -1e4, x["log_a"])
  h, s, grads = _call(_value_and_grad(impl), x, log_a=la)
  for a in (h, s) + tuple(grads):
    assert np.all(np.isfinite(np.asarray(a))), impl
  np.testing.assert_array_equal(np.asarray(h)[..., 2::3], np.asarray(x["b"])[..., 2::3])


def test_tpu_kernel_under_interpret_params_race_detection():
  """The TPU kernel once under the TPU interpreter (memory spaces, DMAs, race checks),
  forward and reverse (backward) directions."""
  rng = np.random.default_rng(3)
  shape = (1, 24, 3)
  la = jnp.asarray(-np.logaddexp(0.0, -(rng.normal(size=shape) + 2)), jnp.float32)
  b, w = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
  h0 = jnp.asarray(rng.normal(size=(1, 3)), jnp.float32)
  reset = jnp.zeros((1, 24), bool).at[0, 13].set(True)
  params = pltpu.InterpretParams(detect_races=True)

  def loss(impl, interpret, la, b, h0):
    h, hf = diagonal_recurrence(la, b, initial_state=h0, reset=reset, chunk_size=8,
                                impl=impl, interpret=interpret)
    return jnp.sum(h * w) + jnp.sum(hf)

  try:
    got = jax.grad(functools.partial(loss, "pallas_tpu", params), (0, 1, 2))(la, b, h0)
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # noqa: PLC0415
    assert ipc.races is not None and not ipc.races.races_found
    want = jax.grad(functools.partial(loss, "reference", False), (0, 1, 2))(la, b, h0)
    for gw, gg in zip(want, got):
      np.testing.assert_allclose(gg, gw, rtol=1e-5, atol=1e-5)
  finally:
    pltpu.reset_tpu_interpret_mode_state()


def test_xla_long_sequence_stays_finite_and_exact():
  """Numerics at length (T = 1,000,000): near-1 decays, log decays summed over 1e6 steps."""
  t_long = 1_000_000
  rng = np.random.default_rng(5)
  shape = (1, t_long, 4)
  la = jnp.asarray(-1e-3 * rng.uniform(size=shape), jnp.float32)
  b = jnp.asarray(rng.normal(size=shape), jnp.float32)
  h, s = _jit(lambda *a: diagonal_recurrence(*a, impl="xla"))(la, b)
  h_r, s_r = _jit(lambda *a: diagonal_recurrence(*a, impl="reference"))(la, b)
  assert np.all(np.isfinite(np.asarray(h))) and np.all(np.isfinite(np.asarray(s)))
  window = slice(t_long - 1024, t_long)
  np.testing.assert_allclose(h[:, window], h_r[:, window], rtol=1e-3,
                             atol=1e-3 * float(jnp.max(jnp.abs(h_r[:, window]))))
  np.testing.assert_allclose(s, s_r, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(s_r))))


# ---------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
  x = _inputs("btd")
  la, b = x["log_a"], x["b"]
  with pytest.raises(ValueError, match="b must be"):
    diagonal_recurrence(la[..., 0], b[..., 0])
  with pytest.raises(ValueError, match="floating"):
    diagonal_recurrence(la, jnp.ones(b.shape, jnp.int32))
  with pytest.raises(ValueError, match="log_a"):
    diagonal_recurrence(la[:, :-1], b)
  with pytest.raises(ValueError, match="initial_state"):
    diagonal_recurrence(la, b, initial_state=jnp.zeros((B, 7)))
  with pytest.raises(ValueError, match="reset"):
    diagonal_recurrence(la, b, reset=jnp.zeros((B, T + 1), bool))
  with pytest.raises(ValueError, match="impl"):
    diagonal_recurrence(la, b, impl="cuda")
  with pytest.raises(ValueError, match="chunk_size"):
    diagonal_recurrence(la, b, impl="pallas_tpu", chunk_size=0, interpret=True)


# ---------------------------------------------------------------------------------------
# Lowering for hardware we do not have: export at production shapes, forward and backward.
# ---------------------------------------------------------------------------------------

PROD = {"btd": (1, 8192, 2048),  # RG-LRU / S4D width
        "btdn": (1, 8192, 1024, 16)}  # Mamba-1 selective scan state, flattened to 16384


def _prod_args(shape_name):
  shape = PROD[shape_name]
  sd = jax.ShapeDtypeStruct
  return (sd(shape, jnp.float32), sd(shape, jnp.bfloat16),
          sd((shape[0],) + shape[2:], jnp.float32), sd(shape[:2], jnp.bool_))


@pytest.mark.parametrize("shape_name", sorted(PROD))
@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_lowering_production_shape(impl, platform, shape_name):
  args = _prod_args(shape_name)

  def fwd(la, b, h0, reset):
    return diagonal_recurrence(la, b, initial_state=h0, reset=reset, impl=impl)

  def loss(la, b, h0, reset):
    h, hf = fwd(la, b, h0, reset)
    return jnp.sum(h.astype(jnp.float32)) + jnp.sum(hf)

  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  exp_f = _export(fwd, args, platform)
  assert exp_f.mlir_module().count(marker) == 1
  exp_b = _export(jax.grad(loss, argnums=(0, 1, 2)), args, platform)
  # backward = the forward kernel (for the residual h) + the reverse-time adjoint kernel
  assert exp_b.mlir_module().count(marker) == 2
