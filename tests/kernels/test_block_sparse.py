"""kernels.block_sparse: every implementation against the dense masked reference, and the
reference against attention written out here.

Three cases, each compiled once per implementation (one jitted ``value_and_grad`` returns
the output and the gradients w.r.t. q, k, v):

  * ``mixed`` (causal, GQA H=2 / Hkv=1, lists passed as traced arguments): each (batch row,
    head) has its own pattern: (0, 0) full causal lists, (0, 1) landmark top-1 + own block,
    (1, 0) top-1 without the own block (query block 0 sees nothing), (1, 1) random lists
    with gaps;
  * ``window`` (H = Hkv = 2, sliding-window lists + the token window, with two extra junk
    padding slots; lists closed over, so they are concrete: the forward grid shrinks to
    the longest list and the dk/dv grid to the longest transposed list);
  * ``noncausal`` (``causal=False``, ``scale=0.3``, random lists that include future
    blocks).

Pallas kernels run in interpret mode on CPU; the lowering tests export them for TPU and CUDA
at T = 32768, block 128, D = 128, bf16 (no hardware needed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels.block_sparse import (block_sparse_attention, causal_blocks,
                                  sliding_window_blocks, topk_blocks)
from kernels.block_sparse.reference import normalize_lists
from kernels.common import PALLAS_IMPLS
from tests.kernels.helpers import export as _export
from tests.kernels.helpers import jit_fast as _jit
from tests.kernels.helpers import rel_rms

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

B, T, H, D, BS = 2, 64, 2, 16, 16
NQ = T // BS
WINDOW = 20
PALLAS = PALLAS_IMPLS
IMPLS = ("xla",) + PALLAS
CASES = ("mixed", "window", "noncausal")


def _random_lists(rng, shape, p, nq=NQ, causal=True):
  """Random distinct ascending lists (each block kept with probability p; causal: only
  blocks <= i), padded with junk past the count (must be ignored)."""
  keep = rng.uniform(size=shape + (nq,)) < p
  if causal:
    keep &= np.tril(np.ones((nq, nq), bool))
  idx = np.full(shape + (nq,), 7, np.int32)  # 7 is out of range: padding must be ignored
  cnt = keep.sum(-1).astype(np.int32)
  for pos in np.ndindex(*shape):
    row = np.nonzero(keep[pos])[0]
    idx[pos][:len(row)] = row
  return idx, cnt


def _topk_rows(scores, k, include_local):
  """Top-k past blocks by score (+ the own block), written out: one list per block."""
  return [sorted(np.argsort(-scores[i, :i], kind="stable")[:k].tolist()
                 + ([i] if include_local else [])) for i in range(len(scores))]


SCORES = np.random.default_rng(42).standard_normal((B, H, NQ, NQ)).astype(np.float32)


def _mixed_lists():
  idx, cnt = _random_lists(np.random.default_rng(43), (B, H, NQ), 0.6)
  patterns = {(0, 0): [list(range(i + 1)) for i in range(NQ)],
              (0, 1): _topk_rows(SCORES[0, 1], 1, True),
              (1, 0): _topk_rows(SCORES[1, 0], 1, False)}
  for (b, h), rows in patterns.items():
    for i, row in enumerate(rows):
      idx[b, h, i, :len(row)] = row
      cnt[b, h, i] = len(row)
  assert cnt[1, 0, 0] == 0
  return jnp.asarray(idx), jnp.asarray(cnt)


@functools.lru_cache(maxsize=None)
def _case(name):
  """``(q, k, v, idx, cnt, closed, causal, window, scale)`` of a case (fp32)."""
  rng = np.random.default_rng({"mixed": 0, "window": 1, "noncausal": 2}[name])
  hkv = 2 if name == "window" else 1
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  q, k, v = normal(B, T, H, D), normal(B, T, hkv, D), normal(B, T, hkv, D)
  if name == "mixed":
    idx, cnt = _mixed_lists()
    return q, k, v, idx, cnt, False, True, None, None
  if name == "window":
    idx, cnt = sliding_window_blocks(T, BS, WINDOW)
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, 0), (0, 2)), constant_values=-5)  # trimmed
    return q, k, v, idx, cnt, True, True, WINDOW, None
  idx, cnt = _random_lists(rng, (B, H, NQ), 0.5, causal=False)
  return q, k, v, jnp.asarray(idx), jnp.asarray(cnt), False, False, None, 0.3


def _weights():
  return jnp.asarray(np.random.default_rng(123).standard_normal((B, T, H, D)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _value_and_grad(impl, name, dtype_name="float32"):
  """Jitted ``run(q, k, v, idx, cnt) -> (o, (dq, dk, dv))`` for one case and impl."""
  _, _, _, idx0, cnt0, closed, causal, window, scale = _case(name)
  w = _weights()

  def loss(q, k, v, idx, cnt):
    if closed:  # concrete lists (as the helpers return them)
      idx, cnt = idx0, cnt0
    o = block_sparse_attention(q, k, v, idx, cnt, block_size=BS, causal=causal,
                               scale=scale, window=window, impl=impl, interpret=impl in PALLAS)
    return jnp.sum(o.astype(jnp.float32) * w), o

  f = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

  def run(q, k, v, idx, cnt):
    (_, o), grads = f(q, k, v, idx, cnt)
    return o, grads

  return _jit(run)


@functools.lru_cache(maxsize=None)
def _result(impl, name, dtype_name="float32"):
  q, k, v, idx, cnt, *_ = _case(name)
  if dtype_name != "float32":
    q, k, v = (x.astype(dtype_name) for x in (q, k, v))
    if impl == "reference":  # fp32 math on the same rounded values
      q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  return _value_and_grad(impl, name, dtype_name)(q, k, v, idx, cnt)


def _rel_err(ref, got):
  ref = np.asarray(ref, np.float64)
  got = np.asarray(got, np.float64)
  assert np.all(np.isfinite(got)), "non-finite values"
  return np.max(np.abs(got - ref)) / np.max(np.abs(ref))


# ---------------------------------------------------------------------------------------
# Attention written out here (numpy, float64): the reference must equal it.
# ---------------------------------------------------------------------------------------


def _dense(q, k, v, mask):
  """Softmax attention of [T, D] arrays under a [T, T] bool mask; empty rows give 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = q @ k.T / np.sqrt(q.shape[-1])
  s = np.where(mask, s, -np.inf)
  mx = np.max(s, axis=-1, keepdims=True)
  p = np.where(mask, np.exp(s - np.where(np.isfinite(mx), mx, 0.0)), 0.0)
  l = p.sum(-1, keepdims=True)
  return (p / np.where(l > 0, l, 1.0)) @ v


