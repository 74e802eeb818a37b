"""Bad input to ``experiments.train`` and ``experiments.generate`` ends in one named line on
stderr, never a Python traceback (issue 28): the cases the issue lists, a hypothesis
property over 200 generated bad command lines (in-process, through ``cli_main``), and a few
real subprocesses. No file of an existing workdir changes (SHA-256 before and after)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import lm, mqar
from experiments import generate as generate_cli
from experiments import train as train_cli
from lcm import checkpoint, config as config_lib, generate, provenance, registry

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRACEBACK = "Traceback (most recent call last)"
# One named line: a flag, a config field, the config file or the workdir.
NAMED = re.compile(r"^lcm: (--[\w.]+|flag --[\w.]+=|Invalid config: [\w.]+: |workdir |"
                   r"cannot create |unexpected argument)")
TINY = ["--config.data.vocab_size=32", "--config.data.seq_len=16",
        "--config.data.num_kv_pairs=2", "--config.data.batch_size=8",
        "--config.model.d_model=16", "--config.model.num_layers=1",
        "--config.train.steps=2", "--config.train.warmup_steps=1",
        "--config.eval.num_examples=8", "--config.eval.batch_size=8",
        "--config.train.progress=False"]


def _hashes(directory) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = hashlib.sha256(
          pathlib.Path(path).read_bytes()).hexdigest()
  return out


def _call(main, argv) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(argv)
  return code, out.getvalue(), err.getvalue()


def _last_line(text: str) -> str:
  lines = [line for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _assert_named(code, out, err, want_code=2):
  assert TRACEBACK not in err and TRACEBACK not in out, err[-3000:]
  last = _last_line(err)
  assert code == want_code, (code, err[-2000:])
  assert NAMED.match(last), last
  assert "unexpected error" not in last, last


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A workdir of an earlier run (files that must not change), a plain file, a text
  model's workdir with no checkpoint, and a tiny corpus for it."""
  base = tmp_path_factory.mktemp("cli")
  run = base / "run"
  run.mkdir()
  (run / "config.json").write_text(mqar.get_config("attention").to_json())
  (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
  (run / "checkpoints").mkdir()
  afile = base / "afile"
  afile.write_text("not a directory")
  corpus = base / "corpus"
  corpus.mkdir()
  for i in range(8):
    (corpus / f"{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
  text_run = base / "text_run"
  text_run.mkdir()
  c = lm.get_config("attention")
  c.data.path, c.data.pattern = str(corpus), "*.txt"
  (text_run / "config.json").write_text(config_lib.resolve(c).to_json())
  return {"run": run, "afile": afile, "text_run": text_run, "base": base}


# ----------------------------------------------------------------------------- train cases


def _train(dirs, *extra, workdir=None, config="configs/mqar.py:attention"):
  workdir = dirs["run"] if workdir is None else workdir
  return ["experiments.train", f"--config={config}", *TINY, f"--workdir={workdir}", *extra]


@pytest.mark.parametrize("extra, workdir, config, want", [
    (["--config.train.learning_rate=1e-3"], None, None, "did you mean --config.train.lr?"),
    (["--config.model.mixers.gla.num_heads=2"], None, None, "not in model.pattern"),
    (["--config.model.mixers.attention.num_headz=2"], None, None, "did you mean num_heads?"),
    ([], None, "configs/nope.py:attention", "configs/nope.py does not exist"),
    ([], None, "README.md", "not a Python config file"),
    ([], "afile", None, "is a file, not a directory"),
    ([], "", None, "--workdir is empty"),
    ([], "/proc", None, "cannot create the lock file /proc/.lock"),
    ([], "/proc/lcm_run", None, "cannot create workdir /proc/lcm_run"),
    (["--config.mesh.tensor=4"], None, None, "mesh.tensor: must be <= "
     "model.mixers.attention.num_heads=2"),
    (["--config.train.steps=abc"], None, None, "--config.train.steps=abc"),
    (["stray"], None, None, "unexpected argument"),
    (["--workdri=x"], None, None, "did you mean --workdir?"),
])
def test_train_bad_input_is_one_named_line(dirs, extra, workdir, config, want):
  before = _hashes(dirs["base"])
  workdir = {"afile": dirs["afile"]}.get(workdir, workdir)
  argv = _train(dirs, *extra, workdir=workdir, config=config or "configs/mqar.py:attention")
  code, out, err = _call(train_cli.cli_main, argv)
  _assert_named(code, out, err)
  assert want in _last_line(err), _last_line(err)
  assert _hashes(dirs["base"]) == before


def test_read_only_workdir(tmp_path, monkeypatch):
  """A workdir under a read-only directory. Root writes into read-only directories (CI runs
  as root), so there the refusal the kernel would give is simulated: ``os.makedirs`` raises
  EACCES for paths under it, as it does for other users."""
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  if os.geteuid() == 0:
    makedirs = os.makedirs

    def refuse(path, *a, **kw):
      if str(path).startswith(str(ro) + os.sep):
        raise PermissionError(13, "Permission denied", str(path))
      return makedirs(path, *a, **kw)
    monkeypatch.setattr(os, "makedirs", refuse)
  code, out, err = _call(train_cli.cli_main, _train({}, workdir=ro / "sub"))
  _assert_named(code, out, err)
  assert "cannot create workdir" in err and "Permission denied" in err


def test_debug_reraises_with_the_traceback(dirs):
  with pytest.raises(train_cli.CommandLineError, match="learning_rate"):
    train_cli.cli_main(_train(dirs, "--config.train.learning_rate=1", "--debug"))


def test_config_help_lists_every_field_with_value_and_type():
  code, out, err = _call(train_cli.cli_main, ["experiments.train", "--config_help",
                                              "--config=configs/mqar.py:attention",
                                              "--config.train.steps=7"])
  assert code == 0, err
  assert "  train.steps = 7  (int)" in out and "  train.lr = 0.003  (float)" in out
  assert "  model.mixers.attention.num_heads = 2  (int)" in out
  assert "  model.mixers.attention.num_kv_heads = None  (int | None, default)" in out
  listed = {line.split(" = ")[0].strip() for line in out.splitlines() if " = " in line}
  want = set(provenance.flatten(mqar.get_config("attention").to_dict()))
  assert want <= listed, want - listed


def test_a_pattern_mixer_without_overrides_can_be_overridden(dirs):
  """configs/mqar.py:gla gives gla no overrides; --config.model.mixers.gla.<field> still
  parses (typed by the field's default) and reaches validation."""
  code, out, err = _call(train_cli.cli_main, _train(
      dirs, "--config.model.mixers.gla.num_heads=3", config="configs/mqar.py:gla"))
  _assert_named(code, out, err)
  assert "model.mixers.gla" in _last_line(err) and "num_heads=3" in _last_line(err)


def test_full_disk_and_unusable_checkpoint_are_one_line(tmp_path, monkeypatch):
  def full(*a, **k):
    del a, k
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "w" / "x"))
  monkeypatch.setattr(provenance, "append_history", full)
  code, out, err = _call(train_cli.cli_main, _train({}, workdir=tmp_path / "w"))
  assert code == 1 and TRACEBACK not in err, err[-2000:]
  assert _last_line(err).startswith("lcm: no space left on device writing "), err[-2000:]
  # Orbax's errors wrap the cause: it is found down the chain
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/3")
    except OSError as e:
      raise RuntimeError("asyncio task failed\nwith many\nlines") from e
  except RuntimeError as e:
    code, line = train_cli.error_line(e)
  assert code == 1 and line.startswith("no space left on device writing /ckpt/3")
  code, line = train_cli.error_line(checkpoint.CheckpointError("no usable checkpoint\nin x"))
  assert code == 1 and "\n" not in provenance.one_line(line)


