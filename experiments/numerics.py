"""bf16 vs fp32 numerics of every recurrent mixer at long length (default T = 65,536).

    python -m experiments.numerics --T=65536 --out=results/numerics_bf16.json
    python -m experiments.numerics --mixers=titans_lmm --update   # re-measure one mixer

For every registered mixer except softmax attention (``attention``, ``swa``: no recurrent
state, and their dense [T, T] scores do not fit at this length on a CPU), one layer of width
``--d_model`` (32) with fp32 parameters is run on the same input ``x ~ N(0, 1)``, ``[1, T, D]``,
twice: compute dtype fp32 (the reference) and compute dtype bf16 (``dtype=jnp.bfloat16``,
input cast to bf16, parameters still fp32, recurrent state fp32 as ``LM.init_state`` keeps
it). Reported per mixer:

* ``rel_err``: ``||y_bf16 - y_fp32||_2 / ||y_fp32||_2`` over all tokens and channels of the
  parallel form ``mixer(x)``; ``rel_err_first`` / ``rel_err_last``: the same over the first
  and the last ``--window`` tokens, so error that grows with length shows up as
  ``rel_err_last >> rel_err_first``;
* ``state_rel_err``: the same for the final state of ``step`` (run over x in chunks of
  ``--step_chunk`` tokens), all float leaves concatenated; ``step_rel_err``: its outputs;
* ``step_vs_call_fp32``: fp32 ``step`` outputs vs fp32 ``mixer(x)`` (the contract at length T);
* ``finite``: every output and state of both runs is finite; where one is not,
  ``first_nonfinite`` gives the first token with a non-finite output per run (fp32 / bf16);
  ``stress_finite`` and ``stress_rel_err``: the same forward with ``--stress_scale`` x larger
  inputs (saturated gates, large normalisers, large softmax logits), and
  ``stress_first_nonfinite``.

A mixer passes when everything is finite and ``rel_err``, ``state_rel_err`` and
``step_rel_err`` are below ``--tol`` (5e-2; bf16 has an 8-bit significand, unit roundoff
2^-8 = 3.9e-3, so a few roundings per token give ~1e-2). When the parallel form needs more
than ``--max_temp_gib`` of compiled temporaries at length T (a dense window-attention
branch), it is not run and the chunked ``step`` outputs stand in for it (noted in ``notes``).
"""

from __future__ import annotations

import inspect
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx

from experiments import cli
from lcm import provenance, registry

# What the numbers depend on (lcm.provenance): the mixers, their kernels, this driver.
CODE = ("kernels", "layers", "lcm", "experiments/numerics.py")

def _define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  """Flags are defined only when run as a program: tests import compare() next to other
  experiment modules whose flags share names (--d_model, --mixers, --out); in ``fv``."""
  global _T, _D, _WINDOW, _STEP_CHUNK, _TOL, _STRESS, _MAX_TEMP, _MIXERS, _OUT, _UPDATE
  _T = flags.DEFINE_integer("T", 65536, "Sequence length.", flag_values=fv)
  _D = flags.DEFINE_integer("d_model", 32, "Model width.", flag_values=fv)
  _WINDOW = flags.DEFINE_integer("window", 4096, "Tokens in the first / last error windows.",
                                 flag_values=fv)
  _STEP_CHUNK = flags.DEFINE_integer("step_chunk", 8192, "Tokens per step() call.",
                                     flag_values=fv)
  _TOL = flags.DEFINE_float("tol", 5e-2, "Relative-error tolerance.", flag_values=fv)
  _STRESS = flags.DEFINE_float("stress_scale", 30.0, "Input scale of the stress run.",
                               flag_values=fv)
  _MAX_TEMP = flags.DEFINE_float("max_temp_gib", 4.0, "Largest compiled temporaries to run.",
                                 flag_values=fv)
  _MIXERS = flags.DEFINE_list("mixers", [], "Mixers (default: every recurrent one).",
                              flag_values=fv)
  _OUT = flags.DEFINE_string("out", "results/numerics_bf16.json", "Output JSON.",
                             flag_values=fv)
  _UPDATE = flags.DEFINE_bool("update", False, "Keep the other mixers' rows of an existing "
                              "--out and replace only those measured now (with --mixers).",
                              flag_values=fv)


