"""Passkey retrieval far beyond the training length: landmark attention vs attention.

    python -m experiments.reproduce_landmark            # train at 512, test 512 .. 32k
    python -m experiments.reproduce_landmark --train_len=256 --lengths=256,2048 --steps=300

The defaults are what made results/landmark.md (train length 512, 2500 steps: ~1.9 s/step
on one core of this CPU, ~80 min per mixer).

The landmark paper's claim (Mohtashami & Jaggi 2023) at CPU scale: a model trained only on
``--train_len``-token passkey examples (``configs/passkey.py``, landmark tokens inserted by
the LM every ``block_size - 1`` tokens) retrieves the passkey at 4x, 16x and 64x that
length when each token attends to its own block plus the ``top_k`` blocks its landmarks
select (positions remapped so distances stay within the trained range). The baseline is the
same model with plain causal softmax attention (RoPE), evaluated at the same lengths while
its dense ``[T, T]`` scores fit in ``--max_dense_gb``.

Training uses the exact grouped softmax (``exact_len`` above the training length); the
evaluation model is the trained one with ``exact_len=0``: every query retrieves, at every
length (the 1x column uses retrieval too; ``summary.json`` also has the exact-mode 1x score).
Writes ``<out>.md`` (accuracy-by-length table), ``<out>/summary.json`` (the rows, with their
provenance: ``lcm.provenance``) and ``<out>/by_length.png``. Runs live in ``--runs/<mixer>``
and resume.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags, logging

# What the table depends on (lcm.provenance): the model, the configs, this driver.
CODE = ("kernels", "layers", "lcm", "configs", "experiments/reproduce_landmark.py")


def _define_flags(fv: flags.FlagValues = flags.FLAGS):
  """The flags, in ``fv`` (a fresh one per :func:`cli_main` call); main reads them there."""
  global _FLAGS
  _FLAGS = fv
  flags.DEFINE_list("mixers", ["landmark", "attention"], "Mixer patterns to compare.",
                    flag_values=fv)
  flags.DEFINE_integer("train_len", 512, "Training sequence length (real tokens).", flag_values=fv)
  flags.DEFINE_list("lengths", ["512", "2048", "8192", "32768"], "Test lengths.", flag_values=fv)
  flags.DEFINE_integer("steps", 2500, "Training steps.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 32, "Training batch size.", flag_values=fv)
  flags.DEFINE_integer("eval_every", 250, "Evaluate and checkpoint every this many steps "
                       "(0: only at the end).", flag_values=fv)
  flags.DEFINE_integer("block_size", 32, "Landmark block (landmark included).", flag_values=fv)
  flags.DEFINE_integer("max_tail", -1, "Training examples end with up to this many haystack "
                       "tokens after the answer (-1: block_size - 2, so the question "
                       "takes every offset within a landmark block; 0: none).", flag_values=fv)
  flags.DEFINE_integer("top_k", 4, "Blocks retrieved per token and head at test time.",
                       flag_values=fv)
  flags.DEFINE_list("extra_top_k", [], "Also test landmark with these top_k (own rows).",
                    flag_values=fv)
  flags.DEFINE_bool("keep_previous", True, "At test time the block before each token's is "
                    "always one of its top_k (layers/landmark.py); with it, a row without "
                    "(plain top-k) is added.", flag_values=fv)
  flags.DEFINE_integer("examples", 64, "Test examples per length (needle depth uniform).",
                       flag_values=fv)
  flags.DEFINE_float("max_dense_gb", 6.0, "Skip dense attention where B*H*T^2 fp32 exceeds it.",
                     flag_values=fv)
  flags.DEFINE_string("runs", "runs/landmark", "Workdirs root.", flag_values=fv)
  flags.DEFINE_string("out", "results/landmark", "Output prefix (<out>.md and <out>/).",
                      flag_values=fv)


_FLAGS = flags.FLAGS


def _check() -> None:
  """Before any training: mixers, lengths, counts, the landmark block and top-k values, every
  mixer's config and the output paths."""
  from experiments import cli  # pylint: disable=g-import-not-at-top
  f = _FLAGS
  cli.check_mixers("mixers", f.mixers)
  cli.check_int("train_len", f.train_len, min_value=1)
  cli.int_list("lengths", f.lengths, min_value=1)
  cli.check_int("steps", f.steps, min_value=1)
  cli.check_int("batch_size", f.batch_size, min_value=1)
  cli.check_int("eval_every", f.eval_every, min_value=0, what=" (0: only at the end)")
  cli.check_int("block_size", f.block_size, min_value=2, what=" (landmark included)")
  cli.check_int("max_tail", f.max_tail, min_value=-1, what=" (-1: block_size - 2)")
  cli.check_int("top_k", f.top_k, min_value=1)
  cli.int_list("extra_top_k", f.extra_top_k, min_value=1, allow_empty=True)
  cli.check_int("examples", f.examples, min_value=1)
  cli.check_float("max_dense_gb", f.max_dense_gb, above=0.0)
  cli.check_configs(
      (f"--mixers={name} with these flags",
       mixer_config(name, train_len=f.train_len, steps=f.steps, batch_size=f.batch_size,
                    block_size=f.block_size, top_k=f.top_k, eval_every=f.eval_every,
                    max_tail=f.max_tail)) for name in f.mixers)
  cli.check_outputs(f.runs, f.out)


