"""Where the time goes: the XLA ops of one mixer's fwd+bwd, ranked by measured time.

    python -m experiments.profile_ops --mixer=mamba2 --T=4096 --width=256 \
        --overrides='{"chunk_size": 256, "impl": "xla"}' --top=30

Compiles the jitted ``grad(sum(y))`` w.r.t. a registered mixer's parameters and its input
``x ~ N(0, 1)`` ``[1, T, width]`` (the protocol of ``experiments.bench layers``), warms it
up, traces ``--runs`` calls with ``jax.profiler`` and reads the trace with xprof
(``pip install xprof``; in the ``bench`` extra): :func:`lcm.evals.throughput.op_profile`.
Prints the ``--top`` XLA ops (fusions, dots, copies; ops inside a ``lax.scan`` body count
once per iteration) by time per call, each with its output shape and the JAX operation that
produced it (the optimised HLO's ``op_name``), and the median wall time per call.
``--json`` also writes the table.

Session 10 steered the chunked-scan work with it: the profile showed DRAM-bound
element-wise passes over ``[H, C, C]`` temporaries and the transposing copies XLA:CPU puts
around batched dots, not slow matmuls. Times come from one process on a shared machine:
compare ops within one profile, and variants in one process (``experiments.bench``).
"""

from __future__ import annotations

import json
import time

from absl import flags, logging

from experiments import cli



def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """The flags, in ``fv`` (a fresh one per :func:`cli_main` call)."""
  global _MIXER, _T, _WIDTH, _OVERRIDES, _RUNS, _TOP, _JSON
  _MIXER = flags.DEFINE_string("mixer", "mamba2", "Registered mixer name.", flag_values=fv)
  _T = flags.DEFINE_integer("T", 4096, "Sequence length.", flag_values=fv)
  _WIDTH = flags.DEFINE_integer("width", 256, "d_model of the mixer.", flag_values=fv)
  _OVERRIDES = flags.DEFINE_string("overrides", "{}", "Mixer config fields, as JSON.",
                                   flag_values=fv)
  _RUNS = flags.DEFINE_integer("runs", 5, "Timed and traced calls (after two warm-up calls).",
                               flag_values=fv)
  _TOP = flags.DEFINE_integer("top", 30, "Ops to print.", flag_values=fv)
  _JSON = flags.DEFINE_string("json", "", "Also write the result as JSON to this path.",
                              flag_values=fv)


def _overrides() -> dict:
  try:
    value = json.loads(_OVERRIDES.value)
  except ValueError as e:
    raise cli.CommandLineError(f"--overrides: not JSON ({e}); give a JSON object such as "
                               "--overrides='{\"chunk_size\": 256}'") from None
  if not isinstance(value, dict):
    raise cli.CommandLineError(f"--overrides: must be a JSON object of mixer config fields, "
                               f"not {type(value).__name__}")
  return value


def _check() -> None:
  """Before compiling: the mixer, its overrides (fields and values: the layer's validation),
  the sizes and the output."""
  from lcm import registry  # pylint: disable=import-outside-toplevel
  from layers.common import ConfigError  # pylint: disable=import-outside-toplevel
  name = _MIXER.value
  cli.check_mixers("mixer", [name], split_commas=False)
  cli.check_int("T", _T.value, min_value=1)
  cli.check_int("width", _WIDTH.value, min_value=1)
  cli.check_int("runs", _RUNS.value, min_value=1)
  cli.check_int("top", _TOP.value, min_value=1)
  overrides = _overrides()
  fields = registry.config_fields(name)
  for field in overrides:
    if field not in fields:
      close = cli.closest(field, fields)
      raise cli.CommandLineError(f"--overrides: mixer {name!r} has no field {field!r}"
                                 f"{f'; did you mean {close}?' if close else ''} (its fields: "
                                 f"{', '.join(fields)})")
  try:
    registry.validate(name, _WIDTH.value, overrides)
  except ConfigError as e:
    raise cli.CommandLineError(f"--overrides / --width: {e}") from None
  except (TypeError, ValueError) as e:
    raise cli.CommandLineError(f"--overrides: {type(e).__name__}: {e}") from None
  cli.check_out_file("json", _JSON.value, optional=True)


def cli_main(argv=None) -> int:
  """``python -m experiments.profile_ops`` in-process: the exit status; bad input is one line on
  stderr (experiments/cli.py)."""
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


def profile_mixer(name: str, *, T: int, d_model: int, overrides: dict | None = None,
                  runs: int = 5) -> dict:
  """Median wall ms per call and the ranked XLA ops of a mixer's jitted fwd+bwd."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from lcm import registry  # pylint: disable=import-outside-toplevel
  from lcm.evals import throughput  # pylint: disable=import-outside-toplevel
  module = registry.create(name, d_model=d_model, rngs=nnx.Rngs(0), **(overrides or {}))
  f, params, _ = throughput.layer_grad(module, lambda m, x: m(x))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, T, d_model))
  compiled = f.lower(params, x).compile()
  run = lambda: jax.block_until_ready(compiled(params, x))
  for _ in range(2):
    run()
  walls = []
  for _ in range(runs):
    t0 = time.perf_counter()
    run()
    walls.append((time.perf_counter() - t0) * 1e3)
  ops = throughput.op_profile(run, runs, compiled.as_text())
  return {"mixer": name, "T": T, "d_model": d_model, "overrides": overrides or {},
          "wall_ms": float(np.median(walls)), "op_ms_total": sum(o["ms"] for o in ops),
          "ops": ops}


def main(argv):
  del argv
  import layers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  r = profile_mixer(_MIXER.value, T=_T.value, d_model=_WIDTH.value,
                    overrides=_overrides(), runs=_RUNS.value)
  print(f"{r['mixer']} fwd+bwd, T={r['T']}, d_model={r['d_model']}: wall {r['wall_ms']:.1f} "
        f"ms per call (median), XLA ops {r['op_ms_total']:.1f} ms")
  print(f"{'ms':>8} {'x/call':>6}  {'op':30} {'shape':34} source")
  for o in r["ops"][:_TOP.value]:
    print(f"{o['ms']:8.2f} {o['calls']:6.1f}  {o['op'][:30]:30} {o['shape'][:34]:34} "
          f"{o['source'][-70:]}")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(r, f, indent=1)


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