def test_reference_equals_attention_written_out():
  """Causal full lists == plain causal attention; window lists + window == dense windowed
  attention; top-k lists == attention under the listed blocks; the empty block is 0."""
  t = np.arange(T)
  tril = t[:, None] >= t[None, :]
  # mixed, (b, h) = (0, 0): full causal lists
  q, k, v, idx, cnt, *_ = _case("mixed")
  o_r = _result("reference", "mixed")[0]
  np.testing.assert_allclose(o_r[0, :, 0], _dense(q[0, :, 0], k[0, :, 0], v[0, :, 0], tril),
                             rtol=1e-5, atol=1e-5)
  # mixed, (b, h) = (0, 1): top-1 past block by score + the own block
  bm = np.eye(NQ, dtype=bool)
  for i in range(1, NQ):
    bm[i, int(np.argmax(SCORES[0, 1, i, :i]))] = True
  tok = np.repeat(np.repeat(bm, BS, 0), BS, 1) & tril
  np.testing.assert_allclose(o_r[0, :, 1], _dense(q[0, :, 1], k[0, :, 0], v[0, :, 0], tok),
                             rtol=1e-5, atol=1e-5)
  # mixed, (b, h) = (1, 0): query block 0 sees nothing -> exactly 0
  assert np.all(np.asarray(o_r[1, :BS, 0]) == 0.0)
  assert np.max(np.abs(np.asarray(o_r[1, BS:, 0]))) > 0.1
  # window: every row and head
  q, k, v, *_ = _case("window")
  o_r = _result("reference", "window")[0]
  win = tril & ((t[:, None] - t[None, :]) < WINDOW)
  for b in range(B):
    for h in range(H):
      np.testing.assert_allclose(o_r[b, :, h], _dense(q[b, :, h], k[b, :, h], v[b, :, h], win),
                                 rtol=1e-5, atol=1e-5)