# ----------------------------------------------------------------------------- generate


def _gen(workdir, *extra):
  return ["experiments.generate", f"--workdir={workdir}", "--max_new_tokens=2", *extra]


@pytest.mark.parametrize("extra, workdir, want", [
    (["--temperature=-1"], "text_run", "--temperature: must be a finite number >= 0"),
    (["--top_k=1000"], "text_run", "--top_k: must be <= the vocabulary size 256"),
    (["--top_k=-1"], "text_run", "--top_k: must be an integer >= 0"),
    (["--top_p=0"], "text_run", "--top_p: must be in (0, 1]"),
    (["--top_p=1.5"], "text_run", "--top_p: must be in (0, 1]"),
    (["--prompt="], "text_run", "--prompt: is empty"),
    (["--prompt=ab\udcff"], "text_run", "--prompt: is not valid UTF-8 (byte 0xff"),
    (["--prefill_chunk=0"], "text_run", "--prefill_chunk: must be an integer >= 1"),
    (["--max_new_tokens=0"], "text_run", "--max_new_tokens: must be an integer >= 1"),
    ([], "text_run", "has no checkpoint yet"),
    ([], "missing", "does not exist"),
    ([], "afile", "is a file, not a training workdir"),
    ([], "base", "holds no config.json"),
    ([], "run", "was trained on task 'mqar', not text"),
])
def test_generate_bad_input_is_one_named_line(dirs, extra, workdir, want):
  before = _hashes(dirs["base"])
  workdir = dirs.get(workdir, dirs["base"] / workdir)
  code, out, err = _call(generate_cli.cli_main, _gen(workdir, *extra))
  _assert_named(code, out, err)
  assert want in _last_line(err), _last_line(err)
  assert _hashes(dirs["base"]) == before


