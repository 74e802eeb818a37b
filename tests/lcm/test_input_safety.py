"""Reliability of the inputs (issue 11, continued from test_reliability.py): text-corpus
faults are skipped and counted, bf16 numerics at length (one mixer per kernel family at
T = 4096), and no module executes code from loaded data."""

from __future__ import annotations

import ast
import os
import pathlib

import pytest

from layers.common import ConfigError
from lcm.data import text

ROOT = pathlib.Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- data faults


def _cfg(path, **kw):
  return text.TextConfig(**{"path": str(path), "pattern": "*.txt", "seq_len": 8,
                            "validation_fraction": 0.01, **kw})


def test_truncated_utf8_and_special_files_are_skipped_and_counted(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  (d / "good.txt").write_text("a perfectly good document " * 4)
  (d / "truncated.txt").write_bytes("naïve café ".encode() * 3 + "€".encode()[:2])
  (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8, not truncated
  os.mkfifo(d / "fifo.txt")  # opening a FIFO would block forever: never opened
  (d / "adir.txt").mkdir()  # a directory matching the pattern is not a document
  cfg = _cfg(d)
  c = text.load_corpus(cfg, "train")
  assert c.num_documents == 1
  assert c.skipped == {"truncated": 1, "not_utf8": 1, "unreadable": 1}


def test_corrupt_array_record_file_is_skipped_and_counted(tmp_path):
  pytest.importorskip("array_record")
  (tmp_path / "bad.array_record").write_bytes(b"\x00garbage, not an ArrayRecord file" * 4)
  (tmp_path / "good.txt").write_text("some text " * 10)
  cfg = _cfg(tmp_path / "*", pattern="*")
  c = text.load_corpus(cfg, "train")
  assert c.num_documents == 1 and c.skipped == {"unreadable": 1}


def test_nothing_usable_is_an_error_that_names_every_reason(tmp_path):
  d = tmp_path / "bad"
  d.mkdir()
  (d / "empty.txt").write_text("")
  (d / "bin.txt").write_bytes(b"\x00\x01")
  (d / "cut.txt").write_bytes("é".encode() * 4 + "€".encode()[:1])
  os.symlink(d / "nowhere", d / "dangling.txt")  # "broken.txt" hashes to validation
  with pytest.raises(ConfigError) as e:
    text.load_corpus(_cfg(d), "train")
  assert e.value.field == "data.path"
  for reason in ("1 empty", "1 binary", "1 truncated", "1 unreadable"):
    assert reason in str(e.value), str(e.value)


def test_too_little_text_for_one_row_is_an_error(tmp_path):
  (tmp_path / "tiny.txt").write_text("abc")
  with pytest.raises(ConfigError) as e:
    text.load_corpus(_cfg(tmp_path, seq_len=64), "train")
  assert e.value.field == "data.seq_len"


def test_directory_only_glob_is_an_error(tmp_path):
  (tmp_path / "sub.txt").mkdir()
  with pytest.raises(ConfigError) as e:
    text.load_corpus(_cfg(tmp_path / "*.txt"), "train")
  assert e.value.field == "data.path" and "no files match" in str(e.value)


# ----------------------------------------------------------------------------- numerics


FAMILIES = ["mamba", "mamba2", "gated_deltanet"]  # one mixer per kernel: diag_scan,
# chunked_scan, delta_rule; experiments/numerics.py runs every recurrent mixer at 65,536.


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_matches_fp32_over_4096_tokens(name):
  from experiments import numerics  # pylint: disable=g-import-not-at-top
  r = numerics.compare(name, T=4096, d_model=32, window=512, step_chunk=4096, tol=5e-2,
                       stress_scale=0.0, with_step=False)
  assert r["finite"], r
  assert r["rel_err"] < 5e-2, r
  assert r["rel_err_last"] < 2 * r["rel_err_first"] + 1e-2, r  # no drift with length


# ----------------------------------------------------------------------------- inputs


UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _unsafe_uses(path):
  tree = ast.parse(path.read_text(), filename=str(path))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
      out.append(f"from {node.module} import")
    elif isinstance(node, ast.Call):
      f = node.func
      name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
      if name in UNSAFE_CALLS and isinstance(f, ast.Name):
        out.append(f"{name}()")
      for kw in node.keywords:
        if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant)
                                             and kw.value.value is False):
          out.append(f"{name}(allow_pickle=...)")
      if name == "load" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") in (
          "yaml", "torch") and not any(
              k.arg in ("Loader", "weights_only") for k in node.keywords):
        out.append(f"{f.value.id}.load()")
  return [f"{path}:{o}" for o in out]


def test_no_module_executes_code_from_loaded_data():
  """Checkpoints (Orbax: TensorStore + JSON), iterator state (JSON), manifests (JSON) and
  corpora (bytes) are data only: no pickle-family module, no eval/exec, no np.load with
  allow_pickle, anywhere in lcm/, layers/ or kernels/. (Config files are Python by design:
  ``--config`` runs the file it names, like any Python script; see README.)"""
  files = [p for d in ("lcm", "layers", "kernels") for p in (ROOT / d).rglob("*.py")]
  assert len(files) > 20
  found = [u for p in files for u in _unsafe_uses(p)]
  assert not found, found


def test_unsafe_use_detector_catches_examples(tmp_path):
  p = tmp_path / "probe.py"
  p.write_text("import pickle\nfrom dill import loads\nx = eval('1')\n"
               "import numpy as np\nnp.load('f.npy', allow_pickle=True)\nimport yaml\n"
               "yaml.load(open('c.yaml'))\n")
  assert len(_unsafe_uses(p)) == 5, _unsafe_uses(p)
