"""kernels.dplr: the Pallas kernels (``pallas_tpu``, ``pallas_gpu``) against the per-token
reference, through the public :func:`kernels.dplr.dplr_recurrence`.

The kernels run in interpret mode on CPU; the lowering tests export them for TPU and CUDA
at a production shape (no hardware needed). Inputs are RWKV-7-like (see :func:`_inputs`):
removal direction ``b`` an L2-normalised kappa, write direction ``a = -(iclr * b)``,
per-channel log decays ``-exp(speed + normal / 2)`` (channel speeds from near-1 decays to
fast ones, so the state crosses chunk boundaries) with stretches of ``-60`` (the state
forgotten to ~1e-26), a document reset inside a chunk, T not a multiple of any chunk size, a
nonzero initial state. Each (impl, chunk, dtype) is compiled once per module: one jitted
``value_and_grad`` returns outputs, final state and the gradients w.r.t. q, k, v, a, b,
log_decay and initial_state together.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.common import PALLAS_IMPLS
from kernels.dplr import dplr_recurrence
from tests.kernels.helpers import export as _export
from tests.kernels.helpers import jit_fast as _jit
from tests.kernels.helpers import per_head_rel_err, rel_rms

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# Dk != Dv (a transposed state would not fit) and neither a power of two >= 16 (the Triton
# kernel's zero padding is exercised); T is not a multiple of any chunk size used.
B, T, H, DK, DV = 2, 50, 2, 8, 12
ARGS = ("q", "k", "v", "a", "b", "log_decay", "initial_state")
CAST = ("q", "k", "v", "a", "b")  # the inputs given in the compute dtype


def _l2norm(x):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def _inputs(dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 9)
  q = jax.random.normal(ks[0], (B, T, H, DK)) / np.sqrt(DK)
  k = jax.random.normal(ks[1], (B, T, H, DK)) / np.sqrt(DK)
  v = jax.random.normal(ks[2], (B, T, H, DV))
  b = _l2norm(jax.random.normal(ks[3], (B, T, H, DK)))  # kappa_hat
  iclr = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H, DK)))  # in-context learning rate
  a = -(iclr * b)
  # per-channel decay speeds as RWKV-7 learns them: from near 1 (log ~ -2.5e-3) to fast
  # (log ~ -1), so the state survives chunk boundaries in the slow channels
  speed = jnp.linspace(-6.0, 0.0, DK)
  g = -jnp.exp(speed + 0.5 * jax.random.normal(ks[5], (B, T, H, DK)))
  # a stretch where every channel of head 1 forgets at once (exp(-60) ~ 1e-26), and a few
  # channels of head 0 elsewhere
  g = g.at[:, 20:24, 1].set(-60.0).at[:, 35:38, 0, :3].set(-60.0)
  s0 = jax.random.normal(ks[6], (B, H, DK, DV))
  reset = jnp.zeros((B, T), bool).at[0, 29].set(True).at[1, 7].set(True)
  cast = lambda x: x.astype(dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), a=cast(a), b=cast(b), log_decay=g,
              initial_state=s0, reset=reset)


def _weights():
  ks = jax.random.split(jax.random.PRNGKey(123), 2)
  return jax.random.normal(ks[0], (B, T, H, DV)), jax.random.normal(ks[1], (B, H, DK, DV))


@functools.lru_cache(maxsize=None)
def _value_and_grad(impl, chunk_size=32):
  """Jitted ``(o, final_state, grads)`` for one implementation and chunk size."""
  wo, ws = _weights()
  interpret = impl in PALLAS_IMPLS

  def loss(q, k, v, a, b, g, s0, reset):
    o, sf = dplr_recurrence(q, k, v, a, b, g, initial_state=s0, reset=reset,
                            chunk_size=chunk_size, impl=impl, interpret=interpret)
    return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(sf * ws), (o, sf)

  f = jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)

  def run(*args):
    (_, (o, sf)), grads = f(*args)
    return o, sf, grads

  return _jit(run)


@functools.lru_cache(maxsize=None)
def _forward(impl, chunk_size):
  return _jit(lambda q, k, v, a, b, g, s0, reset: dplr_recurrence(
      q, k, v, a, b, g, initial_state=s0, reset=reset, chunk_size=chunk_size, impl=impl,
      interpret=True))


def _call(fn, x):
  return fn(*(x[n] for n in ARGS), x["reset"])


def _as_f32(x):
  return {n: a.astype(jnp.float32) if n in CAST else a for n, a in x.items()}


@functools.lru_cache(maxsize=None)
def _reference_result(dtype_name="float32"):
  """The per-token reference in fp32 on the (possibly bf16-rounded) inputs."""
  return _call(_value_and_grad("reference"), _as_f32(_inputs(jnp.dtype(dtype_name))))


def _err(ref, got):
  return per_head_rel_err(ref, got, (B, T, H))


def errors(impl, chunk_size=32, dtype_name="float32"):
  """Per-head relative errors (fp32) or relative RMS errors (bf16) of outputs, final
  state and every gradient against the reference: ``{name: error}``."""
  x = _inputs(jnp.dtype(dtype_name))
  o_r, s_r, g_r = _reference_result(dtype_name)
  o, s, grads = _call(_value_and_grad(impl, chunk_size), x)
  assert o.dtype == x["q"].dtype and s.dtype == jnp.float32
  assert o.shape == (B, T, H, DV) and s.shape == (B, H, DK, DV)
  measure = _err if dtype_name == "float32" else rel_rms
  out = {"o": measure(o_r, o), "final_state": measure(s_r, s)}
  for name, gr, gg in zip(ARGS, g_r, grads):
    assert gg.shape == gr.shape, name
    out["d" + name] = measure(gr, gg)
  return out


def _check(errs, fwd_tol, grad_tol):
  for name, e in errs.items():
    tol = fwd_tol if name in ("o", "final_state") else grad_tol
    assert e <= tol, f"{name}: {e:.3g} > {tol:g}"


# ---------------------------------------------------------------------------------------
# fp32: outputs, final state and every gradient against the per-token reference.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_pallas_matches_reference(impl):
  _check(errors(impl), 1e-5, 1e-4)


@pytest.mark.parametrize("impl,chunk_size",
                         [("pallas_tpu", 16), ("pallas_tpu", 64), ("pallas_gpu", 16)])
def test_pallas_other_chunk_sizes_forward(impl, chunk_size):
  """Chunk 16 (4 chunks, the reset in the middle of one) and 64 (one front-padded chunk;
  the GPU kernel's 64-row tiles are covered by the lowering test)."""
  o_r, s_r, _ = _reference_result()
  o, s = _call(_forward(impl, chunk_size), _inputs())
  assert _err(o_r, o) <= 1e-5
  assert _err(s_r, s) <= 1e-5


# ---------------------------------------------------------------------------------------
# bf16 inputs (bf16 MXU operands, fp32 accumulation and state): relative RMS error against
# the fp32 reference on the same bf16 values.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_bf16_relative_rms(impl):
  _check(errors(impl, 32, "bfloat16"), 1e-2, 1e-2)


# ---------------------------------------------------------------------------------------
# Lowering for hardware we do not have: export at a production shape, forward and backward.
# ---------------------------------------------------------------------------------------

PROD = dict(B=1, T=8192, H=8, D=64)


def _prod_args():
  b_, t_, h_, d_ = PROD["B"], PROD["T"], PROD["H"], PROD["D"]
  sd = jax.ShapeDtypeStruct
  bf = sd((b_, t_, h_, d_), jnp.bfloat16)
  return (bf, bf, bf, bf, bf, sd((b_, t_, h_, d_), jnp.float32),
          sd((b_, h_, d_, d_), jnp.float32), sd((b_, t_), jnp.bool_))


@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_lowering_production_shape(impl, platform):
  """bf16 q, k, v, a, b, fp32 log decays, chunk 64: the forward has one kernel; the
  gradient the forward kernel (saving chunk states) and the reverse state-cotangent one."""
  args = _prod_args()

  def fwd(q, k, v, a, b, g, s0, reset):
    return dplr_recurrence(q, k, v, a, b, g, initial_state=s0, reset=reset, chunk_size=64,
                           impl=impl)

  def loss(*xs):
    o, sf = fwd(*xs)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(sf)

  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  exp_f = _export(fwd, args, platform)
  assert exp_f.mlir_module().count(marker) == 1
  exp_b = _export(jax.grad(loss, argnums=tuple(range(7))), args, platform)
  assert exp_b.mlir_module().count(marker) == 2
