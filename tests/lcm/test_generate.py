"""At the LM level: packed documents give the logits of the document alone, and greedy
decoding through ``generate`` (``step`` on a prefill chunk, then a ``lax.scan`` of one-token
steps) equals re-running the parallel forward on the growing sequence. Sampling filters.

generate() and the LM's step are the same code for every mixer; what differs is the
mixer's state. Every registered mixer's step is checked against its parallel form (token by
token, uneven chunks, with ``init_state(max_len=...)`` as here), its packed documents, and
its state keeping the initial structure, shapes and dtypes (the scan carry), in
tests/layers/test_mixer_contract.py. Here: one mixer per kind of decode state (GENERATE)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lcm import config as config_lib
from lcm import generate, registry
from lcm import model as model_lib
from tests.kernels.helpers import jit_fast
from tests.layers.test_mixer_contract import OVERRIDES

V, D = 48, 16
PROMPT, NEW = 5, 7
# A KV cache sized by max_len, a sliding-window cache, the landmark layout hook (the only
# mixer that changes the LM's sequence layout) with its block cache, a fixed-size SSM state,
# a delta-rule matrix state with a short-convolution tail, neural memory weights and
# momentum with a segment buffer, cached segment states, and a token-shift state beside a
# diagonal-plus-low-rank matrix state (rwkv7; its two-layer value residual and channel mix:
# tests/layers/test_rwkv7.py).
GENERATE = ("attention", "swa", "landmark", "mamba2", "gated_deltanet", "titans_mac",
            "memory_caching", "rwkv7")


def tiny_lm(name):
  c = config_lib.base_config().model
  # One layer: each mixer's prefill and decode through generate() is what is tested here;
  # states carried across several layers are tested in test_model.py (and compile time
  # grows with the layers).
  c.vocab_size, c.d_model, c.num_layers, c.pattern, c.mlp_ratio = V, D, 1, name, 2.0
  c.remat = False  # compile time; remat is tested in test_model.py
  c.mixers = ml_collections.ConfigDict({name: dict(OVERRIDES.get(name, {}))})
  m = model_lib.LM(c, rngs=nnx.Rngs(0))
  # Sharper logits than a fresh init gives, so greedy choices are not near-ties.
  m.embed[...] = m.embed[...] * 4.0
  return m


def test_generate_mixers_are_registered():
  assert set(GENERATE) <= set(registry.names())


@pytest.mark.parametrize("name", GENERATE)
def test_packing_and_greedy_decode(name):
  m = tiny_lm(name)
  fwd = jit_fast(lambda m, t, s: m(t, s))  # XLA level 0: compile-bound
  tok = jax.random.randint(jax.random.key(1), (2, 12), 0, V)

  # packing: document B after document A in a row == document B at the start of a row
  # (what it sees alone, by causality); same shapes, so one compiled forward.
  a, b = 5, 7
  seg = jnp.array([[0] * a + [1] * b] * 2, jnp.int32)
  packed = fwd(m, tok, seg)
  other = jax.random.randint(jax.random.key(2), (2, a), 0, V)
  first = fwd(m, jnp.concatenate([tok[:, a:], other], 1), jnp.array([[0] * b + [1] * a] * 2))
  alone = first[:, :b]
  scale = max(1.0, float(jnp.max(jnp.abs(alone))))
  np.testing.assert_allclose(packed[:, a:], alone, atol=1e-5 * scale, rtol=0)

  # greedy decode through step == argmax of the parallel forward on the growing sequence
  prompt = tok[:, :PROMPT]
  out = generate.generate(m, prompt, NEW, temperature=0.0, prefill_chunk=PROMPT)
  seq = jnp.concatenate([prompt, out], axis=1)
  logits = fwd(m, seq, jnp.zeros(seq.shape, jnp.int32))  # (2, 12): same compiled forward
  for i in range(NEW):
    pos = PROMPT - 1 + i
    lg = np.asarray(logits[:, pos])
    chosen = np.asarray(out[:, i])
    best = lg.max(-1)
    # the step token is the parallel argmax (up to float ties within 1e-4)
    assert np.all(lg[np.arange(2), chosen] >= best - 1e-4 * max(1.0, np.abs(best).max())), \
        (name, i, chosen, lg.argmax(-1))
  assert len(set(np.asarray(seq).ravel().tolist())) > 3  # not a degenerate constant output


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  key = jax.random.key(0)
  assert int(generate.sample_logits(logits, key, temperature=0.0)[0]) == 0
  assert int(generate.sample_logits(logits, key, temperature=1.0, top_k=1)[0]) == 0
  keys = jax.random.split(key, 400)
  draw = jax.vmap(lambda k: generate.sample_logits(logits, k, top_p=0.7)[0])(keys)
  assert set(np.asarray(draw).tolist()) == {0, 1}  # nucleus of mass 0.7 = top two tokens
  draw = jax.vmap(lambda k: generate.sample_logits(logits, k, top_k=3)[0])(keys)
  assert set(np.asarray(draw).tolist()) == {0, 1, 2}
  freq0 = float(np.mean(np.asarray(draw) == 0))
  assert 0.45 < freq0 < 0.65  # 0.5 / 0.95 renormalised
