"""Sample from a trained checkpoint: chunked prefill, then per-token recurrent decode.

    python -m experiments.generate --workdir=runs/lm_gdn --prompt="def main(" \
        --max_new_tokens=200 --temperature=0.8 --top_p=0.95

Every argument is checked before the model is loaded; bad input ends in one line on stderr
naming the flag and the allowed values (--debug re-raises with the traceback). Exit status:
0 generated (or --help); 1 the checkpoint could not be read or an unexpected error; 2 bad
input (a flag, the prompt, a workdir with no trained text model or no checkpoint).
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import flags, logging

from experiments import cli
from experiments.cli import CommandLineError
from lcm import generate

USAGE = ("python -m experiments.generate --workdir=DIR [--prompt=TEXT] [--max_new_tokens=N] "
         "[--temperature=T] [--top_k=K] [--top_p=P] [--prefill_chunk=C] [--seed=S]")
HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull", "-helpfull")


def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
  """The command's flags, in ``fv`` (each call of :func:`cli_main` uses a fresh one)."""
  holders = {
      "workdir": flags.DEFINE_string(
          "workdir", None, "A training workdir of a text model (config.json + checkpoints).",
          flag_values=fv),
      "prompt": flags.DEFINE_string("prompt", "def ", "Prompt text (UTF-8, not empty).",
                                    flag_values=fv),
      "max_new_tokens": flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate (>= 1).",
                                             flag_values=fv),
      "temperature": flags.DEFINE_float("temperature", 0.8, "Sampling temperature >= 0; "
                                        "0 = greedy.", flag_values=fv),
      "top_k": flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all; at "
                                    "most the vocabulary size).", flag_values=fv),
      "top_p": flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).",
                                  flag_values=fv),
      "seed": flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv),
      "prefill_chunk": flags.DEFINE_integer("prefill_chunk", 256, "Prompt tokens per prefill "
                                            "step (>= 1).", flag_values=fv),
      "debug": flags.DEFINE_bool("debug", False, "Re-raise errors with their Python traceback "
                                 "instead of the one-line message.", flag_values=fv),
  }
  flags.mark_flags_as_required(["workdir"], flag_values=fv)
  return holders


def check_prompt(prompt: str) -> bytes:
  """The prompt's UTF-8 bytes; GenerateError("prompt", ...) when it is empty or not UTF-8
  (bytes that are not UTF-8 reach Python's argv as lone surrogates)."""
  if not prompt:
    raise generate.GenerateError("prompt", "is empty; give at least one character of text to "
                                 "continue, e.g. --prompt='def '")
  try:
    return prompt.encode("utf-8")
  except UnicodeEncodeError as e:
    try:  # undecodable argv bytes (PEP 383): name the byte
      raw = prompt.encode("utf-8", "surrogateescape")
      prefix = len(prompt[:e.start].encode("utf-8", "surrogateescape"))
      what = f"byte 0x{raw[prefix]:02x} at byte offset {prefix}"
    except UnicodeEncodeError:  # a lone surrogate that no byte decodes to
      what = f"character U+{ord(prompt[e.start]):04X} at position {e.start}"
    raise generate.GenerateError("prompt", f"is not valid UTF-8 ({what}); pass UTF-8 "
                                 "text") from None


def run(workdir: str, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
        top_p: float, seed: int, prefill_chunk: int) -> str:
  """The prompt and its continuation. Every argument is checked (GenerateError) before the
  model is loaded; the workdir must hold a text model with a checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from lcm.data import pipeline, text  # pylint: disable=g-import-not-at-top
  generate.check_lengths(max_new_tokens, prefill_chunk)
  generate.check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
  check_prompt(prompt)
  config = generate.load_config(workdir)
  task = config.get("data", {}).get("task")
  if task != "text":
    raise generate.GenerateError("workdir", f"{workdir} was trained on task {task!r}, not "
                                 "text: experiments.generate samples text models "
                                 "(configs/lm.py)")
  vocab = config.model.get("vocab_size") or config.data.get("vocab_size")
  generate.check_sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                          vocab_size=vocab if isinstance(vocab, int) else None)
  tok = text.make_tokenizer(pipeline.text_config(config.data))
  ids = tok.encode(prompt)
  if len(ids) == 0:
    raise generate.GenerateError("prompt", f"encodes to no tokens with the "
                                 f"{config.data.get('tokenizer')} tokenizer; give more text")
  model, config = generate.load_model(workdir)
  out = generate.generate(model, jnp.asarray(ids)[None], max_new_tokens,
                          key=jax.random.key(seed), temperature=temperature, top_k=top_k,
                          top_p=top_p, prefill_chunk=prefill_chunk)
  return prompt + tok.decode(out[0].tolist())


def _classify(e: BaseException) -> tuple[int, str] | None:
  if isinstance(e, generate.GenerateError):
    return 2, f"--{e}"
  return None


def cli_main(argv: Sequence[str] | None = None) -> int:
  """The command, callable in-process: parses ``argv`` into fresh flags, samples, and
  returns the exit status; bad input prints one line on stderr (``--debug``: raises)."""
  return cli.guarded(argv, _main, _classify)


def _main(argv: list[str]) -> int:
  if not flags.FLAGS.is_parsed():  # absl logging reads the global flags' defaults
    flags.FLAGS.mark_as_parsed()
  fv = flags.FlagValues()
  f = _define_flags(fv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    print(__doc__.strip().splitlines()[0])
    print(f"\nUsage: {USAGE}\n\nFlags:")
    print(fv.get_help(include_special_flags=False))
    return 0
  rest = fv(argv)
  if rest[1:]:
    raise CommandLineError(f"unexpected argument(s) {' '.join(map(repr, rest[1:]))}: every "
                           f"option is a --flag=value (usage: {USAGE})")
  logging.set_verbosity(logging.WARNING)
  out = run(f["workdir"].value, f["prompt"].value, max_new_tokens=f["max_new_tokens"].value,
            temperature=f["temperature"].value, top_k=f["top_k"].value, top_p=f["top_p"].value,
            seed=f["seed"].value, prefill_chunk=f["prefill_chunk"].value)
  print(out)
  return 0


if __name__ == "__main__":
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
