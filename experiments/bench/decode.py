"""``python -m experiments.bench --what=decode`` (the default mode, also ``... decode``):
per-token decode latency and state memory vs context length.

    python -m experiments.bench --what=decode --mixers=attention,mamba2,gated_deltanet \
        --contexts=1024,32768 --out=results/bench_decode

Per-token latency of ``LM.step`` (one token, batch 1) with a state sized for each context
length, and the state's memory. Attention's KV cache grows with the context, so its
per-token cost does; a recurrent mixer's state does not. Each timing is the median of
``--repeats`` runs of a jitted ``lax.scan`` over ``--tokens`` decode steps, with all mixers
and contexts interleaved so machine noise hits them alike. ``--decode_level=mixer`` times one
mixer's ``step`` alone instead of a ``--num_layers`` LM. Writes JSON (+ PNG).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from experiments.bench import common
from lcm import config as config_lib
from lcm import model as model_lib
from lcm import registry

_MIXERS = flags.DEFINE_list("mixers", ["attention", "mamba2", "gated_deltanet"], "Mixers.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "32768"], "Context lengths.")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Layers.")
_TOKENS = flags.DEFINE_integer("tokens", 32, "Decode steps per timing.")
_DECODE_LEVEL = flags.DEFINE_enum("decode_level", "lm", ["lm", "mixer"],
                                  "decode: time an LM's greedy decoding or one mixer's step.")

# What the figures depend on (lcm.provenance): the mixers, their kernels and the LM.
CODE = ("kernels", "layers", "lcm", "experiments/bench")


def _lm(name: str, d_model: int, num_layers: int, scan_layers: bool = True) -> model_lib.LM:
  c = config_lib.base_config().model
  c.vocab_size, c.d_model, c.num_layers, c.pattern = 256, d_model, num_layers, name
  c.scan_layers = scan_layers
  c.mixers = ml_collections.ConfigDict({})
  return model_lib.LM(c, rngs=nnx.Rngs(0))


def _state_bytes(state) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def at_context(state, ctx: int):
  """The state as if ``ctx`` tokens had been seen: every mixer's ``pos`` counter (and the
  LM's real-token count) set to ``ctx``; the cache contents stay zeros (same cost). Mixers
  whose per-token cost depends on the position, not on the cache capacity (landmark: exact
  grouped softmax below ``exact_len``, retrieval above), are timed at the context asked."""
  def visit(x):
    if isinstance(x, dict):
      return {k: (jnp.full_like(v, ctx) if k in ("pos", "tokens") else visit(v))
              for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return type(x)(visit(v) for v in x)
    return x
  return visit(state)


def decode_benchmark(mixers, contexts, *, d_model, num_layers, tokens, repeats,
                     level: str = "lm"):
  """{mixer: {context: {"ms_per_token", "state_bytes"}}} plus growth ratios.

  ``level="lm"``: greedy decoding of a ``num_layers`` LM; ``"mixer"``: one mixer's ``step``
  alone, its output fed back (normalised) as the next input."""
  cases, state_bytes = {}, {}
  for name in mixers:
    if level == "mixer":
      model = registry.create(name, d_model=d_model, rngs=nnx.Rngs(0))
    else:
      # Layers unrolled: a scanned layer stack re-materialises every layer's KV cache as a
      # scan output at each token, an O(context) copy that would hide what the mixer costs.
      model = _lm(name, d_model, num_layers, scan_layers=False)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)

    @jax.jit
    def run(params, state, tok, graphdef=graphdef):
      def body(carry, _):
        t, s = carry
        out, s = nnx.merge(graphdef, params).step(t, s)
        if level == "mixer":
          return (out / (jnp.linalg.norm(out) + 1e-6), s), None
        return (jnp.argmax(out[:, -1:], -1).astype(jnp.int32), s), None
      (t, s), _ = jax.lax.scan(body, (tok, state), None, length=tokens)
      return t, s

    for ctx in contexts:
      state = at_context(model.init_state(1, max_len=ctx + tokens), ctx)
      tok = (jax.random.normal(jax.random.key(0), (1, 1, d_model)) if level == "mixer"
             else jnp.zeros((1, 1), jnp.int32))
      call = (lambda run=run, params=params, state=state, tok=tok:
              jax.block_until_ready(run(params, state, tok)))
      call()  # compile + warm up
      cases[(name, ctx)] = call
      state_bytes[(name, ctx)] = _state_bytes(state)
  times = common.time_interleaved(cases, repeats, untimed_first=False)
  out = {}
  for (name, ctx), ts in times.items():
    out.setdefault(name, {})[str(ctx)] = {
        "ms_per_token": float(np.median(ts)) / tokens, "state_bytes": state_bytes[(name, ctx)]}
  lo, hi = str(min(contexts)), str(max(contexts))
  for name in mixers:
    out[name]["latency_growth"] = out[name][hi]["ms_per_token"] / out[name][lo]["ms_per_token"]
    out[name]["memory_growth"] = out[name][hi]["state_bytes"] / out[name][lo]["state_bytes"]
  return out


def plot(result, contexts, path):
  """ms / token and state MiB vs context, one line per mixer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
  for name, r in result.items():
    a1.plot(contexts, [r[str(c)]["ms_per_token"] for c in contexts], "o-", label=name)
    a2.plot(contexts, [r[str(c)]["state_bytes"] / 2**20 for c in contexts], "o-", label=name)
  for a, y in ((a1, "ms / token (batch 1)"), (a2, "decode state (MiB)")):
    a.set_xscale("log", base=2)
    a.set_xlabel("context length")
    a.set_ylabel(y)
    a.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  contexts = [int(c) for c in _CONTEXTS.value]
  result = decode_benchmark(_MIXERS.value, contexts, d_model=_D_MODEL.value,
                            num_layers=_LAYERS.value, tokens=_TOKENS.value,
                            repeats=common.REPEATS.value, level=_DECODE_LEVEL.value)
  report = {"what": "decode", "level": _DECODE_LEVEL.value, "d_model": _D_MODEL.value,
            "num_layers": _LAYERS.value, "batch": 1, "backend": jax.default_backend(),
            "load_average": os.getloadavg()[0], "result": result}
  common.write_report(report, code=CODE, plot=lambda path: plot(result, contexts, path))