def test_library_checks_sampling_arguments():
  logits = np.zeros((1, 8), np.float32)
  import jax  # pylint: disable=import-outside-toplevel
  for kw, arg in (({"temperature": -0.5}, "temperature"), ({"top_k": 9}, "top_k"),
                  ({"top_p": 0.0}, "top_p")):
    with pytest.raises(generate.GenerateError) as e:
      generate.sample_logits(logits, jax.random.key(0), **kw)
    assert e.value.argument == arg


def test_missing_manifest_loads_with_one_warning(tmp_path, caplog):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ck = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ck.save(1, {"w": jnp.arange(3.0)})
  ck.wait()
  os.remove(os.path.join(ck.step_dir(1), checkpoint.MANIFEST))
  with caplog.at_level(logging.WARNING):
    assert ck.check(1) is None and ck.check(1) is None
  ck.close()
  warned = [r.getMessage() for r in caplog.records if checkpoint.MANIFEST in r.getMessage()]
  assert len(warned) == 1 and "loading it unverified" in warned[0], warned
  assert "\n" not in warned[0]


# ----------------------------------------------------------------------------- property

_FIELDS = sorted(provenance.flatten(mqar.get_config("attention").to_dict()))
_ident = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_junk = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                max_size=12)


def _misspelt(field, draw):
  *head, last = field.split(".")
  i = draw(st.integers(0, len(last)))
  c = draw(st.sampled_from("abcxyz_0"))
  mode = draw(st.sampled_from(["insert", "delete", "replace", "suffix"]))
  new = {"insert": last[:i] + c + last[i:], "delete": last[:i] + last[i + 1:],
         "replace": last[:i] + c + last[i + 1:], "suffix": last + "_x"}[mode]
  return ".".join([*head, new])


