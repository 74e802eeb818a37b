"""RWKV-7 (layers/linear_attention/rwkv7.py): the layer and a two-layer LM against a per-token
numpy implementation of the published equations (token shift, LoRA decay / in-context
learning rate / gate, key normalisation, the bonus, the per-head group norm, the value
residual across layers), bf16 against fp32, the LM's ``model.mlp = "rwkv"`` channel mix
(parallel == step, packed documents, its decode state, the sequence split) and the config
errors. The mixer contract and split == unsplit of the layer itself are checked with every
registered mixer (test_mixer_contract.py, test_context_parallel.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from configs import mqar
from layers import context_parallel as cp
from layers.common import ConfigError
from layers.linear_attention import RWKV7, RWKV7ChannelMix, RWKV7Config
from lcm import config as config_lib
from lcm import model as model_lib
from lcm import registry
from tests.kernels.helpers import FAST_COMPILE, jit_fast

B, T, D, H = 2, 8, 16, 2
RANKS = {"decay_low_rank_dim": 4, "a_low_rank_dim": 4, "v_low_rank_dim": 4,
         "gate_low_rank_dim": 4}
FIELDS = {"num_heads": H, "chunk_size": 4, "zero_init": False, **RANKS}
SEG = np.array([[0] * 3 + [1] * 5, [0] * 6 + [1] * 2])  # packed rows


def _perturb(module, seed: int, scale: float = 0.2):
  """Every parameter moved by N(0, scale^2): no zero-initialised or symmetric piece hides."""
  graphdef, params = nnx.split(module)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(tree))


# ----------------------------------------------------------------------------------
# The published equations, one token at a time (the paper's state orientation: rows are
# values, S <- S (diag(w) - kappa^T (iclr * kappa)) + v^T k~, o = S r)
# ----------------------------------------------------------------------------------


def _sig(z):
  return 1.0 / (1.0 + np.exp(-z))


def ref_rwkv7(p, x, seg, heads, norm_eps=1e-5, v_first=None):
  """(y, the layer's v) for x [B, T, D]; ``v_first`` [B, T, H, N]: the value residual."""
  bsz, length, d = x.shape
  n = p["receptance"]["kernel"].shape[-1]
  y = np.zeros((bsz, length, d))
  v_seen = np.zeros((bsz, length, heads, n))
  proj = lambda u, w: np.tensordot(u, w, axes=1)
  for b in range(bsz):
    s = np.zeros((heads, n, n))
    for t in range(length):
      start = t == 0 or seg[b, t] != seg[b, t - 1]
      if start:
        s[:] = 0.0
      prev = np.zeros(d) if start else x[b, t - 1]
      m = {c: x[b, t] + (prev - x[b, t]) * p[f"x_{c}"] for c in "rwkvag"}
      r = proj(m["r"], p["receptance"]["kernel"])
      k = proj(m["k"], p["key"]["kernel"])
      v = proj(m["v"], p["value"]["kernel"])
      w_raw = p["w0"] + proj(np.tanh(m["w"] @ p["w1"]), p["w2"])
      # the published CUDA kernel's soft clamp: w = exp(-exp(-softplus(-w_raw) - 0.5))
      w = np.exp(-np.exp(-np.logaddexp(0.0, -w_raw) - 0.5))
      if v_first is not None:
        v = v + (v_first[b, t] - v) * _sig(p["v0"] + proj(m["v"] @ p["v1"], p["v2"]))
      v_seen[b, t] = v
      a = _sig(p["a0"] + proj(m["a"] @ p["a1"], p["a2"]))
      g = proj(_sig(m["g"] @ p["g1"]), p["g2"])
      kk = k * p["k_k"]
      kk = kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
      k = k * (1 + (a - 1) * p["k_a"])
      o = np.zeros((heads, n))
      for h in range(heads):
        s[h] = (s[h] * w[h][None, :] + np.outer(s[h] @ -kk[h], kk[h] * a[h])
                + np.outer(v[h], k[h]))
        o[h] = s[h] @ r[h]
      mean = o.mean(-1, keepdims=True)
      var = ((o - mean) ** 2).mean(-1, keepdims=True)
      o = (o - mean) / np.sqrt(var + n * norm_eps) * p["ln_scale"] + p["ln_bias"]
      o = o + (r * k * p["r_k"]).sum(-1, keepdims=True) * v
      y[b, t] = np.einsum("hn,hnd->d", o * g, p["out"])
  return y, v_seen


def _close(got, want, tol=2e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=0)


def test_layer_matches_the_published_equations_packed_and_with_a_value_residual():
  layer = _perturb(RWKV7(D, RWKV7Config(**FIELDS), rngs=nnx.Rngs(0)), seed=1)
  x = jax.random.normal(jax.random.key(2), (B, T, D))
  v_first = jax.random.normal(jax.random.key(3), (B, T, D))
  first = {"v": jnp.zeros((B, T, D)), "set": jnp.zeros((), bool)}
  later = {"v": v_first, "set": jnp.ones((), bool)}
  fn = jit_fast(lambda m, x, c, s: m.call_with_carry(x, c, s))
  p, xn, seg = _np(nnx.state(layer)), np.asarray(x, np.float64), SEG
  y1, c1 = fn(layer, x, first, jnp.asarray(SEG))
  want1, v1 = ref_rwkv7(p, xn, seg, H)
  _close(y1, want1)
  _close(c1["v"], v1.reshape(B, T, D))  # the first layer hands its own v on
  assert bool(c1["set"])
  y2, c2 = fn(layer, x, later, jnp.asarray(SEG))
  want2, _ = ref_rwkv7(p, xn, seg, H, v_first=np.asarray(v_first).reshape(B, T, H, -1))
  _close(y2, want2)
  _close(c2["v"], v_first)  # later layers pass the first layer's v through
  assert np.abs(want2 - want1).max() > 1e-2  # the residual matters at these parameters


def _lm_cfg(**kw):
  c = config_lib.base_config().model
  c.vocab_size, c.d_model, c.num_layers, c.pattern = 32, D, 2, "rwkv7"
  c.mixers = ml_collections.ConfigDict({"rwkv7": dict(FIELDS)})
  c.remat = False
  for k, v in kw.items():
    c[k] = v
  return c


def _rms(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("scan_layers", [True, False])
def test_two_layer_lm_value_residual_matches_the_published_equations(scan_layers):
  lm = _perturb(model_lib.LM(_lm_cfg(mlp_ratio=0.0, scan_layers=scan_layers),
                             rngs=nnx.Rngs(0)), seed=4)
  tok = jax.random.randint(jax.random.key(5), (B, T), 0, 32)
  got = jit_fast(lambda m, t, s: m(t, s))(lm, tok, jnp.asarray(SEG))
  p = _np(nnx.state(lm))
  layers = ([jax.tree.map(lambda a, i=i: a[i], p["groups"]["blocks"][0]) for i in range(2)]
            if scan_layers else [p["groups"][i]["blocks"][0] for i in range(2)])
  x = p["embed"][np.asarray(tok)]
  v_first, no_residual = None, None
  for i, blk in enumerate(layers):
    u = _rms(x, blk["norm1"]["scale"])
    y, v = ref_rwkv7(blk["mixer"], u, SEG, H, v_first=v_first)
    if i == 1:
      no_residual = x + ref_rwkv7(blk["mixer"], u, SEG, H)[0]
    x, v_first = x + y, (v if v_first is None else v_first)
  head = lambda h: _rms(h, p["norm"]["scale"]) @ p["head"]["kernel"]
  _close(got, head(x))
  assert np.abs(head(no_residual) - head(x)).max() > 1e-2  # non-vacuous


# ----------------------------------------------------------------------------------
# bf16
# ----------------------------------------------------------------------------------


def test_bf16_is_finite_and_close_to_fp32():
  cfg = RWKV7Config(num_heads=2, chunk_size=16, zero_init=False, **RANKS)
  x = jax.random.normal(jax.random.key(6), (B, 48, 32))
  seg = jnp.asarray(np.repeat([[0] * 20 + [1] * 28], B, 0))
  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    layer = RWKV7(32, cfg, dtype=dtype, rngs=nnx.Rngs(0))  # same fp32 parameters
    out[dtype] = np.asarray(jit_fast(lambda m, x, s: m(x, s))(layer, x, seg), np.float32)
  assert np.all(np.isfinite(out[jnp.bfloat16]))
  ref = out[jnp.float32]
  rel = np.sqrt(np.mean((out[jnp.bfloat16] - ref) ** 2) / np.mean(ref ** 2))
  assert rel < 3e-2, rel


# ----------------------------------------------------------------------------------
# The LM's RWKV channel mix (model.mlp = "rwkv")
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rwkv_mlp_lm():
  return _perturb(model_lib.LM(_lm_cfg(mlp="rwkv", mlp_ratio=2.0), rngs=nnx.Rngs(0)), seed=7)


def test_rwkv_mlp_lm_parallel_equals_step_with_its_state(rwkv_mlp_lm):
  m = rwkv_mlp_lm
  tok = jax.random.randint(jax.random.key(8), (B, T), 0, 32)
  ref = jit_fast(lambda m, t: m(t))(m, tok)
  step = jit_fast(lambda m, t, s: m.step(t, s))
  init = m.init_state(B)
  # The block state: the mixer's, and the channel mix's previous token (stacked per layer).
  (block,) = init
  assert set(block) == {"mixer", "mlp"} and block["mlp"].shape == (2, B, D)
  assert m.state_size(B) == sum(a.size for a in jax.tree.leaves(init))
  for chunks in ([1] * T, [3, 1, 4]):
    s, ys, start = init, [], 0
    for c in chunks:
      y, s = step(m, tok[:, start:start + c], s)
      ys.append(y)
      start += c
    _close(jnp.concatenate(ys, 1), ref, 1e-5)
    assert jax.tree.structure(s) == jax.tree.structure(init)


def test_rwkv_mlp_lm_packed_documents_do_not_leak(rwkv_mlp_lm):
  fwd = jit_fast(lambda m, t, s: m(t, s))
  tok = jax.random.randint(jax.random.key(9), (B, T), 0, 32)
  a = 3
  seg = jnp.asarray([[0] * a + [1] * (T - a)] * B)
  packed = fwd(rwkv_mlp_lm, tok, seg)
  other = jax.random.randint(jax.random.key(10), (B, a), 0, 32)
  alone = fwd(rwkv_mlp_lm, jnp.concatenate([tok[:, a:], other], 1),
              jnp.asarray([[0] * (T - a) + [1] * a] * B))[:, :T - a]
  _close(packed[:, a:], alone, 1e-5)
  unpacked = fwd(rwkv_mlp_lm, tok, jnp.zeros((B, T), jnp.int32))
  assert np.abs(np.asarray(unpacked[:, a:] - packed[:, a:])).max() > 1e-3


def test_swiglu_keeps_the_block_state_of_the_mixer():
  lm = model_lib.LM(_lm_cfg(scan_layers=False), rngs=nnx.Rngs(0))
  mixer = registry.create("rwkv7", d_model=D, rngs=nnx.Rngs(0), **FIELDS)
  want = [[mixer.init_state(B)]] * 2  # groups x blocks: the mixer's state, nothing added
  assert jax.tree.structure(lm.init_state(B)) == jax.tree.structure(want)
  assert lm.state_size(B) == 2 * mixer.state_size(B)


def test_channel_mix_split_over_sequence_equals_unsplit(monkeypatch):
  """Outputs and gradients, packed documents with starts inside shards and on a boundary."""
  split_calls = []
  original = cp.primitives.shard_map
  monkeypatch.setattr(cp.primitives, "shard_map",
                      lambda *a, **kw: split_calls.append(1) or original(*a, **kw))
  mix = RWKV7ChannelMix(D, 32, zero_init=False, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mix)
  x = jax.random.normal(jax.random.key(11), (B, 16, D))
  seg = jnp.asarray(np.cumsum(np.isin(np.arange(16), [0, 4, 9]))[None].repeat(B, 0))
  ct = jax.random.normal(jax.random.key(12), (B, 16, D))
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", cp.AXIS),
              axis_types=(AxisType.Auto,) * 2)

  def fwd_bwd(params, x):
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, seg) * ct)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  def both(params, x):
    with cp.sequence_context(mesh):
      split = fwd_bwd(params, x)
    return fwd_bwd(params, x), split
  replicated = NamedSharding(mesh, P())
  args = jax.device_put((params, x), replicated)
  ref, got = jax.jit(both, out_shardings=replicated).lower(*args).compile(
      compiler_options=FAST_COMPILE)(*args)
  assert split_calls  # the token shift's halo path was taken
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    _close(a, b, 1e-5)


# ----------------------------------------------------------------------------------
# Config errors
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("init_depth", 1.5), ("num_heads", 3),
                                         ("gate_low_rank_dim", 0), ("zero_init", 1),
                                         ("impl", "cuda")])
def test_bad_layer_config_names_the_field(field, value):
  with pytest.raises(ConfigError) as e:
    registry.validate("rwkv7", D, {field: value}, prefix="model.mixers.rwkv7.")
  assert e.value.field == f"model.mixers.rwkv7.{field}"


def test_bad_mlp_names_the_field_and_the_choices():
  c = mqar.get_config("rwkv7")
  c.model.mlp = "gelu"
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c)
  assert e.value.field == "model.mlp" and "swiglu, rwkv" in str(e.value)


def test_rwkv7_layers_must_agree_on_the_value_width():
  registry.register("rwkv7_wide", "layers.linear_attention", "RWKV7", {"head_dim": 16})
  try:
    c = _lm_cfg(pattern="rwkv7,rwkv7_wide")
    with pytest.raises(ConfigError) as e:
      nnx.eval_shape(lambda: model_lib.LM(c, rngs=nnx.Rngs(0)))
    assert e.value.field == "model.mixers"
  finally:
    registry.unregister("rwkv7_wide")
