"""kernels.delta_rule: every implementation against the per-token reference.

Pallas kernels run in interpret mode on CPU; the lowering tests export them for TPU and
CUDA at a production shape (no hardware needed). Each (impl, gating, chunk) is compiled
once per module: one jitted ``value_and_grad`` returns outputs, final state and the
gradients w.r.t. q, k, v, beta, log_decay and initial_state together. Keys are
L2-normalised as DeltaNet / Gated DeltaNet callers do (one unnormalised case for the
reference and xla forms).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels.common import PALLAS_IMPLS
from kernels.delta_rule import delta_rule
from tests.kernels.helpers import export as _export
from tests.kernels.helpers import jit_fast as _jit
from tests.kernels.helpers import per_head_rel_err, rel_rms

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

B, T, H, DK, DV = 2, 50, 2, 8, 8  # T is not a multiple of any chunk size used
PALLAS = PALLAS_IMPLS
ARGS = ("q", "k", "v", "beta", "log_decay", "initial_state")


def _l2norm(x):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def _inputs(gated, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (B, T, H, DK)) / np.sqrt(DK)
  k = _l2norm(jax.random.normal(ks[1], (B, T, H, DK)))
  v = jax.random.normal(ks[2], (B, T, H, DV))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
  s0 = jax.random.normal(ks[4], (B, H, DK, DV))
  reset = jax.random.uniform(ks[5], (B, T)) < 0.08
  reset = reset.at[0, 0].set(True).at[1, T - 1].set(True)
  if gated:
    # head 0: Gated-DeltaNet-like gates from near 1 (-1e-3) to ordinary (-1.6);
    # head 1: strongly decaying gates (-20 .. -50 per step)
    ordinary = -jnp.exp(jax.random.uniform(ks[6], (B, T), minval=-7.0, maxval=0.5))
    strong = -20.0 - 30.0 * jax.random.uniform(ks[7], (B, T))
    g = jnp.stack([ordinary, strong], axis=-1)
  else:
    g = None
  cast = lambda x: x.astype(dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), beta=cast(beta), log_decay=g,
              initial_state=s0, reset=reset)


def _weights():
  ks = jax.random.split(jax.random.PRNGKey(123), 2)
  return jax.random.normal(ks[0], (B, T, H, DV)), jax.random.normal(ks[1], (B, H, DK, DV))


def _value_and_grad(impl, chunk_size=32):
  """Jitted (o, final_state, grads) for one implementation (one per (impl, chunk))."""
  return _value_and_grad_cached(impl, chunk_size)


@functools.lru_cache(maxsize=None)
def _value_and_grad_cached(impl, chunk_size):
  wo, ws = _weights()
  interpret = impl in PALLAS

  def loss(q, k, v, beta, g, s0, reset):
    o, sf = delta_rule(q, k, v, beta, g, initial_state=s0, reset=reset,
                       chunk_size=chunk_size, impl=impl, interpret=interpret)
    return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(sf * ws), (o, sf)

  f = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True)

  def run(q, k, v, beta, g, s0, reset):
    (_, (o, sf)), grads = f(q, k, v, beta, g, s0, reset)
    return o, sf, grads

  return _jit(run)


def _forward(impl, chunk_size=32):
  return _forward_cached(impl, chunk_size)


@functools.lru_cache(maxsize=None)
def _forward_cached(impl, chunk_size):
  interpret = impl in PALLAS
  return _jit(lambda q, k, v, beta, g, s0, reset: delta_rule(
      q, k, v, beta, g, initial_state=s0, reset=reset, chunk_size=chunk_size, impl=impl,
      interpret=interpret))


def _call(fn, x, **over):
  x = {**x, **over}
  return fn(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], x["initial_state"],
            x["reset"])


def _per_head_rel_err(ref, got):
  return per_head_rel_err(ref, got, (B, T, H))


_rel_rms = rel_rms


def _as_f32(x):
  return {n: (None if a is None else a.astype(jnp.float32)) if n in ("q", "k", "v", "beta")
          else a for n, a in x.items()}


@functools.lru_cache(maxsize=None)
def _reference_result(gated, dtype_name="float32"):
  return _call(_value_and_grad("reference"), _as_f32(_inputs(gated, jnp.dtype(dtype_name))))


def _check_all(x, ref, impl, chunk_size, fwd_tol, grad_tol):
  o_r, s_r, g_r = ref
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
# initial state and resets, near-1, ordinary and strongly decaying gates (see _inputs).
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated,chunk_size", [(False, 32), (True, 16), (True, 32), (True, 64)])
def test_xla_matches_reference(gated, chunk_size):
  _check_all(_inputs(gated), _reference_result(gated), "xla", chunk_size, 1e-5, 1e-4)


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("gated", [False, True])
def test_pallas_matches_reference(gated, impl):
  _check_all(_inputs(gated), _reference_result(gated), impl, 32, 1e-5, 1e-4)


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_other_chunk_sizes_forward(impl, chunk_size):
  x = _inputs(True)
  o_r, s_r, _ = _reference_result(True)
  o, s = _call(_forward(impl, chunk_size), x)
  assert _per_head_rel_err(o_r, o) < 1e-5
  assert _per_head_rel_err(s_r, s) < 1e-5


def test_unnormalised_keys_reference_and_xla():
  """Keys not L2-normalised (|k| ~ 1.3, beta up to 1.2: still a contraction per step)."""
  x = _inputs(True, seed=1)
  x["k"] = x["k"] * (0.8 + 0.5 * jax.random.uniform(jax.random.PRNGKey(9), (B, T, H, 1)))
  x["beta"] = x["beta"] * 1.2
  ref = _call(_value_and_grad("reference"), x)
  _check_all(x, ref, "xla", 32, 1e-5, 1e-4)


def test_auto_is_xla_on_cpu_and_defaults():
  x = _inputs(True)
  args = (x["q"], x["k"], x["v"], x["beta"], x["log_decay"])  # no initial state, no reset
  o, s = _jit(lambda *a: delta_rule(*a))(*args)
  o_r, s_r = _jit(lambda *a: delta_rule(*a, impl="reference"))(*args)
  assert _per_head_rel_err(o_r, o) < 1e-5 and _per_head_rel_err(s_r, s) < 1e-5


# ---------------------------------------------------------------------------------------
# bf16 inputs with fp32 accumulation: relative RMS error against the fp32 reference.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ("xla",) + PALLAS)
def test_bf16_relative_rms(impl):
  x = _inputs(True, jnp.bfloat16)
  o_r, s_r, g_r = _reference_result(True, "bfloat16")  # fp32 math on the same bf16 values
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
  x = _inputs(True)
  start = 29  # a document starts here in batch row 0 (inside a chunk of 32 / 16)
  reset = x["reset"].at[0, start].set(True)
  o1, s1, _ = _call(_value_and_grad(impl), x, reset=reset)
  noise = jax.random.normal(jax.random.PRNGKey(7), (B, start, H, DK))
  changed = dict(
      q=x["q"].at[0, :start].add(noise[0]),
      k=x["k"].at[0, :start].set(_l2norm(noise[0])),
      v=x["v"].at[0, :start].mul(-3.0),
      beta=x["beta"].at[0, :start].set(1.0 - x["beta"][0, :start]),
      log_decay=x["log_decay"].at[0, :start].add(-0.5),
      initial_state=x["initial_state"] * 5.0)
  o2, s2, _ = _call(_value_and_grad(impl), x, reset=reset, **changed)
  # Equal up to rounding (earlier log decays in the same chunk shift the cumulative sums);
  # any leak of the changed tokens would be O(1).
  np.testing.assert_allclose(o2[0, start:], o1[0, start:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s2[0], s1[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(o2[0, :start], o1[0, :start])


@pytest.mark.parametrize("impl", ("xla",) + PALLAS)
def test_two_calls_continue_exactly(impl):
  """Prefill in two calls (final_state -> initial_state) equals one call; split at a token
  that is not a chunk boundary (into equal halves: one compiled function)."""
  x = _inputs(True)
  split = T // 2
  first = {n: (a[:, :split] if n != "initial_state" and a is not None else a)
           for n, a in x.items()}
  second = {n: (a[:, split:] if n != "initial_state" and a is not None else a)
            for n, a in x.items()}
  fwd = _forward(impl)
  o_all, s_all, _ = _call(_value_and_grad(impl), x)
  o_a, s_a = _call(fwd, first)
  o_b, s_b = _call(fwd, second, initial_state=s_a)
  np.testing.assert_allclose(jnp.concatenate([o_a, o_b], axis=1), o_all, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(s_b, s_all, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ("xla",) + PALLAS)
def test_extreme_gates_finite_and_exact(impl):
  """Saturated gates with beta alternating near 0 (1e-6) and near 1 (1 - 1e-6): head 0 has
  mild gates (-0.01) with a saturated one (-1e4: exp underflows to exactly 0) every 7
  tokens, head 1 strongly decaying gates (-20 .. -50) everywhere. Everything finite (the
  known NaN source of WY preparations is exp(-b)) and still the reference's values (pair
  decays after a saturated gate are segment sums, not differences of huge prefix sums)."""
  x = _inputs(True)
  strong = -20.0 - 30.0 * jax.random.uniform(jax.random.PRNGKey(4), (B, T))
  mild = jnp.full((B, T), -0.01).at[:, 3::7].set(-1e4)
  g = jnp.stack([mild, strong], axis=-1)
  tok = jnp.arange(T)[None, :, None]
  beta = jnp.where(tok % 2 == 0, 1e-6, 1.0 - 1e-6) * jnp.ones((B, T, H))
  ref = _call(_value_and_grad("reference"), x, log_decay=g, beta=beta)
  got = _call(_value_and_grad(impl), x, log_decay=g, beta=beta)
  for a in (got[0], got[1]) + tuple(got[2]):
    assert np.all(np.isfinite(np.asarray(a))), impl
  _check_all({**x, "log_decay": g, "beta": beta}, ref, impl, 32, 1e-5, 1e-4)


def test_tpu_kernel_under_interpret_params_race_detection():
  """The TPU kernels (forward and backward) once under the TPU interpreter (memory spaces,
  DMAs, race checks)."""
  ks = jax.random.split(jax.random.PRNGKey(3), 6)
  b_, t_, h_, d_ = 1, 32, 1, 8
  q = jax.random.normal(ks[0], (b_, t_, h_, d_))
  k = _l2norm(jax.random.normal(ks[1], (b_, t_, h_, d_)))
  v = jax.random.normal(ks[2], (b_, t_, h_, d_))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b_, t_, h_)))
  g = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b_, t_, h_)) + 2)
  s0 = jax.random.normal(ks[5], (b_, h_, d_, d_))
  reset = jnp.zeros((b_, t_), bool).at[0, 20].set(True)
  params = pltpu.InterpretParams(detect_races=True)

  def loss(impl, interpret, *a):
    o, s = delta_rule(*a[:5], initial_state=a[5], reset=reset, chunk_size=16, impl=impl,
                      interpret=interpret)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * s)

  args = (q, k, v, beta, g, s0)
  grad = lambda impl, interpret: _jit(jax.grad(functools.partial(loss, impl, interpret),
                                               argnums=range(6)))(*args)
  try:
    grads = grad("pallas_tpu", params)
    grads_r = grad("reference", False)
    for gr, gg in zip(grads_r, grads):
      np.testing.assert_allclose(gg, gr, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(gr))))
    # The interpreter records races in a module-level state (no public accessor yet).
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # noqa: PLC0415
    assert ipc.races is not None and not ipc.races.races_found
  finally:
    pltpu.reset_tpu_interpret_mode_state()


def test_xla_long_sequence_stays_finite_and_exact():
  """Numerics at length (T = 1,000,000): near-1 gates, state carried across ~62k chunks."""
  t_long = 1_000_000
  ks = jax.random.split(jax.random.PRNGKey(5), 5)
  shape = (1, t_long, 1, 4)
  q = jax.random.normal(ks[0], shape)
  k = _l2norm(jax.random.normal(ks[1], shape))
  v = jax.random.normal(ks[2], shape)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], shape[:3]) - 2.0)
  g = -1e-3 * jax.random.uniform(ks[4], shape[:3])
  o, s = _jit(lambda *a: delta_rule(*a, chunk_size=16, impl="xla"))(q, k, v, beta, g)
  o_r, s_r = _jit(lambda *a: delta_rule(*a, impl="reference"))(q, k, v, beta, g)
  assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(s)))
  window = slice(t_long - 1024, t_long)
  np.testing.assert_allclose(o[:, window], o_r[:, window], rtol=1e-3,
                             atol=1e-3 * float(jnp.max(jnp.abs(o_r[:, window]))))
  np.testing.assert_allclose(s, s_r, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(s_r))))


# ---------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
  x = _inputs(False)
  q, k, v, beta = x["q"], x["k"], x["v"], x["beta"]
  with pytest.raises(ValueError, match="beta"):
    delta_rule(q, k, v, beta[..., None])
  with pytest.raises(ValueError, match="log_decay"):
    delta_rule(q, k, v, beta, jnp.zeros((B, T, H, DK)))  # per-channel gates: not this op
  with pytest.raises(ValueError, match="initial_state"):
    delta_rule(q, k, v, beta, initial_state=jnp.zeros((B, H, DK, DV + 1)))
  with pytest.raises(ValueError, match="reset"):
    delta_rule(q, k, v, beta, reset=jnp.zeros((B, T + 1), bool))
  with pytest.raises(ValueError, match="k must"):
    delta_rule(q, k[:, :-1], v, beta)
  with pytest.raises(ValueError, match="impl"):
    delta_rule(q, k, v, beta, impl="cuda")
  with pytest.raises(ValueError, match="multiple of 16"):
    delta_rule(q, k, v, beta, impl="pallas_tpu", chunk_size=24, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    delta_rule(q, k, v, beta, impl="pallas_gpu", chunk_size=48, interpret=True)


# ---------------------------------------------------------------------------------------
# Lowering for hardware we do not have: export at a production shape, forward and backward.
# ---------------------------------------------------------------------------------------

PROD = dict(B=1, T=8192, H=8, D=128)


def _prod_args(gated):
  b_, t_, h_, d_ = PROD["B"], PROD["T"], PROD["H"], PROD["D"]
  sd = jax.ShapeDtypeStruct
  bf = lambda *s: sd(s, jnp.bfloat16)
  g = sd((b_, t_, h_), jnp.float32) if gated else None
  return (bf(b_, t_, h_, d_), bf(b_, t_, h_, d_), bf(b_, t_, h_, d_), bf(b_, t_, h_), g,
          sd((b_, h_, d_, d_), jnp.float32), sd((b_, t_), jnp.bool_))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_lowering_production_shape(impl, platform, gated):
  args = _prod_args(gated)

  def fwd(q, k, v, beta, g, s0, reset):
    return delta_rule(q, k, v, beta, g, initial_state=s0, reset=reset, chunk_size=64,
                      impl=impl)

  def loss(*a):
    o, sf = fwd(*a)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(sf)

  argnums = (0, 1, 2, 3, 4, 5) if gated else (0, 1, 2, 3, 5)
  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  exp_f = _export(fwd, args, platform)
  assert exp_f.mlir_module().count(marker) == 1
  exp_b = _export(jax.grad(loss, argnums=argnums), args, platform)
  # backward = the forward kernel (saving chunk states) + the reverse state-cotangent kernel
  assert exp_b.mlir_module().count(marker) == 2