def test_helpers_build_the_expected_lists():
  idx, cnt = causal_blocks(64, 16)
  assert idx.shape == (1, 1, 4, 4) and cnt.tolist() == [[[1, 2, 3, 4]]]
  assert idx[0, 0, 2, :3].tolist() == [0, 1, 2]
  rows = lambda idx, cnt: [np.asarray(idx)[0, 0, i, :c].tolist()
                           for i, c in enumerate(np.asarray(cnt)[0, 0])]
  # block i needs the keys >= 16 i - window + 1 (and <= 16 i + 15)
  assert rows(*sliding_window_blocks(64, 16, 20)) == [[0], [0, 1], [0, 1, 2], [1, 2, 3]]
  assert rows(*sliding_window_blocks(64, 16, 17)) == [[0], [0, 1], [1, 2], [2, 3]]
  assert rows(*sliding_window_blocks(64, 16, 16)) == [[0], [0, 1], [1, 2], [2, 3]]
  assert rows(*sliding_window_blocks(64, 16, 1)) == [[0], [1], [2], [3]]
  assert sliding_window_blocks(64, 16, 20)[0].shape == (1, 1, 4, 3)
  # padding (even out-of-range junk) becomes the row's last valid block; empty rows -> 0
  idx, cnt = normalize_lists(jnp.array([[[[2, 5, -1], [9, 9, 9]]]]), jnp.array([[[1, 0]]]),
                             1, 1, 4)
  assert idx.tolist() == [[[[2, 2, 2], [0, 0, 0]]]] and cnt.tolist() == [[[1, 0]]]
  # top-k against a brute force
  scores = np.random.default_rng(9).standard_normal((2, 3, 6, 6)).astype(np.float32)
  idx, cnt = map(np.asarray, topk_blocks(jnp.asarray(scores), 2, 16))
  assert idx.shape == (2, 3, 6, 3)
  for b, h, i in np.ndindex(2, 3, 6):
    want = _topk_rows(scores[b, h], 2, True)[i]
    assert idx[b, h, i, :cnt[b, h, i]].tolist() == want
    assert np.all(np.asarray(idx[b, h, i, cnt[b, h, i]:]) == want[-1])  # padding
  idx, cnt = topk_blocks(jnp.asarray(scores), 2, 16, include_local=False)
  assert cnt[0, 0].tolist() == [0, 1, 2, 2, 2, 2]


# ---------------------------------------------------------------------------------------
# Every implementation against the reference (fp32): outputs and gradients.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference(impl, name):
  o_r, g_r = _result("reference", name)
  o, grads = _result(impl, name)
  assert o.shape == (B, T, H, D) and o.dtype == jnp.float32
  assert _rel_err(o_r, o) < 1e-5
  for arg, gr, gg in zip("qkv", g_r, grads):
    assert gg.shape == gr.shape
    err = _rel_err(gr, gg)
    assert err < 1e-4, f"d{arg}: {err}"
  if name == "mixed":  # the block that sees nothing: output and dq exactly 0
    assert np.all(np.asarray(o[1, :BS, 0]) == 0.0)
    assert np.all(np.asarray(grads[0][1, :BS, 0]) == 0.0)


