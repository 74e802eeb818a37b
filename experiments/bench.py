"""Benchmarks: ratios measured inside one process (the machine is shared and noisy).

    python -m experiments.bench --what=decode --mixers=attention,mamba2,gated_deltanet \
        --contexts=1024,32768 --out=results/bench_decode

``decode``: per-token latency of ``LM.step`` (one token, batch 1) with a state sized for
each context length, and the state's memory. Attention's KV cache grows with the context,
so its per-token cost does; a recurrent mixer's state does not. Each timing is the median
of ``--repeats`` runs of a jitted ``lax.scan`` over ``--tokens`` decode steps, with all
mixers and contexts interleaved so machine noise hits them alike. Writes JSON (+ PNG).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from lcm import config as config_lib
from lcm import model as model_lib

_WHAT = flags.DEFINE_enum("what", "decode", ["decode"], "Which benchmark.")
_MIXERS = flags.DEFINE_list("mixers", ["attention", "mamba2", "gated_deltanet"], "Mixers.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "32768"], "Context lengths.")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Layers.")
_TOKENS = flags.DEFINE_integer("tokens", 32, "Decode steps per timing.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timings per point (median).")
_OUT = flags.DEFINE_string("out", "", "Write <out>.json and <out>.png when given.")


def _lm(name: str, d_model: int, num_layers: int) -> model_lib.LM:
  c = config_lib.base_config().model
  c.vocab_size, c.d_model, c.num_layers, c.pattern = 256, d_model, num_layers, name
  c.mixers = ml_collections.ConfigDict({})
  return model_lib.LM(c, rngs=nnx.Rngs(0))


def _state_bytes(state) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def decode_benchmark(mixers, contexts, *, d_model, num_layers, tokens, repeats):
  """{mixer: {context: {"ms_per_token", "state_bytes"}}} plus growth ratios."""
  cases = {}
  for name in mixers:
    model = _lm(name, d_model, num_layers)
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)

    @jax.jit
    def run(params, state, tok, graphdef=graphdef):
      def body(carry, _):
        t, s = carry
        logits, s = nnx.merge(graphdef, params).step(t, s)
        return (jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), s), None
      (t, s), _ = jax.lax.scan(body, (tok, state), None, length=tokens)
      return t, s

    for ctx in contexts:
      state = model.init_state(1, max_len=ctx + tokens)
      tok = jnp.zeros((1, 1), jnp.int32)
      jax.block_until_ready(run(params, state, tok))  # compile + warm up
      cases[(name, ctx)] = (run, params, state, tok, _state_bytes(state))
  times = {k: [] for k in cases}
  for _ in range(repeats):  # interleaved: noise hits every case alike
    for k, (run, params, state, tok, _) in cases.items():
      t0 = time.perf_counter()
      jax.block_until_ready(run(params, state, tok))
      times[k].append((time.perf_counter() - t0) / tokens * 1e3)
  out = {}
  for (name, ctx), ts in times.items():
    out.setdefault(name, {})[str(ctx)] = {
        "ms_per_token": float(np.median(ts)), "state_bytes": cases[(name, ctx)][4]}
  lo, hi = str(min(contexts)), str(max(contexts))
  for name in mixers:
    out[name]["latency_growth"] = out[name][hi]["ms_per_token"] / out[name][lo]["ms_per_token"]
    out[name]["memory_growth"] = out[name][hi]["state_bytes"] / out[name][lo]["state_bytes"]
  return out


def _plot(result, contexts, path):
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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  contexts = [int(c) for c in _CONTEXTS.value]
  result = decode_benchmark(_MIXERS.value, contexts, d_model=_D_MODEL.value,
                            num_layers=_LAYERS.value, tokens=_TOKENS.value,
                            repeats=_REPEATS.value)
  report = {"what": "decode", "d_model": _D_MODEL.value, "num_layers": _LAYERS.value,
            "batch": 1, "backend": jax.default_backend(), "result": result}
  print(json.dumps(report, indent=2))
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value + ".json", "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    _plot(result, contexts, _OUT.value + ".png")


if __name__ == "__main__":
  app.run(main)