def cli_main(argv=None) -> int:
  """``python -m experiments.reproduce_landmark`` in-process: the exit status; bad input is
  one line on stderr (experiments/cli.py)."""
  from experiments import cli  # pylint: disable=g-import-not-at-top
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


def mixer_config(name: str, *, train_len: int, steps: int, batch_size: int, block_size: int,
                 top_k: int, eval_every: int = 0, max_tail: int = -1):
  """``configs/passkey.py:<name>`` at ``train_len``; landmark trains in exact mode.

  ``max_tail`` (-1: ``block_size - 2``) haystack tokens at most follow the training answer
  (``lcm.data.tasks.passkey``): with the question always at the end of a fixed length, it
  sits at one offset within a landmark block, and test lengths that put it across a block
  boundary fail (docs/known-issues.md, "Landmark attention"). Every mixer gets the same data.
  """
  from configs import passkey as passkey_config  # pylint: disable=g-import-not-at-top
  c = passkey_config.get_config(name)
  c.data.seq_len = train_len
  c.data.batch_size = batch_size
  c.data.max_tail = block_size - 2 if max_tail < 0 else max_tail
  c.train.steps = steps
  c.train.warmup_steps = min(c.train.warmup_steps, steps // 10)
  c.train.eval_every = c.train.checkpoint_every = eval_every or steps
  c.eval.num_examples = 64
  c.eval.batch_size = 16
  ext = train_len + train_len // (block_size - 1)
  exact = -(-ext // block_size) * block_size
  c.model.mixers.landmark = {"num_heads": 2, "block_size": block_size, "top_k": top_k,
                             "exact_len": exact}  # top_k unused in training (exact mode)
  return c


def question_offset(seq_len: int, passkey_len: int, block_size: int) -> int:
  """Offset of the query marker (at ``seq_len - passkey_len``) within its landmark block
  of ``block_size - 1`` real tokens; the answer crosses a block boundary when it is
  ``> block_size - 1 - passkey_len``."""
  return (seq_len - passkey_len) % (block_size - 1)


def training_offsets(train_len: int, passkey_len: int, block_size: int, max_tail: int) -> str:
  """The query-marker offsets training examples take, in words."""
  got = sorted({question_offset(train_len - r, passkey_len, block_size)
                for r in range(max_tail + 1)})
  return "all" if len(got) == block_size - 1 else ", ".join(map(str, got))


def retrieval_model(model, config, **landmark_overrides):
  """The trained LM rebuilt with other landmark fields (``exact_len=0``: always retrieve)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from lcm import model as model_lib  # pylint: disable=g-import-not-at-top
  mc = ml_collections.ConfigDict(config.model.to_dict())
  mc.mixers.landmark = {**dict(mc.mixers.landmark), **landmark_overrides}
  new = model_lib.LM(mc, rngs=nnx.Rngs(0))
  nnx.update(new, nnx.state(model))
  return new


def main(argv):
  del argv
  from lcm import generate, provenance, train  # pylint: disable=g-import-not-at-top
  from lcm.evals import needle  # pylint: disable=g-import-not-at-top
  f = _FLAGS
  logging.set_verbosity(logging.WARNING)
  lengths = [int(n) for n in f.lengths]
  os.makedirs(f.out, exist_ok=True)
  rows = []
  for name in f.mixers:
    workdir = os.path.join(f.runs, name.replace(",", "+"))
    c = mixer_config(name, train_len=f.train_len, steps=f.steps, batch_size=f.batch_size,
                     block_size=f.block_size, top_k=f.top_k, eval_every=f.eval_every,
                     max_tail=f.max_tail)
    s = train.run(c, workdir)
    model, config = generate.load_model(workdir)
    row = {"mixer": name, "num_params": s["num_params"], "steps": s["steps"],
           "train_eval_accuracy": s["eval_accuracy"], "by_length": {}, "seconds": {}}
    variants = [(name, model, None)]
    if name == "landmark":
      row["exact_1x"] = needle.passkey_accuracy(
          model, config.data, seq_len=f.train_len, num_examples=f.examples,
          batch_size=8)["retrieved"]
      kp = f.keep_previous
      variants = [(name if k == f.top_k else f"landmark (top_k={k})",
                   retrieval_model(model, config, exact_len=0, top_k=k, keep_previous=kp),
                   None if k == f.top_k else {"top_k": k, "keep_previous": kp})
                  for k in [f.top_k] + [int(k) for k in f.extra_top_k]]
      row["keep_previous"] = kp
      if kp:
        variants.append(("landmark (plain top-k)", retrieval_model(
            model, config, exact_len=0, top_k=f.top_k, keep_previous=False),
                         {"top_k": f.top_k, "keep_previous": False}))
    heads = int(dict(config.model.mixers.get("attention", {})).get("num_heads", 2))
    for label, m, extra in variants:
      r_row = row if extra is None else {**row, "mixer": label, "by_length": {},
                                         "seconds": {}, **extra}
      for n in lengths:
        dense_gb = 4 * heads * n * n * 4 / 2**30  # batch 4, fp32 scores
        if name != "landmark" and dense_gb > f.max_dense_gb:
          r_row["by_length"][str(n)] = None
          print(f"{label} @ {n}: skipped (dense scores ~{dense_gb:.0f} GB)", flush=True)
          continue
        t0 = time.time()
        r = needle.passkey_accuracy(m, config.data, seq_len=n, num_examples=f.examples,
                                    batch_size=max(1, min(8, 16384 // n)))
        r_row["by_length"][str(n)] = r["retrieved"]
        r_row["seconds"][str(n)] = round(time.time() - t0, 1)
        print(f"{label} @ {n}: retrieved {r['retrieved']:.3f} (digits "
              f"{r['digit_accuracy']:.3f}, {time.time() - t0:.0f} s)", flush=True)
      if r_row is not row:
        rows.append(r_row)
    rows.append(row)
  needle.plot_by_length({r["mixer"]: {int(k): v for k, v in r["by_length"].items()
                                      if v is not None} for r in rows},
                        os.path.join(f.out, "by_length.png"), train_len=f.train_len,
                        title="passkey retrieval vs length (trained at "
                              f"{f.train_len})")
  c = mixer_config("landmark", train_len=f.train_len, steps=f.steps, batch_size=f.batch_size,
                   block_size=f.block_size, top_k=f.top_k, max_tail=f.max_tail)
  cell = lambda v: "not run (dense T^2)" if v is None else f"{v:.2f}"
  lines = [
      f"# Passkey retrieval beyond the training length ({c.data.passkey_len}-digit passkey)",
      "",
      f"Made by `python -m experiments.reproduce_landmark` (`configs/passkey.py:<mixer>`: "
      f"d_model {c.model.d_model}, {c.model.num_layers} layers, trained at {f.train_len} "
      f"tokens for {f.steps} steps, batch {f.batch_size}, up to {c.data.max_tail} haystack "
      f"tokens after the training answer; landmark block {f.block_size} "
      f"(landmark included), top-k {f.top_k} at test time"
      + (" with the block before each token's always among them (`keep_previous`; "
         "`landmark (plain top-k)`: without)" if f.keep_previous else "")
      + f"; {f.examples} held-out examples "
      f"per length, needle depth uniform). Cells: fraction whose whole passkey is retrieved.",
      "",
      "| model | params | " + " | ".join(f"{n} ({n / f.train_len:g}x)" for n in lengths) + " |",
      "|---|---|" + "---|" * len(lengths),
  ]
  for r in rows:
    lines.append(f"| {r['mixer']} | {r['num_params']:,} | " + " | ".join(
        cell(r["by_length"][str(n)]) for n in lengths) + " |")
  offsets = {n: question_offset(n, c.data.passkey_len, f.block_size) for n in lengths}
  lines += ["", "Query marker's offset within its landmark block (of "
            f"{f.block_size - 1} real tokens) at each test length: " + ", ".join(
                f"{n}: {o}" for n, o in offsets.items()) + f"; training saw offsets "
            + training_offsets(f.train_len, c.data.passkey_len, f.block_size,
                               c.data.max_tail) + "."]
  base = os.path.basename(f.out)
  lines += ["", f"![retrieval by length]({base}/by_length.png)", ""]
  text = "\n".join(lines) + "\n"
  with open(f.out + ".md", "w", encoding="utf-8") as fh:
    fh.write(text)
  outputs = [f.out + ".md", os.path.join(f.out, "by_length.png")]
  with open(os.path.join(f.out, "summary.json"), "w", encoding="utf-8") as fh:
    json.dump(provenance.attach(rows, code=CODE, outputs=outputs), fh, indent=2)
  print(text)


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
