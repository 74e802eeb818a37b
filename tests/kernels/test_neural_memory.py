"""kernels.neural_memory: the chunk-parallel ("xla") form against the per-token reference.

Each (impl, memory, chunk, case) is compiled once per module: one jitted ``value_and_grad``
returns the outputs, the final state ``(w0, m, s)`` and the gradients w.r.t. q, k, v, the
three gates, the initial weights and the initial state together. Cases: a fresh sequence
(``doc_pos=None``, no state), a carried state at a chunk boundary (``doc_pos=None``), and
``doc_pos`` with a carried state inside a chunk plus documents starting inside chunks (one of
them a single token).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.neural_memory import MemoryMLP, memory_recurrence
from tests.kernels.helpers import jit_fast, rel_rms

B, T, H, DH = 2, 11, 2, 4  # T is not a multiple of the chunk sizes used
ARGS = ("q", "k", "v", "log_keep", "log_eta", "theta")
# Spec A: depth 2, GELU, residual, per-token clipping at a norm that binds on some tokens;
# spec B: depth 3, SiLU, no residual, no clipping.
SPEC_A = MemoryMLP(dim=DH, hidden=6, depth=2, activation="gelu", residual=True,
                   max_grad_norm=1.0)
SPEC_B = MemoryMLP(dim=DH, hidden=5, depth=3, activation="silu", residual=False)
# Row 0 continues a document at position 6 (inside a chunk for C = 4; grid point at 8), then a
# new document starts at token 5; row 1 continues at 13, then a one-token document and another.
DOC_POS = np.array([[6, 7, 8, 9, 10, 0, 1, 2, 3, 4, 5],
                    [13, 14, 0, 0, 1, 2, 3, 4, 5, 6, 7]], np.int32)
FP32_TOL = 2e-6  # outputs and states: max |xla - ref| / max |ref|
GRAD_TOL = 5e-6


def _inputs(dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  l2 = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  x = dict(q=l2(jax.random.normal(ks[0], (B, T, H, DH))),
           k=l2(jax.random.normal(ks[1], (B, T, H, DH))),
           v=jax.random.normal(ks[2], (B, T, H, DH)),
           log_keep=jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 2.0),
           log_eta=jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 1.0),
           theta=0.5 * jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))))
  return {n: a.astype(dtype) for n, a in x.items()}


def _init_and_state(mlp, seed=1):
  """Initial weights [H, i, o] and a carried state (w0 != m, nonzero momentum)."""
  k0, k1, k2, k3 = jax.random.split(jax.random.key(seed), 4)
  init = mlp.init(k0, (H,))
  noise = lambda key, scale: tuple(
      scale * jax.random.normal(kk, (B,) + w.shape)
      for kk, w in zip(jax.random.split(key, len(init)), init))
  w0 = tuple(w + n for w, n in zip(init, noise(k1, 0.1)))
  m = tuple(w + n for w, n in zip(init, noise(k2, 0.1)))
  return init, (w0, m, noise(k3, 0.05))


def _probe(x):
  """A fixed, position-dependent cotangent for ``x``."""
  return jnp.sin(0.37 * jnp.arange(x.size, dtype=jnp.float32) + 0.1).reshape(x.shape)


@functools.lru_cache(maxsize=None)
def _value_and_grad(impl, mlp, chunk, case):
  """(args, init, state or None) -> (o, final, grads wrt (args, init, state)); compiled
  once."""
  doc_pos = jnp.asarray(DOC_POS) if case == "docs" else None

  def loss(args, init, state):
    o, final = memory_recurrence(mlp, init, *(args[n] for n in ARGS), chunk_size=chunk,
                                 state=state, doc_pos=doc_pos, impl=impl)
    scalar = jnp.sum(o * _probe(o)) + sum(
        jnp.sum(a * _probe(a)) for a in jax.tree.leaves(final))
    return scalar, (o, final)

  def run(args, init, state):
    (_, (o, final)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        args, init, state)
    return o, final, grads

  return jit_fast(run)


def _rel(ref, got):
  """max |got - ref| / max |ref| (0 when both are exactly zero)."""
  ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
  assert np.all(np.isfinite(got)), "non-finite values"
  err, scale = np.max(np.abs(got - ref)), np.max(np.abs(ref))
  if scale == 0:
    return 0.0 if err == 0 else np.inf
  return float(err / scale)


def _errors(ref, got):
  """Worst relative error of (outputs, final states, gradients) between two results."""
  (o_r, f_r, g_r), (o, f, g) = ref, got
  state_err = max(_rel(a, b) for a, b in zip(jax.tree.leaves(f_r), jax.tree.leaves(f)))
  grad_err = {jax.tree_util.keystr(path): _rel(a, b) for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(g_r)[0], jax.tree.leaves(g))}
  return _rel(o_r, o), state_err, grad_err


CASES = [(SPEC_A, 4, "docs"), (SPEC_B, 3, "state")]


@pytest.mark.parametrize("mlp,chunk,case", CASES,
                         ids=[f"{'AB'[m is SPEC_B]}-c{c}-{k}" for m, c, k in CASES])
def test_xla_matches_reference_outputs_states_and_gradients(mlp, chunk, case):
  init, state = _init_and_state(mlp)
  state = None if case == "fresh" else state
  args = _inputs()
  ref = _value_and_grad("reference", mlp, chunk, case)(args, init, state)
  got = _value_and_grad("xla", mlp, chunk, case)(args, init, state)
  o_err, s_err, g_err = _errors(ref, got)
  assert o_err < FP32_TOL and s_err < FP32_TOL, (o_err, s_err)
  assert max(g_err.values()) < GRAD_TOL, g_err
  # Every input matters (a gradient that is identically zero would compare trivially), but
  # in the "state" case (doc_pos None: a chunk boundary, no document start) the gradient
  # point is the carried memory m, not w0, and the initial weights are never used.
  args_g, init_g, (w0_g, m_g, s_g) = ref[2]
  unused = (w0_g, init_g) if case == "state" else ()
  for leaf in jax.tree.leaves((args_g, init_g, w0_g, m_g, s_g)):
    if any(leaf is u for u in jax.tree.leaves(unused)):
      assert float(jnp.max(jnp.abs(leaf))) == 0.0
    else:
      assert float(jnp.max(jnp.abs(leaf))) > 1e-4


def test_chunk_states_and_marked_memories_match_reference():
  """``return_chunk_states`` and ``memory_at`` (physical chunks of 4 tokens: [0, 4), [4, 8),
  [8, 11)), with ``doc_pos`` and a carried state, and from a fresh aligned start (spec B:
  the documents path of the depth-3 memory; its gradients are tested with spec A)."""
  init, state = _init_and_state(SPEC_B)
  args = tuple(_inputs()[n] for n in ARGS)
  marks = np.zeros((B, T), bool)
  marks[0, [2, 9]] = True
  marks[1, 5] = True  # row 1: no mark in chunks 0 and 2
  marked = np.array([[True, False], [False, True], [True, False]])  # [chunk, row]

  def run(impl, doc_pos, st):
    return jit_fast(lambda *a: memory_recurrence(
        SPEC_B, init, *a, chunk_size=4, state=st, doc_pos=doc_pos, return_chunk_states=True,
        memory_at=jnp.asarray(marks), impl=impl))(*args)

  for doc_pos, st in ((jnp.asarray(DOC_POS), state), (None, None)):
    ref, got = run("reference", doc_pos, st), run("xla", doc_pos, st)
    assert _rel(ref[0], got[0]) < FP32_TOL
    for a, b in zip(jax.tree.leaves(ref[1:3]), jax.tree.leaves(got[1:3])):
      assert a.shape == b.shape and _rel(a, b) < FP32_TOL
    assert jax.tree.leaves(ref[2])[0].shape[0] == 3  # three physical chunks
    for a, b in zip(ref[3], got[3]):
      assert a.shape == (3, B, H) + a.shape[3:]
      assert _rel(np.asarray(a)[marked], np.asarray(b)[marked]) < FP32_TOL
    # The last chunk state is the final state.
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(got[2])):
      np.testing.assert_array_equal(a, b[-1])


def test_token_by_token_decode_matches_reference():
  """T = 1 calls (the xla form's single-token path) continuing the carried state over
  ``DOC_POS`` equal one reference call over the whole sequence."""
  init, state = _init_and_state(SPEC_A)
  args = tuple(_inputs()[n] for n in ARGS)
  ref_o, ref_final = jit_fast(lambda *a: memory_recurrence(
      SPEC_A, init, *a, chunk_size=3, state=state, doc_pos=jnp.asarray(DOC_POS),
      impl="reference"))(*args)
  step = jit_fast(lambda st, dp, *a: memory_recurrence(SPEC_A, init, *a, chunk_size=3,
                                                      state=st, doc_pos=dp, impl="xla"))
  st, outs = state, []
  for t in range(T):
    o, st = step(st, jnp.asarray(DOC_POS[:, t:t + 1]), *(a[:, t:t + 1] for a in args))
    outs.append(o)
  assert _rel(ref_o, jnp.concatenate(outs, 1)) < FP32_TOL
  for a, b in zip(jax.tree.leaves(ref_final), jax.tree.leaves(st)):
    assert _rel(a, b) < FP32_TOL


def test_bf16_inputs_relative_rms():
  """bf16 q, k, v and gates (fp32 memory math): xla against the reference on the same
  bf16 values in fp32."""
  init, state = _init_and_state(SPEC_B)
  x16 = _inputs(jnp.bfloat16)
  x32 = {n: a.astype(jnp.float32) for n, a in x16.items()}
  o_r, f_r, g_r = _value_and_grad("reference", SPEC_B, 3, "state")(x32, init, state)
  o, f, g = _value_and_grad("xla", SPEC_B, 3, "state")(x16, init, state)
  assert o.dtype == jnp.float32 and g[0]["q"].dtype == jnp.bfloat16
  assert rel_rms(o_r, o) < 1e-5
  for a, b in zip(jax.tree.leaves(f_r), jax.tree.leaves(f)):
    assert rel_rms(a, b) < 1e-5
  for name in ARGS:  # bf16 cotangents: their rounding is ~1.7e-3 relative RMS
    assert rel_rms(g_r[0][name], g[0][name].astype(jnp.float32)) < 5e-3, name
  for a, b in zip(jax.tree.leaves(g_r[1:]), jax.tree.leaves(g[1:])):  # fp32 leaves
    if np.any(np.asarray(a)):  # w0's and init's gradients are exactly zero here
      assert rel_rms(a, b) < 1e-5


def test_auto_is_xla_and_arguments_are_checked():
  init, _ = _init_and_state(SPEC_A)
  args = tuple(_inputs()[n] for n in ARGS)
  call = lambda impl: (lambda *a: memory_recurrence(SPEC_A, init, *a, chunk_size=4,
                                                    impl=impl))
  jaxpr = {impl: jax.make_jaxpr(call(impl))(*args) for impl in ("auto", "xla", "reference")}
  scans = {impl: [e.params["length"] for e in j.eqns if e.primitive.name == "scan"]
           for impl, j in jaxpr.items()}
  # The chunked form scans over 3 chunks, the reference over 11 tokens.
  assert scans == {"auto": [3], "xla": [3], "reference": [T]}
  assert str(jaxpr["auto"]) == str(jaxpr["xla"]) != str(jaxpr["reference"])
  with pytest.raises(ValueError, match="impl"):
    call("pallas_gpu")(*args)
  with pytest.raises(ValueError, match="theta"):
    call("xla")(*args[:5], args[5][..., None])
  with pytest.raises(ValueError, match="init_weights"):
    memory_recurrence(SPEC_B, init, *args, chunk_size=4)
  with pytest.raises(ValueError, match="chunk_size"):
    memory_recurrence(SPEC_A, init, *args, chunk_size=0)


def test_reference_gradient_point_is_the_chunk_start():
  """The reference's chunk size changes its result (the gradient point is the chunk-start
  memory); token 0's update uses the initial weights whatever C is, so the first outputs
  agree."""
  init, _ = _init_and_state(SPEC_A)
  args = tuple(_inputs()[n] for n in ARGS)
  run = lambda c: jit_fast(lambda *a: memory_recurrence(SPEC_A, init, *a, chunk_size=c,
                                                         impl="reference")[0])(*args)
  o1, o4 = np.asarray(run(1)), np.asarray(run(4))
  np.testing.assert_allclose(o1[:, 0], o4[:, 0], rtol=0, atol=1e-7)
  assert np.max(np.abs(o1[:, 4:] - o4[:, 4:])) > 1e-3
