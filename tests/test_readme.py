"""The README cannot drift from the code.

* Every ```python block runs as written (in a temporary working directory); a block right
  after ``<!-- readme-test: skip ... -->`` is a sketch and is only required to be there.
* Every ``python -m experiments.X ...`` command (in ```bash blocks, in inline code, and
  inside ``--command="..."`` of a remote launch) parses: the module imports, its absl flags
  accept the arguments (unknown flags, bad values and missing required flags fail), and a
  ``--config`` (with its ``--config.*`` overrides, or a sweep's base config and grid) loads
  and passes ``lcm.config.validate``. Nothing is trained. All in one subprocess: each
  module's flags are removed before the next is imported (they reuse names like --mixers).
* ``make <target>`` lines name real Makefile targets.
* The Layers section names every registered mixer; the Kernels table every kernels/ op.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SKIP = "<!-- readme-test: skip"


def _text() -> str:
  with open(README, encoding="utf-8") as f:
    return f.read()


def code_blocks(text: str, lang: str) -> list[tuple[str, bool]]:
  """(source, skipped) of every fenced block of ``lang``; skipped when the last non-blank
  line before the fence starts with the skip marker."""
  out = []
  for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S):
    before = [ln for ln in text[:m.start()].splitlines() if ln.strip()]
    out.append((m.group(1), bool(before) and before[-1].strip().startswith(SKIP)))
  return out


def _section(text: str, title: str) -> str:
  m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.M | re.S)
  assert m, f"README has no '## {title}' section"
  return m.group(1)


def shell_commands(text: str) -> list[str]:
  """Logical command lines of the bash blocks (continuations joined, comments dropped) and
  the inline code spans that are ``python -m experiments.`` commands."""
  lines = []
  for block, _ in code_blocks(text, "bash"):
    lines += [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
  for span in re.findall(r"`([^`\n]+)`", text.replace("`\n", "` ")):
    if re.match(r"(\.venv/bin/)?python -m experiments\.", span):
      lines.append(span)
  # inline code crossing a line break of the prose
  for span in re.findall(r"`((?:\.venv/bin/)?python -m experiments\.[^`]*\n[^`]*)`", text):
    lines.append(" ".join(span.split()))
  return [ln.replace("\\|", "|") for ln in lines]


def experiment_invocations(line: str) -> list[tuple[str, list[str]]]:
  """(module, argv) for every ``python -m experiments.X args`` in a shell line."""
  tokens = shlex.split(line, comments=True)
  found = []
  for i, tok in enumerate(tokens):
    if tok.startswith("--command="):
      found += experiment_invocations(tok[len("--command="):])
    if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("experiments."):
      args = []
      for a in tokens[i + 2:]:
        if a in ("&&", ";", "|", "||"):
          break
        args.append(a)
      found.append((tokens[i + 1], args))
  return found


def test_readme_python_blocks_run(tmp_path, monkeypatch):
  blocks = code_blocks(_text(), "python")
  runnable = [src for src, skipped in blocks if not skipped]
  assert len(runnable) >= 1 and len(blocks) > len(runnable)  # the snippet and the sketch
  monkeypatch.chdir(tmp_path)  # relative workdirs (runs/...) land in the tmp dir
  # one CPU device, as for a reader (the suite's 8 virtual devices cost ~30% here)
  import jax  # pylint: disable=import-outside-toplevel
  from lcm import train  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(train, "run", functools.partial(train.run, devices=jax.devices()[:1]))
  for src in runnable:
    exec(compile(src, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102
  # the newcomer snippet trained, evaluated and plotted a non-default mixer
  with open(tmp_path / "runs" / "readme_gla" / "summary.json", encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["config"]["model"]["pattern"] == "gla"
  assert summary["steps"] == 20 and 0.0 <= summary["eval_accuracy"] <= 1.0
  assert summary["state_size"] > 0
  assert (tmp_path / "runs" / "readme_gla" / "curves.png").stat().st_size > 1000


_CHECK = r"""
import importlib, json, sys
from absl import flags
from lcm import config as config_lib
FLAGS = flags.FLAGS
failed = False
for module, argvs in json.loads(sys.argv[1]).items():
  # forget the previous module's flags (the experiments reuse names such as --mixers)
  FLAGS.unparse_flags()
  for owner, defined in list(FLAGS.flags_by_module_dict().items()):
    if owner.startswith("experiments."):
      for flag in list(defined):
        if flag.name in FLAGS:
          delattr(FLAGS, flag.name)
  mod = importlib.import_module(module)
  if hasattr(mod, "_define_flags"):  # modules that define flags only when run as programs
    mod._define_flags()
  for argv in argvs:
    FLAGS.unparse_flags()
    for name in [n for n in list(FLAGS) if n.startswith("config.")]:
      delattr(FLAGS, name)  # config_flags defines one flag per override at parse time
    sys.argv = [module] + argv  # config_flags reads the overrides from sys.argv
    try:
      FLAGS(sys.argv)
      if "config" in FLAGS and FLAGS["config"].value is not None:
        config = FLAGS["config"].value
        if isinstance(config, str):  # a sweep: "configs/<family>.py:<arg>" and a grid
          from experiments import sweep
          config = sweep.load_config(config)
          if "grid" in FLAGS and FLAGS["grid"].value:
            for point in sweep.expand_grid(sweep.parse_grid(FLAGS["grid"].value, config)):
              config_lib.validate(sweep.apply_overrides(config, point))
        config_lib.validate(config)
    except Exception as e:
      print(f"FAILED: python -m {module} {' '.join(argv)}\n  {type(e).__name__}: {e}")
      failed = True
  print(f"checked {module}: {len(argvs)} command(s)")