# config field -> values outside what validation allows (each alone makes the run invalid)
_OUT_OF_RANGE = {
    "train.steps": st.integers(-10**6, 0), "train.lr": st.sampled_from(["0.0", "-1.0", "11.0"]),
    "data.batch_size": st.integers(-100, 0), "model.d_model": st.integers(-100, 0),
    "train.warmup_steps": st.integers(3, 10**6),  # > train.steps = 2
    "eval.num_examples": st.integers(-5, 0), "train.log_every": st.integers(-5, 0),
    "mesh.tensor": st.sampled_from([3, 4, 8]),  # > the 2 attention heads
    "train.b1": st.sampled_from(["1.0", "-0.1", "2.5"]),
    "model.pattern": _ident.filter(lambda s: s not in registry.names()),
    "train.nan_policy": _ident.filter(lambda s: s not in ("stop", "skip")),
    "model.dtype": _ident.filter(lambda s: s not in config_lib.DTYPES),
    "model.mixers.attention.num_heads": st.sampled_from([0, -1, 3, 5]),
}


@st.composite
def bad_train_argv(draw, workdir, afile):
  """A tiny valid train command line with 1 to 3 mistakes, each enough to make it bad."""
  config, over, wd = "--config=configs/mqar.py:attention", list(TINY), f"--workdir={workdir}"
  extra: list[str] = []
  for _ in range(draw(st.integers(1, 3), label="mistakes")):
    kind = draw(st.sampled_from([
        "misspelt", "unknown_section", "mixer_not_in_pattern", "unknown_mixer", "type",
        "range", "config_file", "config_arg", "workdir", "unknown_flag", "positional",
        "drop_workdir", "drop_config"]), label="kind")
    if kind == "misspelt":
      bad = _misspelt(draw(st.sampled_from(_FIELDS)), draw)
      if bad not in _FIELDS:
        extra.append(f"--config.{bad}=1")
      else:
        extra.append("--config.train.learning_rate=1")
    elif kind == "unknown_section":
      extra.append(f"--config.{draw(_ident)}x.{draw(_ident)}=1")
    elif kind == "mixer_not_in_pattern":
      name = draw(st.sampled_from([n for n in registry.names() if n != "attention"]))
      field = draw(st.sampled_from(sorted(registry.config_fields(name))))
      extra.append(f"--config.model.mixers.{name}.{field}=2")
    elif kind == "unknown_mixer":
      name = draw(_ident.filter(lambda s: s not in registry.names()))
      extra.append(f"--config.model.mixers.{name}.num_heads=2")
    elif kind == "type":
      field = draw(st.sampled_from(["train.steps", "data.batch_size", "model.d_model",
                                    "train.lr", "model.remat"]))
      value = draw(st.sampled_from(["abc", "1.5.1", "", "[1]", "None", "0x"]))
      extra.append(f"--config.{field}={value}")
    elif kind == "range":
      field = draw(st.sampled_from(sorted(_OUT_OF_RANGE)))
      extra.append(f"--config.{field}={draw(_OUT_OF_RANGE[field])}")
    elif kind == "config_file":
      config = f"--config={draw(st.sampled_from(['configs/', 'nope/']))}{draw(_ident)}_zz.py"
    elif kind == "config_arg":
      pattern = draw(_ident.filter(lambda s: s not in registry.names()))
      config = f"--config=configs/mqar.py:{pattern}"
    elif kind == "workdir":
      wd = f"--workdir={draw(st.sampled_from(['', str(afile), '/proc', '/proc/x/y']))}"
    elif kind == "unknown_flag":
      extra.append(f"--{draw(_ident)}_zz={draw(_junk)}")
    elif kind == "positional":
      extra.append(draw(_junk.filter(lambda s: s and not s.startswith("-"))))
    elif kind == "drop_workdir":
      wd = None
    else:
      config = None
  argv = ["experiments.train"] + ([config] if config else []) + over + extra
  return argv + ([wd] if wd else [])


