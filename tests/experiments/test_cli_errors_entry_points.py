"""Bad input to every other ``python -m experiments.<x>`` entry point (the sweep, the tables,
the reproductions, numerics, profile_ops, fault_injection, check_results and
``experiments.bench <mode>``) ends in one named line on stderr with exit status 2, never a
Python traceback (issue 28; experiments/cli.py): listed cases per entry point, a hypothesis
property over generated bad command lines (in-process, through each ``cli_main``) and two
real subprocesses. Every case must fail in validation: each entry point's ``main`` is
replaced by one that fails the test if it is reached, so nothing is trained or timed."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys

import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import mqar
from experiments import (check_results, cli, extrapolation, fault_injection, lm_table,
                         mqar_table, needle, numerics, profile_ops, reproduce_joint_recall,
                         reproduce_landmark, reproduce_zoology, sweep)
from experiments.bench import __main__ as bench_main
from experiments.bench import common as bench_common
from lcm import config as config_lib
from lcm import registry

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRACEBACK = "Traceback (most recent call last)"
# One named line: a flag, the bench mode, or a stray argument.
NAMED = re.compile(r"^lcm: (--[\w.]+|flag --[\w.]+=|mode '|unexpected argument)")

MODULES = {
    "sweep": sweep, "needle": needle, "extrapolation": extrapolation, "lm_table": lm_table,
    "mqar_table": mqar_table, "numerics": numerics, "profile_ops": profile_ops,
    "reproduce_joint_recall": reproduce_joint_recall, "reproduce_landmark": reproduce_landmark,
    "reproduce_zoology": reproduce_zoology, "fault_injection": fault_injection,
    "check_results": check_results, "bench": bench_main,
}


def _reached(*args, **kwargs):
  raise AssertionError(f"validation let a bad command line through to main{args!r}")


@pytest.fixture(scope="module", autouse=True)
def no_heavy_work():
  """Every entry point's main (and every bench mode) fails the test if reached."""
  with pytest.MonkeyPatch.context() as mp:
    for mod in MODULES.values():
      mp.setattr(mod, "main", _reached)
    for mode in bench_main.MAINS:
      mp.setitem(bench_main.MAINS, mode, _reached)
    yield


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """A plain file, a folder holding something else, and a fake training run (config.json
  and an empty checkpoint step folder: enough for the checks, never loaded)."""
  base = tmp_path_factory.mktemp("entry")
  afile = base / "afile"
  afile.write_text("not a directory")
  other = base / "other"
  other.mkdir()
  (other / "precious.txt").write_text("keep me")
  run = base / "run"
  (run / "checkpoints" / "5").mkdir(parents=True)
  (run / "config.json").write_text(config_lib.resolve(mqar.get_config("attention")).to_json())
  return {"afile": str(afile), "other": str(other), "run": str(run), "base": str(base),
          "missing": str(base / "missing")}


def _call(module: str, argv) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = MODULES[module].cli_main([f"experiments.{module}", *argv])
  return code, out.getvalue(), err.getvalue()


def _last_line(text: str) -> str:
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _assert_named(code, out, err):
  assert TRACEBACK not in err and TRACEBACK not in out, err[-3000:]
  last = _last_line(err)
  assert code == 2, (code, err[-2000:])
  assert NAMED.match(last), last
  assert "unexpected error" not in last, last


# ----------------------------------------------------------------------------- listed cases