sys.exit(1 if failed else 0)
"""


def _check(commands: dict[str, list[list[str]]]) -> tuple[int, str]:
  """Parses every ``{module: [argv, ...]}`` in one subprocess; (exit code, report)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(commands)], cwd=ROOT,
                     env=env, capture_output=True, text=True, check=False)
  return p.returncode, (p.stdout + p.stderr[-3000:]).strip()


def test_readme_experiment_commands_parse():
  by_module: dict[str, list[list[str]]] = {}
  for line in shell_commands(_text()):
    for module, argv in experiment_invocations(line):
      if argv not in by_module.setdefault(module, []):
        by_module[module].append(argv)
  # the README documents training, generation, the tables and the launch commands
  assert {"experiments.train", "experiments.generate", "experiments.sweep",
          "experiments.needle", "experiments.bench"} <= set(by_module), sorted(by_module)
  assert sum(len(v) for v in by_module.values()) >= 15
  rc, out = _check(by_module)
  assert rc == 0, out
  assert out.count("checked experiments.") == len(by_module), out


def test_readme_command_checker_catches_drift():
  """The checker is not vacuous: a misspelt flag, a bad config value and a missing required
  flag each fail."""
  rc, out = _check({
      "experiments.train": [
          ["--config=configs/mqar.py:gla", "--config.train.steps=200", "--workdir=x"],
          ["--config=configs/mqar.py:gla", "--config.model.d_model=63", "--workdir=x"],
          ["--config=configs/mqar.py:gla"]],
      "experiments.needle": [["--mixers=attention"], ["--mixer=attention"]]})
  assert rc == 1, out
  failures = [ln for ln in out.splitlines() if ln.startswith("FAILED")]
  assert len(failures) == 3, out
  assert "d_model=63" in failures[0] and "d_model" in out.split(failures[0])[1].splitlines()[1]
  assert failures[1].endswith("--config=configs/mqar.py:gla") and "workdir" in out
  assert "--mixer=attention" in failures[2]


def test_readme_make_targets_exist():
  with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", f.read(), flags=re.M))
  used = set()
  for line in shell_commands(_text()):
    tokens = shlex.split(line, comments=True)
    if tokens and tokens[0] == "make":
      used |= {t for t in tokens[1:] if "=" not in t and not t.startswith("-")}
  assert {"train", "test"} <= used
  assert used <= targets, f"README names Makefile targets that do not exist: {used - targets}"


def test_readme_tables_cover_every_mixer_and_kernel():
  from lcm import registry  # pylint: disable=import-outside-toplevel
  text = _text()
  layers = _section(text, "Layers")
  missing = [n for n in registry.names() if not re.search(rf"(?<![\w]){n}(?![\w])", layers)]
  assert not missing, f"README Layers section does not mention: {missing}"
  kernels_section = _section(text, "Kernels")
  ops = sorted(d for d in os.listdir(os.path.join(ROOT, "kernels"))
               if os.path.isfile(os.path.join(ROOT, "kernels", d, "__init__.py")))
  assert ops and all(f"`{op}." in kernels_section for op in ops), ops
  notebooks = _section(text, "Notebooks")
  for name in sorted(os.listdir(os.path.join(ROOT, "notebooks"))):
    if name.endswith(".ipynb"):
      assert f"notebooks/{name}" in notebooks, name


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
