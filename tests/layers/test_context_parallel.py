"""Context parallelism (layers/context_parallel/): the primitives against sequential
ground truth, and every wired mixer split over ``sequence`` = 2, 4 or 8 of the suite's 8
CPU devices against the same mixer unsplit: outputs and the gradients w.r.t. the input and
every parameter, fp32, with packed documents that cross shard boundaries and one that
starts exactly on one. Compile time dominates: each mixer's unsplit and split forms are
one program, compiled once at XLA optimisation level 0, and shapes are tiny.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from layers import context_parallel as cp
from lcm import registry

FAST = {"xla_backend_optimization_level": 0}
B, T, D = 2, 32, 16
# Row 0: documents start at 0, 5, 16, 27 (16 is a shard boundary for n = 2, 4, 8; 5..15
# spans whole shards when n = 8). Row 1: 0, 11, 21 (11..20 crosses 16, and 12 / 20 at n = 8).
STARTS = ((0, 5, 16, 27), (0, 11, 21))
TOL = 1e-5


def _starts() -> np.ndarray:
  s = np.zeros((B, T), bool)
  for row, idx in enumerate(STARTS):
    s[row, list(idx)] = True
  return s


RESET = jnp.asarray(_starts())
SEGMENT_IDS = jnp.asarray(np.cumsum(_starts(), axis=1), jnp.int32)


def mesh(n: int) -> Mesh:
  """All 8 devices as (data, sequence) = (8 / n, n): the other axis stays automatic."""
  devices = np.asarray(jax.devices()).reshape(8 // n, n)
  return Mesh(devices, ("data", cp.AXIS), axis_types=(AxisType.Auto,) * 2)


def run(fn, args, n: int | None):
  """fn(*args) compiled once at level 0; with n, traced inside the n-way sequence context."""
  if n is None:
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST)(*args)
  m = mesh(n)

  def sharded(*a):
    with cp.sequence_context(m):
      return fn(*a)
  args = jax.device_put(args, NamedSharding(m, P()))
  return jax.jit(sharded).lower(*args).compile(compiler_options=FAST)(*args)


def rel_err(got, ref) -> float:
  """max |got - ref| / max |ref| over one array."""
  dtype = np.complex128 if np.iscomplexobj(got) or np.iscomplexobj(ref) else np.float64
  got, ref = np.asarray(got, dtype), np.asarray(ref, dtype)
  return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def worst(got, ref) -> float:
  return max(rel_err(g, r) for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))


# ----------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------


def test_sequence_mesh_needs_an_axis_that_divides_the_length():
  assert cp.sequence_mesh() is None  # no context mesh
  with cp.sequence_context(mesh(4)):
    assert cp.sequence_mesh(32) is not None
    assert cp.sequence_mesh(30) is None  # 4 does not divide 30: the plain path
  with cp.sequence_context(Mesh(np.asarray(jax.devices()).reshape(8, 1), ("data", cp.AXIS))):
    assert cp.sequence_mesh(32) is None  # a sequence axis of one device


def test_halo_is_the_previous_tokens():
  n, length = 4, 3
  x = jnp.arange(1, 2 * n * length + 1, dtype=jnp.int32).reshape(2, n * length)
  widths = (1, 3, 5, 12)  # within one shard, exactly one, two hops, beyond the sequence

  def body(xl):
    return tuple(cp.halo(xl, w, fill=-1) for w in widths)
  fn = jax.shard_map(body, mesh=mesh(n), in_specs=P(None, cp.AXIS),
                     out_specs=tuple(P(None, cp.AXIS) for _ in widths),
                     axis_names=frozenset({cp.AXIS}))
  got = run(fn, (x,), None)
  xn = np.asarray(x)
  for w, h in zip(widths, got):
    h = np.asarray(h).reshape(2, n, w)
    for r in range(n):
      idx = np.arange(r * length - w, r * length)
      want = np.where(idx >= 0, xn[:, np.maximum(idx, 0)], -1)
      np.testing.assert_array_equal(h[:, r], want, err_msg=f"width {w}, shard {r}")


def test_exclusive_affine_prefix_matches_a_sequential_hand_off():
  n = 4
  keys = jax.random.split(jax.random.key(0), 5)
  b = jax.random.normal(keys[0], (n, 2, 3, 4, 5))  # per shard: [B, H, Dk, Dv]
  log_head = -jax.nn.softplus(jax.random.normal(keys[1], (n, 2, 3)))
  log_head = log_head.at[2, 0, 1].set(-jnp.inf)  # a reset inside shard 2 (row 0, head 1)
  log_chan = -jax.nn.softplus(jax.random.normal(keys[2], (n, 2, 3, 4)))
  dense = 0.5 * jax.random.normal(keys[3], (n, 2, 3, 4, 4))
  s0 = jax.random.normal(keys[4], (2, 3, 4, 5))

  def body(b, lh, lc, a):
    outs = (cp.exclusive_affine_prefix(lh[0], b[0], initial=s0),
            cp.exclusive_affine_prefix(lc[0], b[0]),
            cp.exclusive_affine_prefix(a[0], b[0], dense=True, initial=s0))
    return tuple((s_in[None], s_tot[None]) for s_in, s_tot in outs)
  spec = P(cp.AXIS)
  fn = jax.shard_map(body, mesh=mesh(n), in_specs=(spec,) * 4, out_specs=spec,
                     axis_names=frozenset({cp.AXIS}))
  got = run(fn, (b, log_head, log_chan, dense), None)

  def sequential(apply, s):
    ins = []
    for r in range(n):
      ins.append(s)
      s = apply(r, s) + b[r]
    return jnp.stack(ins), s
  want = (
      sequential(lambda r, s: jnp.exp(log_head[r])[..., None, None] * s, s0),
      sequential(lambda r, s: jnp.exp(log_chan[r])[..., None] * s, jnp.zeros_like(s0)),
      sequential(lambda r, s: jnp.einsum("bhij,bhjk->bhik", dense[r], s), s0),
  )
  for (g_in, g_tot), (w_in, w_tot) in zip(got, want):
    assert rel_err(g_in, w_in) < TOL
    for r in range(n):  # the total is the same on every shard
      assert rel_err(g_tot[r], w_tot) < TOL


def _recurrence_inputs():
  keys = jax.random.split(jax.random.key(1), 5)
  h, g, dk, dv = 4, 2, 8, 6  # grouped q / k: head h reads group h // 2
  return (jax.random.normal(keys[0], (B, T, g, dk)), jax.random.normal(keys[1], (B, T, g, dk)),
          jax.random.normal(keys[2], (B, T, h, dv)),
          -jax.nn.softplus(jax.random.normal(keys[3], (B, T, h, dk))),  # per key channel
          jax.random.normal(keys[4], (B, h, dk, dv)))


def _recurrence_loss(q, k, v, g, s0):
  """The TPU Pallas kernel (interpreted) inside the shard_map: its custom VJP and its
  untyped outputs (no varying-axes annotation; see context_parallel.linear_recurrence)."""
  o, sf = cp.linear_recurrence(q, k, v, g, initial_state=s0, reset=RESET, chunk_size=16,
                               impl="pallas_tpu", interpret=True)
  return jnp.sum(o * jnp.cos(o)) + jnp.sum(sf * sf), (o, sf)


_recurrence_grad = jax.value_and_grad(_recurrence_loss, argnums=(0, 1, 2, 3, 4), has_aux=True)


@pytest.fixture(scope="module")
def recurrence_ref():
  args = _recurrence_inputs()
  return args, run(_recurrence_grad, args, None)


def test_linear_recurrence_with_initial_state_matches_the_kernel(recurrence_ref):
  """Grouped q / k, per-channel decays, an initial state and resets: outputs, final state
  and all gradients (the initial state's too) equal the single-device kernel."""
  args, ref = recurrence_ref
  got = run(_recurrence_grad, args, 2)
  assert worst(got, ref) < TOL


def _delta_diag_loss(q, k, v, beta, g, s0, log_a, b, h0):
  """The delta rule (TPU Pallas kernel, interpreted; gated, with an initial state) and the
  diagonal recurrence (complex, as S4D; a time-invariant and a per-token decay)."""
  o, sf = cp.delta_rule(q, k, v, beta, g, initial_state=s0, reset=RESET, chunk_size=16,
                        impl="pallas_tpu", interpret=True)
  h, hf = cp.diagonal_recurrence(log_a, b, initial_state=h0, reset=RESET, impl="xla",
                                 chunk_size=8)
  h2, hf2 = cp.diagonal_recurrence(log_a[None, None] * jnp.abs(v[..., :1, :1]), b,
                                   reset=RESET, impl="xla", chunk_size=8)
  parts = (jnp.sum(o * jnp.cos(o)), jnp.sum(sf * sf), jnp.sum(jnp.abs(h) ** 2),
           jnp.sum(jnp.abs(hf)), jnp.sum(jnp.abs(h2)), jnp.sum(jnp.abs(hf2) ** 2))
  return sum(parts), (o, sf, h, hf, h2, hf2)


def test_delta_rule_and_diagonal_recurrence_with_initial_states_match_the_kernels():
  """Outputs, final states and all gradients (the initial states' too) of the split delta
  rule and diagonal recurrence equal the single-device kernels (n = 2: the Pallas delta
  rule needs 16-token chunks)."""
  keys = jax.random.split(jax.random.key(5), 8)
  h, dk, dv, n2 = 2, 4, 6, 3
  q = jax.random.normal(keys[0], (B, T, h, dk))
  k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  k = jnp.roll(k, 3, axis=1)
  args = (q, k, jax.random.normal(keys[1], (B, T, h, dv)),
          jax.nn.sigmoid(jax.random.normal(keys[2], (B, T, h))),
          -jax.nn.softplus(jax.random.normal(keys[3], (B, T, h))),
          jax.random.normal(keys[4], (B, h, dk, dv)),
          -0.3 + 1j * jax.random.normal(keys[5], (h, n2)),
          jax.random.normal(keys[6], (B, T, h, n2)) * (1 + 0.5j),
          jax.random.normal(keys[7], (B, h, n2)) * (1 - 1j))
  fn = jax.value_and_grad(_delta_diag_loss, argnums=(0, 1, 2, 3, 4, 5, 7, 8), has_aux=True)
  ref = run(fn, args, None)
  got = run(fn, args, 2)
  assert worst(got, ref) < TOL


def _dplr_loss(q, k, v, a, b, g, s0):
  o, sf = cp.dplr(q, k, v, a, b, g, initial_state=s0, reset=RESET, chunk_size=16, impl="xla")
  return jnp.sum(o * jnp.cos(o)) + jnp.sum(sf * sf), (o, sf)


def test_dplr_with_initial_state_matches_the_kernel():
  """The diagonal-plus-low-rank recurrence (RWKV-7's) split over 4 shards: outputs, final
  state and all gradients (a, b, the per-channel decays and the initial state included)
  equal the single-device kernel."""
  keys = jax.random.split(jax.random.key(6), 7)
  h, dk, dv = 2, 4, 6
  kh = jax.random.normal(keys[0], (B, T, h, dk))
  kh = kh / jnp.linalg.norm(kh, axis=-1, keepdims=True)
  args = (jax.random.normal(keys[1], (B, T, h, dk)), jax.random.normal(keys[2], (B, T, h, dk)),
          jax.random.normal(keys[3], (B, T, h, dv)),
          -jax.nn.sigmoid(jax.random.normal(keys[4], (B, T, h, dk))) * kh, kh,
          -jnp.exp(jax.random.normal(keys[5], (B, T, h, dk))),
          jax.random.normal(keys[6], (B, h, dk, dv)))
  fn = jax.value_and_grad(_dplr_loss, argnums=tuple(range(7)), has_aux=True)
  ref = run(fn, args, None)
  got = run(fn, args, 4)
  assert worst(got, ref) < TOL


def _dense_attend(q, k, v, mask):
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(jnp.broadcast_to(mask, (q.shape[0],) + mask.shape[1:])[:, None], s, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


def test_windowed_attention_in_bands_matches_dense():
  """A long shard (L = 256 at n = 2) is attended in query bands of 128 against their
  128 + window - 1 keys: outputs and gradients equal dense masked attention, packed."""
  t, window = 512, 40
  keys = jax.random.split(jax.random.key(6), 3)
  q, k, v = (jax.random.normal(kk, (2, t, 2, 8)) for kk in keys)
  seg = jnp.asarray(np.cumsum(np.isin(np.arange(t), [0, 100, 256, 300]))[None].repeat(2, 0))

  def loss(q, k, v):
    if cp.sequence_mesh(t) is None:
      i = jnp.arange(t)
      d = i[:, None] - i[None, :]
      mask = ((d >= 0) & (d < window))[None] & (seg[:, :, None] == seg[:, None, :])
      o = _dense_attend(q, k, v, mask)
    else:
      o = cp.attention(q, k, v, seg, window=window, attend=_dense_attend)
    return jnp.sum(o * jnp.cos(o)), o
  fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
  assert worst(run(fn, (q, k, v), 2), run(fn, (q, k, v), None)) < TOL


def test_dropping_the_incoming_state_or_the_halo_breaks_equality(recurrence_ref, monkeypatch):
  """The hand-offs matter: without S_in (or with an empty halo) the results move."""
  args, ref = recurrence_ref
  prefix = cp.exclusive_affine_prefix
  monkeypatch.setattr(cp.recurrence, "exclusive_affine_prefix",
                      lambda a, b, axis, **kw: (0 * prefix(a, b, axis, **kw)[0],
                                                prefix(a, b, axis, **kw)[1]))
  got = run(_recurrence_grad, args, 2)
  assert rel_err(got[0][1][0], ref[0][1][0]) > 1e-2  # outputs: far beyond TOL
  monkeypatch.undo()
  conv = registry.create("gla", d_model=D, rngs=nnx.Rngs(0), num_heads=2, chunk_size=4,
                         use_short_conv=True, gate_low_rank_dim=4).conv.q
  x = jax.random.normal(jax.random.key(2), (B, T, conv.channels))
  conv_fn = lambda x: conv(x, SEGMENT_IDS)
  conv_ref = run(conv_fn, (x,), None)  # (split == unsplit: the gla mixer test)
  monkeypatch.setattr(cp.primitives, "halo", lambda xl, w, *a, fill=0, **kw: jnp.full(
      xl.shape[:1] + (w,) + xl.shape[2:], fill, xl.dtype))
  assert rel_err(run(conv_fn, (x,), 4), conv_ref) > 1e-2


# ----------------------------------------------------------------------------------
# Mixers: split == unsplit, outputs and every gradient
# ----------------------------------------------------------------------------------

MIXERS = {
    "attention": {"num_heads": 2, "num_kv_heads": 1},
    # window 6: a one-shard halo at n = 2 and 4, two hops at n = 8; block_size 4 puts the
    # unsplit call on the block-sparse kernel without segment ids.
    "swa": {"num_heads": 2, "window": 6, "block_size": 4},
    "mamba2": {"d_state": 8, "head_dim": 8, "chunk_size": 4, "ngroups": 2, "impl": "xla"},
    "linear_attention": {"num_heads": 2, "chunk_size": 4},
    "retnet": {"num_heads": 2, "chunk_size": 4},
    "gla": {"num_heads": 2, "chunk_size": 4, "use_short_conv": True, "gate_low_rank_dim": 4},
    "based": {"num_heads": 2, "chunk_size": 4, "feature_dim": 4, "window": 6,
              "window_heads": 2},
    "jrt": {"num_heads": 2, "chunk_size": 4, "feature_dim": 4, "prefix_len": 6},
    "deltanet": {"num_heads": 2, "chunk_size": 4, "impl": "xla"},
    "gated_deltanet": {"num_heads": 2, "chunk_size": 4, "impl": "xla"},
    "mamba": {"d_state": 4, "expand": 1, "impl": "xla", "chunk_size": 4},
    "s4d": {"d_state": 8},
    # The hand-off is the same for any memory network: a 1-layer memory compiles faster.
    "titans_lmm": {"num_heads": 2, "chunk_size": 2, "depth": 1},
    "titans_mag": {"num_heads": 2, "chunk_size": 2, "depth": 1, "window": 6, "attn_heads": 2},
    "titans_mal": {"num_heads": 2, "chunk_size": 2, "depth": 1, "window": 6, "attn_heads": 2},
    "titans_mac": {"num_heads": 2, "chunk_size": 2, "depth": 1, "segment_len": 4,
                   "attn_heads": 2},
    # The online recurrence split (the GLA inner's drop-in); the cached segment memories
    # and their aggregation stay on XLA's partitioner.
    "memory_caching": {"num_heads": 2, "chunk_size": 2, "segment_len": 4},
    "mom": {"num_heads": 2, "num_memories": 2, "top_k": 1, "chunk_size": 4, "impl": "xla"},
    # exact_len 8 < T: exact rows, then top-2 retrieval (packed: the dense form; unpacked:
    # shards of whole blocks, each block exact or retrieving).
    "landmark": {"num_heads": 2, "block_size": 4, "exact_len": 8, "top_k": 2},
    # The token shift's one-token halo and the DPLR recurrence's dense hand-off;
    # zero_init=False so that the output (and every gradient) is not identically zero.
    "rwkv7": {"num_heads": 2, "chunk_size": 4, "impl": "xla", "zero_init": False,
              "decay_low_rank_dim": 4, "a_low_rank_dim": 4, "v_low_rank_dim": 4,
              "gate_low_rank_dim": 4},
}
# Not split (yet): XLA's partitioner gathers what they need, so they stay exact but hold
# the whole sequence per device; checked under LCM_CP_ALL=1 (docs/context-parallel.md).
# None today: every registered mixer takes a split path.
UNSPLIT = {}
# Default suite: one size per mixer, so that each mechanism (all-gather, window and
# convolution halos over one or two hops, no / per-head / per-channel / dense / sequential
# hand-offs, documents spanning whole shards at 8) meets 2, 4 and 8 across the mixers.
# LCM_CP_ALL=1 checks every mixer at 2, 4 and 8 and the UNSPLIT ones too.
ALL = os.environ.get("LCM_CP_ALL") == "1"
SIZE = {"attention": 8, "swa": 8, "mamba2": 4, "linear_attention": 2, "retnet": 8, "gla": 4,
        "based": 8, "jrt": 2, "deltanet": 8, "gated_deltanet": 4, "mamba": 8, "s4d": 2,
        "titans_lmm": 8, "titans_mag": 4, "titans_mal": 2, "mom": 4,
        "landmark": 8, "titans_mac": 2, "memory_caching": 4, "rwkv7": 8}
# Compile-heavy: the default suite checks only the unpacked split (LCM_CP_ALL=1 the rest).
SLOW = {"titans_mac"}
if ALL:
  MIXERS.update(UNSPLIT)


def test_every_registered_mixer_is_checked_split():
  assert set(MIXERS) | set(UNSPLIT) == set(registry.names())


def _fwd_bwd(graphdef, ct):
  def fn(params, x, segment_ids):
    def loss(p, x):
      y = nnx.merge(graphdef, p)(x, segment_ids=segment_ids)
      return jnp.sum(y * ct), y
    (_, y), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, gx, gp
  return fn


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_split_over_sequence_equals_unsplit(name, monkeypatch):
  mixer = registry.create(name, d_model=D, rngs=nnx.Rngs(0), **MIXERS[name])
  graphdef, params = nnx.split(mixer)
  x = jax.random.normal(jax.random.key(3), (B, T, D))
  ct = jax.random.normal(jax.random.key(4), (B, T, D))
  fn = _fwd_bwd(graphdef, ct)
  # Packed documents everywhere; swa, s4d, titans_lmm, landmark and titans_mac also
  # unpacked (the unsplit call's block-sparse kernel / FFT convolution / aligned memory
  # pass / block reshapes / segment scan against the split forms).
  sizes = (2, 4, 8) if ALL else (SIZE[name],)
  cases = [(True, n) for n in sizes] + (
      [(False, 4)] if name in ("swa", "s4d", "titans_lmm", "landmark", "titans_mac") else [])
  if name in SLOW and not ALL:  # its packed split (the token scan handed on) is only in ALL
    cases = [(False, 4)]
  # The split path is really taken (not XLA's partitioner gathering the whole sequence).
  split_calls = []
  for module in (cp.primitives, cp.recurrence, sys.modules["layers.context_parallel.attention"]):
    original = module.shard_map
    monkeypatch.setattr(module, "shard_map",
                        lambda *a, _f=original, **kw: split_calls.append(1) or _f(*a, **kw))
  meshes = {n: mesh(n) for _, n in cases}

  def all_cases(params, x, segment_ids):
    """The unsplit mixer and every split one, in one program (one compile)."""
    out = {}
    for packed in {p for p, _ in cases}:
      out[packed, 0] = fn(params, x, segment_ids if packed else None)
    for packed, n in cases:
      with cp.sequence_context(meshes[n]):
        out[packed, n] = fn(params, x, segment_ids if packed else None)
    return out
  replicated = NamedSharding(meshes[cases[0][1]], P())
  args = jax.device_put((params, x, SEGMENT_IDS), replicated)
  # Replicated outputs: XLA may pick output shardings that JAX cannot express.
  out = jax.jit(all_cases, out_shardings=replicated).lower(*args).compile(
      compiler_options=FAST)(*args)
  assert len(split_calls) >= (0 if name in UNSPLIT else len(cases)), split_calls
  for packed, n in cases:
    got, ref = out[packed, n], out[packed, 0]
    errs = {"y": rel_err(got[0], ref[0]), "dx": rel_err(got[1], ref[1]),
            "dparams": worst(got[2], ref[2])}
    assert len(jax.tree.leaves(got[2])) == len(jax.tree.leaves(params))
    print(f"{name} sequence={n} packed={packed}: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < TOL, (name, n, packed, errs)