CASES = [
    ("sweep", ["--bad_flag"], "--bad_flag: unknown flag"),
    ("sweep", ["--grid=model.d_modle=32,64"], "--grid: model.d_modle: is not a key"),
    ("sweep", ["--config=configs/nope.py:x"], "configs/nope.py does not exist"),
    ("sweep", ["--runs={afile}"], "is a file, not a folder"),
    ("needle", ["--mixers=attentoin"], "unknown mixer 'attentoin'; did you mean attention?"),
    ("needle", ["--factors=1,-2"], "--factors: '-2' is not an integer >= 1"),
    ("needle", ["--d_model=63"], "must divide d_model=63"),
    ("extrapolation", ["--workdir={missing}"], "--workdir: "),
    ("extrapolation", ["--workdir={run}", "--lengths=2x,abc"], "--lengths: 'abc' is neither"),
    ("extrapolation", ["--workdir={run}", "--step=7"], "no checkpoint at that step; its steps: 5"),
    ("lm_table", ["--steps=-1"], "--steps=-1: must be an integer >= 1"),
    ("lm_table", ["--mixers=gla,nope"], "unknown mixer 'nope'"),
    ("mqar_table", ["--out={afile}"], "is a file, but the outputs go into the folder"),
    ("mqar_table", ["--steps=-5"], "--steps=-5: must be an integer >= 0"),
    ("numerics", ["--tol=0"], "--tol=0.0: must be a finite number > 0"),
    ("numerics", ["--mixers=attention"], "'attention' cannot be used here"),
    ("numerics", ["--T=1024", "--window=4096"], "--window=4096: must be an integer >= 1 and "
     "<= 1024"),
    ("profile_ops", ["--mixer=mamab2"], "unknown mixer 'mamab2'; did you mean mamba2?"),
    ("profile_ops", ["--overrides={{chunk_size: 1}}"], "--overrides: not JSON"),
    ("profile_ops", ["--overrides={{\"chunk_sise\": 64}}"], "did you mean chunk_size?"),
    ("reproduce_joint_recall", ["--patterns=mamba2|mamba2,nope"], "unknown mixer 'nope'"),
    ("reproduce_joint_recall", ["--num_layers=3"], "model.num_layers: must be a multiple"),
    ("reproduce_landmark", ["--block_size=1"], "--block_size=1: must be an integer >= 2"),
    ("reproduce_landmark", ["--lengths=512,0"], "--lengths: '0' is not an integer >= 1"),
    ("reproduce_zoology", ["--mixers=attention,mamab2"], "did you mean mamba2?"),
    ("reproduce_zoology", ["--lrs=3e-3,-1"], "--lrs: '-1' is not a finite number > 0"),
    ("fault_injection", ["--workdir={other}"], "holds files of something else"),
    ("fault_injection", ["--kills=100", "--steps=10"], "--kills=100: at most"),
    ("fault_injection", ["--corrupt_at=30"], "--corrupt_at: 30 is after the last kill"),
    ("check_results", ["--results=no_such_results"], "does not exist"),
    ("check_results", ["stray"], "unexpected argument(s) 'stray'"),
    ("bench", ["nope"], "mode 'nope': unknown benchmark"),
    ("bench", ["decode", "--mixers=attention,nope"], "--mixers: unknown mixer 'nope'"),
    ("bench", ["kernels", "--repeats=0"], "--repeats=0: must be an integer >= 1"),
]


@pytest.mark.parametrize("module, argv, want", CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_bad_input_is_one_named_line(paths, module, argv, want):
  before = sorted(os.listdir(paths["base"]))
  code, out, err = _call(module, [a.format(**paths) for a in argv])
  _assert_named(code, out, err)
  assert want in _last_line(err), _last_line(err)
  assert sorted(os.listdir(paths["base"])) == before  # nothing created
  assert os.listdir(paths["other"]) == ["precious.txt"]


def test_debug_reraises_with_the_traceback():
  with pytest.raises(cli.CommandLineError, match="--steps=-1"):
    lm_table.cli_main(["experiments.lm_table", "--steps=-1", "--debug"])
  with pytest.raises(flags.Error, match="nope"):
    sweep.cli_main(["experiments.sweep", "--nope", "--debug"])
  with pytest.raises(cli.CommandLineError, match="unknown benchmark"):
    bench_main.cli_main(["experiments.bench", "nope", "--debug"])


def test_help_exits_0_and_bench_leaves_absl_flags_alone():
  code, out, _ = _call("needle", ["--help"])
  assert code == 0 and "--mixers" in out and "--[no]debug" in out
  repeats = bench_common.REPEATS.value
  code, out, err = _call("bench", ["swa", "--repeats=-3"])
  _assert_named(code, out, err)
  assert bench_common.REPEATS.value == repeats  # checked on a copy of the global flags


# ----------------------------------------------------------------------------- property

_ident = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
_junk = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                max_size=10)
_unknown_mixer = _ident.filter(lambda s: s not in registry.names())
_nonpos = st.integers(-10**6, 0).map(str)
_neg = st.integers(-10**6, -1).map(str)
_bad_float = st.sampled_from(["0", "-1", "-0.5", "nan", "inf", "-inf"])
_not_int = st.sampled_from(["abc", "1.5", "", "1e3", "0x"])