def _check() -> None:
  """Before measuring: sizes, tolerances, mixer names, the output, and (--update) that the
  existing --out was measured at the same T and d_model."""
  cli.check_int("T", _T.value, min_value=1)
  cli.check_int("d_model", _D.value, min_value=1)
  cli.check_int("window", _WINDOW.value, min_value=1, max_value=_T.value,
                what=" (at most --T)")
  cli.check_int("step_chunk", _STEP_CHUNK.value, min_value=1)
  cli.check_float("tol", _TOL.value, above=0.0)
  cli.check_float("stress_scale", _STRESS.value, min_value=0.0, what=" (0: no stress run)")
  cli.check_float("max_temp_gib", _MAX_TEMP.value, above=0.0)
  if _MIXERS.value:
    cli.check_mixers("mixers", _MIXERS.value, split_commas=False,
                     allowed=recurrent_mixers())
  cli.check_out_file("out", _OUT.value)
  if _UPDATE.value and os.path.exists(_OUT.value):
    try:
      with open(_OUT.value, encoding="utf-8") as f:
        old = json.load(f)
      key = (old.get("T"), old.get("d_model"))
      rows = old["mixers"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise cli.CommandLineError(f"--update: {_OUT.value} is not a numerics result "
                                 f"({type(e).__name__}); drop --update or give another "
                                 "--out") from None
    if key != (_T.value, _D.value) or not isinstance(rows, list):
      raise cli.CommandLineError(f"--update: {_OUT.value} was measured at T={key[0]}, "
                                 f"d_model={key[1]}, not --T={_T.value} --d_model={_D.value}; "
                                 "use those or another --out")


def cli_main(argv=None) -> int:
  """``python -m experiments.numerics`` in-process: the exit status; bad input is one line on
  stderr (experiments/cli.py)."""
  return cli.run(argv, doc=__doc__, define=_define_flags, check=_check,
                 main=lambda rest: main(rest))  # pylint: disable=unnecessary-lambda


SOFTMAX_ONLY = ("attention", "swa")
# Registry defaults, except where d_model = 32 needs a smaller head (mamba2: 64 -> 16).
OVERRIDES = {"mamba2": {"head_dim": 16}}


def recurrent_mixers() -> list[str]:
  return [n for n in registry.names() if n not in SOFTMAX_ONLY]


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64 (b: the fp32 reference)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def first_nonfinite(y) -> int | None:
  """The first token (axis 1) of y [B, T, D] with a non-finite value, or None."""
  bad = ~np.isfinite(np.asarray(y, np.float32)).all(axis=(0, 2))
  return int(np.argmax(bad)) if bad.any() else None


def _nonfinite_tokens(pairs: dict) -> dict | None:
  out = {k: first_nonfinite(v) for k, v in pairs.items()}
  return out if any(v is not None for v in out.values()) else None


def _float_leaves(tree) -> np.ndarray:
  leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return np.concatenate(leaves) if leaves else np.zeros(0)


class Pair:
  """One mixer built twice from the same parameters: fp32 and bf16 compute, jitted."""

  def __init__(self, name: str, d_model: int, overrides: dict | None = None):
    overrides = OVERRIDES.get(name, {}) if overrides is None else overrides
    self.name = name

    def make(dtype):
      return registry.create(name, d_model=d_model, rngs=nnx.Rngs(0), dtype=dtype,
                             param_dtype=jnp.float32, **overrides)
    # One set of fp32 parameters shared by both builds (param_dtype is fp32 in both; the
    # bf16 graph comes from an abstract build, so nothing is initialised twice).
    g32, self.params = nnx.split(make(jnp.float32))
    g16, a16 = nnx.split(nnx.eval_shape(lambda: make(jnp.bfloat16)))
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    if shapes(self.params) != shapes(a16):
      raise AssertionError(f"{name}: fp32 and bf16 builds have different parameters")
    self.graphdefs = {"fp32": g32, "bf16": g16}
    self.models = {k: nnx.merge(g, self.params) for k, g in self.graphdefs.items()}
    self._call = {k: jax.jit(lambda p, x, g=g: nnx.merge(g, p)(x))
                  for k, g in self.graphdefs.items()}
    self._step = {k: jax.jit(lambda p, x, s, g=g: nnx.merge(g, p).step(x, s))
                  for k, g in self.graphdefs.items()}
    self._compiled = {}

  @staticmethod
  def cast(x, kind: str):
    return x.astype(jnp.bfloat16 if kind == "bf16" else jnp.float32)

  def call_temp_bytes(self, x) -> int:
    """Compiled temporaries of the parallel form at x's shape (fp32 and bf16: the larger).
    The executables are kept, so :meth:`call` at this shape does not compile again."""
    temps = []
    for kind in ("fp32", "bf16"):
      xk = self.cast(x, kind)
      c = self._call[kind].lower(self.params, xk).compile()
      self._compiled[(kind, xk.shape)] = c
      m = c.memory_analysis()
      temps.append(int(getattr(m, "temp_size_in_bytes", 0) or 0) if m is not None else 0)
    return max(temps)

  def call(self, x, kind: str):
    xk = self.cast(x, kind)
    fn = self._compiled.get((kind, xk.shape), self._call[kind])
    return fn(self.params, xk)

  def step_all(self, x, kind: str, chunk: int):
    """step() over x in chunks of ``chunk`` tokens from a fresh fp32 state -> (y, state)."""
    model = self.models[kind]
    kw = ({"max_len": x.shape[1]}
          if "max_len" in inspect.signature(model.init_state).parameters else {})
    state = model.init_state(x.shape[0], jnp.float32, **kw)
    ys = []
    for s in range(0, x.shape[1], chunk):
      y, state = self._step[kind](self.params, self.cast(x[:, s:s + chunk], kind), state)
      ys.append(y)
    return jnp.concatenate(ys, axis=1), state


def compare(name: str, *, T: int, d_model: int, window: int, step_chunk: int, tol: float,
            stress_scale: float = 0.0, max_temp_gib: float = 4.0, seed: int = 0,
            with_step: bool = True, pair: Pair | None = None) -> dict:
  """The measurements of the module docstring for one mixer."""
  t0 = time.time()
  pair = pair or Pair(name, d_model)
  x = jax.random.normal(jax.random.key(seed), (1, T, d_model), jnp.float32)
  out = {"mixer": name, "T": T, "d_model": d_model, "overrides": OVERRIDES.get(name, {}),
         "notes": []}
  temp = pair.call_temp_bytes(x)
  out["call_temp_gib"] = round(temp / 2**30, 3)
  run_call = temp <= max_temp_gib * 2**30
  finite = True
  if run_call:
    y32, y16 = pair.call(x, "fp32"), pair.call(x, "bf16")
    finite &= bool(jnp.isfinite(y32).all() & jnp.isfinite(y16).all())
  else:
    out["notes"].append(f"parallel form needs {temp / 2**30:.1f} GiB of temporaries at "
                        f"T={T}: chunked step outputs stand in for it")
  if with_step or not run_call:
    s32y, s32 = pair.step_all(x, "fp32", step_chunk)
    s16y, s16 = pair.step_all(x, "bf16", step_chunk)
    f32, f16 = _float_leaves(s32), _float_leaves(s16)
    finite &= bool(np.isfinite(f32).all() and np.isfinite(f16).all()
                   and jnp.isfinite(s32y).all() and jnp.isfinite(s16y).all())
    out["state_rel_err"] = rel_err(f16, f32)
    out["step_rel_err"] = rel_err(s16y, s32y)
    out["state_elements"] = int(f32.size)
    if run_call:
      out["step_vs_call_fp32"] = rel_err(s32y, y32)
    else:
      y32, y16 = s32y, s16y
  out["rel_err"] = rel_err(y16, y32)
  out["rel_err_first"] = rel_err(y16[:, :window], y32[:, :window])
  out["rel_err_last"] = rel_err(y16[:, -window:], y32[:, -window:])
  out["y_rms_fp32"] = float(jnp.sqrt(jnp.mean(jnp.square(y32.astype(jnp.float32)))))
  out["finite"] = finite
  if not finite:
    out["first_nonfinite"] = _nonfinite_tokens({"fp32": y32, "bf16": y16})
  if stress_scale and run_call:
    xs = x * stress_scale
    z32, z16 = pair.call(xs, "fp32"), pair.call(xs, "bf16")
    out["stress_scale"] = stress_scale
    out["stress_finite"] = bool(jnp.isfinite(z32).all() & jnp.isfinite(z16).all())
    if not out["stress_finite"]:
      out["stress_first_nonfinite"] = _nonfinite_tokens({"fp32": z32, "bf16": z16})
    out["stress_rel_err"] = rel_err(z16, z32)
  errs = [out["rel_err"]] + [out[k] for k in ("state_rel_err", "step_rel_err") if k in out]
  out["tol"] = tol
  out["passed"] = bool(finite and out.get("stress_finite", True)
                       and all(np.isfinite(e) and e < tol for e in errs))
  out["seconds"] = round(time.time() - t0, 1)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  names = _MIXERS.value or recurrent_mixers()
  rows = []
  for name in names:
    try:
      row = compare(name, T=_T.value, d_model=_D.value, window=_WINDOW.value,
                    step_chunk=_STEP_CHUNK.value, tol=_TOL.value,
                    stress_scale=_STRESS.value, max_temp_gib=_MAX_TEMP.value)
    except Exception as e:  # pylint: disable=broad-except
      row = {"mixer": name, "passed": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    rows.append(row)
    row["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    print(json.dumps(row), flush=True)
  if _UPDATE.value and os.path.exists(_OUT.value):
    with open(_OUT.value, encoding="utf-8") as f:
      old = json.load(f)
    if (old.get("T"), old.get("d_model")) != (_T.value, _D.value):
      raise ValueError(f"{_OUT.value} was measured at another T / d_model")
    new = {r["mixer"]: r for r in rows}
    rows = [new.pop(r["mixer"], r) for r in old["mixers"]] + list(new.values())
  result = {
      "T": _T.value, "d_model": _D.value, "tol": _TOL.value, "backend": jax.default_backend(),
      "device": str(jax.devices()[0]), "mixers": rows,
      "all_passed": all(r.get("passed") for r in rows),
      "skipped": list(SOFTMAX_ONLY),
  }
  # --update keeps older rows (each with its measured_at); the provenance names the mixers
  # measured by this command.
  extra = {"measured_now": names} if _UPDATE.value else {}
  result = provenance.attach(result, code=CODE, **extra)
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"all_passed={result['all_passed']} -> {_OUT.value}")


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()  # warnings in absl's format, as under absl.app
  sys.exit(cli_main(sys.argv))
