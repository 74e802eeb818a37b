"""Sample from a trained checkpoint: chunked prefill, then per-token recurrent decode.

    python -m experiments.generate --workdir=runs/lm_gdn --prompt="def main(" \
        --max_new_tokens=200 --temperature=0.8 --top_p=0.95
"""

import sys

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from lcm import generate
from lcm.data import pipeline, text

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints).")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Prompt text.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMP = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "Prompt tokens per prefill step.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  model, config = generate.load_model(_WORKDIR.value)
  if config.data.task != "text":
    sys.exit(f"{_WORKDIR.value} was trained on task {config.data.task!r}, not text")
  tok = text.make_tokenizer(pipeline.text_config(config.data))
  prompt = jnp.asarray(tok.encode(_PROMPT.value))[None]
  out = generate.generate(model, prompt, _MAX_NEW.value, key=jax.random.key(_SEED.value),
                          temperature=_TEMP.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                          prefill_chunk=_CHUNK.value)
  print(_PROMPT.value + tok.decode(out[0].tolist()))


if __name__ == "__main__":
  app.run(main)