def test_xla_other_block_size_and_auto():
  """block_size 8 (not a Pallas size) with MHA, and ``impl="auto"`` (= xla on CPU)."""
  q, k, v, *_ = _case("window")
  idx, cnt = sliding_window_blocks(T, 8, 11)
  run = lambda impl: _jit(lambda q, k, v: block_sparse_attention(
      q, k, v, idx, cnt, block_size=8, window=11, impl=impl))(q, k, v)
  o_r = run("reference")
  assert _rel_err(o_r, run("auto")) < 1e-5
  t = np.arange(T)
  win = (t[:, None] >= t[None, :]) & ((t[:, None] - t[None, :]) < 11)
  np.testing.assert_allclose(o_r[1, :, 1], _dense(q[1, :, 1], k[1, :, 1], v[1, :, 1], win),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# bf16 inputs with fp32 softmax: relative RMS error against fp32 math on the same values.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_relative_rms(impl):
  o_r, g_r = _result("reference", "mixed", "bfloat16")
  o, grads = _result(impl, "mixed", "bfloat16")
  assert o.dtype == jnp.bfloat16
  assert rel_rms(o_r, o) < 1e-2
  for arg, gr, gg in zip("qkv", g_r, grads):
    assert gg.dtype == jnp.bfloat16
    assert rel_rms(gr, gg) < 2e-2, arg


# ---------------------------------------------------------------------------------------
# TPU interpreter (memory spaces, DMAs, races), errors.
# ---------------------------------------------------------------------------------------


def test_tpu_kernels_under_interpret_params_race_detection():
  rng = np.random.default_rng(3)
  t_ = 32
  q, k, v = (jnp.asarray(rng.standard_normal((1, t_, h, 8)), jnp.float32) for h in (2, 1, 1))
  idx, cnt = causal_blocks(t_, 16)
  params = pltpu.InterpretParams(detect_races=True)

  def run(impl, interpret):
    def loss(q, k, v):
      o = block_sparse_attention(q, k, v, idx, cnt, block_size=16, impl=impl,
                                 interpret=interpret)
      return jnp.sum(o * jnp.arange(8.0)), o
    return _jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  try:
    (_, o), g = run("pallas_tpu", params)
    (_, o_r), g_r = run("reference", False)
    assert _rel_err(o_r, o) < 1e-5
    for gr, gg in zip(g_r, g):
      assert _rel_err(gr, gg) < 1e-4
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc  # noqa: PLC0415
    assert ipc.races is not None and not ipc.races.races_found
  finally:
    pltpu.reset_tpu_interpret_mode_state()


def test_bad_inputs_raise_clear_errors():
  q, k, v, idx, cnt, *_ = _case("mixed")
  call = functools.partial(block_sparse_attention, block_size=BS)
  with pytest.raises(ValueError, match="multiple of block_size"):
    block_sparse_attention(q, k, v, idx, cnt, block_size=24)
  with pytest.raises(ValueError, match="block_indices"):
    call(q, k, v, idx[:, :, :2], cnt)
  with pytest.raises(ValueError, match="block_counts"):
    call(q, k, v, idx, cnt[..., :2])
  with pytest.raises(ValueError, match="multiple of the number"):
    kv2 = jnp.zeros((B, T, 2, D))
    call(jnp.zeros((B, T, 3, D)), kv2, kv2, idx[:, :1], cnt[:, :1])
  with pytest.raises(ValueError, match="v must"):
    call(q, k, v[:, :, :, :8], idx, cnt)
  with pytest.raises(ValueError, match="window"):
    call(q, k, v, idx, cnt, window=0)
  with pytest.raises(ValueError, match="impl"):
    call(q, k, v, idx, cnt, impl="cuda")
  with pytest.raises(ValueError, match="multiple of 16"):
    block_sparse_attention(q, k, v, *causal_blocks(T, 8), block_size=8, impl="pallas_tpu",
                           interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    block_sparse_attention(q[:, :48], k[:, :48], v[:, :48], *causal_blocks(48, 48),
                           block_size=48, impl="pallas_gpu", interpret=True)
  with pytest.raises(ValueError, match="window"):
    sliding_window_blocks(T, BS, 0)
  with pytest.raises(ValueError, match="T="):
    causal_blocks(50, 16)


# ---------------------------------------------------------------------------------------
# Lowering for hardware we do not have: T = 32768, block 128, D = 128, bf16, forward and
# backward, full causal lists as traced arguments (the largest grid).
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_lowering_production_shape(impl, platform):
  b_, t_, h_, hkv, d_, bs = 1, 32768, 2, 1, 128, 128
  nq = t_ // bs
  sd = jax.ShapeDtypeStruct
  args = (sd((b_, t_, h_, d_), jnp.bfloat16), sd((b_, t_, hkv, d_), jnp.bfloat16),
          sd((b_, t_, hkv, d_), jnp.bfloat16), sd((b_, h_, nq, nq), jnp.int32),
          sd((b_, h_, nq), jnp.int32))

  def fwd(q, k, v, idx, cnt):
    return block_sparse_attention(q, k, v, idx, cnt, block_size=bs, impl=impl)

  def loss(q, k, v, idx, cnt):
    return jnp.sum(fwd(q, k, v, idx, cnt).astype(jnp.float32))

  marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert _export(fwd, args, platform).mlir_module().count(marker) == 1
  # backward: the forward (for lse) + the dq and dk/dv kernels
  exp_b = _export(jax.grad(loss, argnums=(0, 1, 2)), args, platform)
  assert exp_b.mlir_module().count(marker) == 3