def _mistakes(paths) -> dict[str, list[tuple[str, st.SearchStrategy]]]:
  """Per entry point: (flag, values each of which alone makes the command line bad)."""
  afile, other, missing = paths["afile"], paths["other"], paths["missing"]
  return {
      "sweep": [("grid", _ident.map(lambda s: f"{s}_zz.x=1,2")),
                ("grid", _nonpos.map(lambda v: f"model.d_model={v}")),
                ("config", _ident.map(lambda s: f"configs/{s}_zz.py:attention")),
                ("runs", st.just(afile)), ("out", st.sampled_from(["", "/proc/x/y"]))],
      "needle": [("mixers", _unknown_mixer), ("train_len", _nonpos), ("factors", _nonpos),
                 ("depths", st.sampled_from(["1.5", "-0.1", "x", "nan"])),
                 ("examples", _nonpos), ("steps", _neg), ("out", st.just(afile))],
      "extrapolation": [("workdir", st.sampled_from(["", afile, missing, other])),
                        ("examples", _neg), ("batch_size", _neg), ("step", _neg)],
      "lm_table": [("mixers", _unknown_mixer), ("steps", _nonpos), ("d_model", _nonpos),
                   ("num_layers", _nonpos), ("seq_len", _nonpos), ("batch_size", _nonpos)],
      "mqar_table": [("mixers", _unknown_mixer), ("steps", _neg), ("runs", st.just(afile))],
      "numerics": [("T", _nonpos), ("tol", _bad_float), ("step_chunk", _nonpos),
                   ("mixers", st.one_of(_unknown_mixer, st.sampled_from(["attention", "swa"]))),
                   ("max_temp_gib", _bad_float), ("out", st.just(other))],
      "profile_ops": [("mixer", _unknown_mixer), ("T", _nonpos), ("width", _nonpos),
                      ("runs", _nonpos), ("top", _nonpos),
                      ("overrides", st.sampled_from(["{", "[1]", "1", "{\"nope_zz\": 1}"]))],
      "reproduce_joint_recall": [("patterns", _unknown_mixer), ("num_layers", _nonpos),
                                 ("steps", _nonpos), ("top_k", _nonpos)],
      "reproduce_landmark": [("mixers", _unknown_mixer), ("block_size", st.integers(-5, 1)
                                                          .map(str)),
                             ("lengths", _nonpos), ("top_k", _nonpos), ("examples", _nonpos),
                             ("max_dense_gb", _bad_float)],
      "reproduce_zoology": [("mixers", _unknown_mixer.filter(
          lambda s: s not in reproduce_zoology.DEFAULT_MIXERS)), ("widths", _nonpos),
                            ("lrs", _bad_float), ("steps", _nonpos),
                            ("num_kv_pairs", _nonpos)],
      "fault_injection": [("kills", _nonpos), ("steps", st.integers(-5, 1).map(str)),
                          ("keep", _nonpos), ("workdir", st.sampled_from(["", afile, other]))],
      "check_results": [("results", _ident.map(lambda s: f"{s}_zz"))],
      "bench": [("repeats", _nonpos), ("max_call_seconds", _bad_float),
                ("mode", _ident.filter(lambda s: s not in bench_common.MODES))],
  }


_INT_FLAGS = {"needle": "train_len", "lm_table": "steps", "numerics": "T", "profile_ops": "T",
              "reproduce_landmark": "top_k", "reproduce_zoology": "steps",
              "fault_injection": "kills", "bench": "repeats", "mqar_table": "steps"}


@st.composite
def bad_argv(draw, paths):
  """An entry point and 1 to 3 mistakes, each enough to make its command line bad."""
  table = _mistakes(paths)
  module = draw(st.sampled_from(sorted(MODULES)), label="module")
  args: dict[str, str] = {}
  positional: list[str] = []
  if module == "extrapolation":
    args["workdir"] = paths["run"]  # a valid run: the mistakes below make it bad
  for _ in range(draw(st.integers(1, 3), label="mistakes")):
    kind = draw(st.sampled_from(["flag", "flag", "flag", "unknown_flag", "positional", "type"]))
    if kind == "flag":
      flag, values = draw(st.sampled_from(table[module]))
      if flag == "mode":
        positional = [draw(values)]
      else:
        args[flag] = draw(values)
    elif kind == "unknown_flag":
      args[f"{draw(_ident)}_zz"] = draw(_junk)
    elif kind == "positional" and module != "bench":
      positional.append(draw(_junk.filter(lambda s: s and not s.startswith("-"))))
    elif kind == "type" and module in _INT_FLAGS:
      args[_INT_FLAGS[module]] = draw(_not_int)
    else:
      args["zz_" + draw(_ident)] = "1"
  return module, [*positional, *(f"--{k}={v}" for k, v in args.items())]


def test_property_bad_command_lines(paths):
  before = sorted(os.listdir(paths["base"]))

  @settings(max_examples=100, deadline=None, database=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
  @given(bad_argv(paths))
  def check(case):
    module, argv = case
    code, out, err = _call(module, argv)
    _assert_named(code, out, err)
    assert len(_last_line(err)) < 2000
  check()
  assert sorted(os.listdir(paths["base"])) == before
  assert os.listdir(paths["other"]) == ["precious.txt"]


# ----------------------------------------------------------------------------- subprocess


@pytest.mark.parametrize("argv, want", [
    (["-m", "experiments.bench", "nope"], "mode 'nope': unknown benchmark"),
    (["-m", "experiments.sweep", "--bad_flag"], "--bad_flag: unknown flag"),
], ids=["bench-unknown-mode", "sweep-unknown-flag"])
def test_command_line(argv, want):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300, check=False)
  _assert_named(p.returncode, p.stdout, p.stderr)
  assert want in _last_line(p.stderr), p.stderr[-2000:]