@st.composite
def bad_generate_argv(draw, text_run, others):
  """A generate command line on a text workdir (no checkpoint yet) with 0 to 3 bad flags
  (with none, the missing checkpoint is the mistake)."""
  args = {"--workdir": str(text_run), "--max_new_tokens": "2"}
  for _ in range(draw(st.integers(0, 3), label="mistakes")):
    kind = draw(st.sampled_from(["temperature", "top_k", "top_p", "prompt", "prefill_chunk",
                                 "max_new_tokens", "workdir", "type", "unknown_flag"]))
    if kind == "temperature":
      args["--temperature"] = draw(st.sampled_from(["-1", "-0.001", "nan", "inf", "-inf"]))
    elif kind == "top_k":
      args["--top_k"] = str(draw(st.one_of(st.integers(-10**6, -1), st.integers(257, 10**9))))
    elif kind == "top_p":
      args["--top_p"] = draw(st.sampled_from(["0", "-0.5", "1.0001", "7", "nan"]))
    elif kind == "prompt":
      args["--prompt"] = draw(st.sampled_from(["", "\udcff", "abc\udcfe\udc80", "\udc00x"]))
    elif kind in ("prefill_chunk", "max_new_tokens"):
      args[f"--{kind}"] = str(draw(st.integers(-10**6, 0)))
    elif kind == "workdir":
      args["--workdir"] = draw(st.sampled_from(others))
    elif kind == "type":
      flag = draw(st.sampled_from(["--top_k", "--top_p", "--max_new_tokens", "--temperature"]))
      args[flag] = draw(st.sampled_from(["abc", "", "1,5", "one"]))
    else:
      args[f"--{draw(_ident)}_zz"] = draw(_junk)
  return ["experiments.generate"] + [f"{k}={v}" for k, v in args.items()]


_PROPERTY = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_property_train_bad_command_lines(dirs):
  before = _hashes(dirs["base"])

  @_PROPERTY
  @given(bad_train_argv(dirs["run"], dirs["afile"]))
  def check(argv):
    code, out, err = _call(train_cli.cli_main, argv)
    _assert_named(code, out, err)
    assert len(_last_line(err)) < 2000
  check()
  assert _hashes(dirs["base"]) == before


def test_property_generate_bad_command_lines(dirs):
  before = _hashes(dirs["base"])
  others = ["", str(dirs["afile"]), str(dirs["base"]), str(dirs["run"]), "/proc/x",
            str(dirs["base"] / "missing")]

  @_PROPERTY
  @given(bad_generate_argv(dirs["text_run"], others))
  def check(argv):
    code, out, err = _call(generate_cli.cli_main, argv)
    _assert_named(code, out, err)
  check()
  assert _hashes(dirs["base"]) == before


# ----------------------------------------------------------------------------- subprocess


@pytest.mark.parametrize("argv, want", [
    (["-m", "experiments.train", "--config=configs/mqar.py:attention",
      "--config.train.learning_rate=1e-3", "--workdir={run}"], "--config.train.lr"),
    (["-m", "experiments.train", "--config=configs/mqar.py:attention",
      "--config.model.mixers.gla.num_heads=2", "--workdir={run}"], "not in model.pattern"),
    (["-m", "experiments.train", "--config=configs/nope.py:attention", "--workdir={run}"],
     "does not exist"),
    (["-m", "experiments.train", "--config=configs/mqar.py:attention", "--workdir=/proc"],
     "/proc/.lock"),
    (["-m", "experiments.generate", "--workdir={text_run}", "--temperature=-1"],
     "--temperature"),
    (["-m", "experiments.generate", "--workdir={text_run}"], "has no checkpoint yet"),
], ids=["misspelt-field", "mixer-not-in-pattern", "no-config-file", "workdir-in-proc",
        "negative-temperature", "no-checkpoint"])
def test_command_line(dirs, argv, want):
  before = _hashes(dirs["base"])
  argv = [a.format(run=dirs["run"], text_run=dirs["text_run"]) for a in argv]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  _assert_named(p.returncode, p.stdout, p.stderr)
  assert want in _last_line(p.stderr), p.stderr[-2000:]
  assert _hashes(dirs["base"]) == before
