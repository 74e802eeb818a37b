"""Text pipeline: reading and skipping bad files, packing, splits, resumable order."""

import os

import numpy as np
import pytest

from configs import lm
from layers.common import ConfigError
from lcm import config as config_lib
from lcm.data import pipeline, text


def _corpus_dir(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  for i in range(12):
    (d / f"doc{i}.txt").write_text(f"document number {i}\n" + "abc " * (i + 3))
  (d / "binary.txt").write_bytes(b"\x00\x01\x02binary")
  (d / "empty.txt").write_text("   \n")
  (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  os.symlink(d / "missing-target", d / "broken.txt")
  return d


def _cfg(path, **kw):
  return text.TextConfig(**{"path": str(path), "pattern": "*.txt", "seq_len": 16,
                            "validation_fraction": 0.3, **kw})


def test_bad_files_are_skipped_and_counted(tmp_path):
  d = _corpus_dir(tmp_path)
  cfg = _cfg(d)
  tr, va = text.load_corpus(cfg, "train"), text.load_corpus(cfg, "validation")
  skipped = {k: tr.skipped.get(k, 0) + va.skipped.get(k, 0) for k in
             ("binary", "empty", "not_utf8", "unreadable")}
  assert skipped == {"binary": 1, "empty": 1, "not_utf8": 1, "unreadable": 1}
  assert tr.num_documents + va.num_documents == 12
  assert tr.num_documents > 0 and va.num_documents > 0


def test_stream_is_the_documents_and_rows_pack_them(tmp_path):
  d = _corpus_dir(tmp_path)
  cfg = _cfg(d)
  c = text.load_corpus(cfg, "train")
  names = sorted(f for f in os.listdir(d) if f.startswith("doc")
                 and text.split_of(f, cfg.validation_fraction) == "train")
  expected = "".join((d / f).read_text() for f in names).encode()
  assert bytes(c.tokens.astype(np.uint8)) == expected
  assert c.num_rows == (len(expected) - 1) // 16
  for r in range(c.num_rows):
    row = c.row(r)
    flat = slice(r * 16, r * 16 + 17)
    np.testing.assert_array_equal(row["inputs"], c.tokens[flat][:-1])
    np.testing.assert_array_equal(row["targets"], c.tokens[flat][1:])
    # no prediction across a document boundary, and every other position is trained
    np.testing.assert_array_equal(row["loss_mask"], c.doc_ids[flat][:-1] == c.doc_ids[flat][1:])
  assert 0 < sum(c.row(r)["loss_mask"].sum() for r in range(c.num_rows)) < c.num_rows * 16


def test_split_is_stable_and_disjoint(tmp_path):
  assert text.split_of("a/b.py", 0.5) == text.split_of("a/b.py", 0.5)
  fractions = [text.split_of(f"f{i}.py", 0.2) == "validation" for i in range(2000)]
  assert 0.15 < np.mean(fractions) < 0.25
  d = _corpus_dir(tmp_path)
  tr, va = text.load_corpus(_cfg(d), "train"), text.load_corpus(_cfg(d), "validation")
  for i in range(12):  # every document is in exactly one split
    needle = f"document number {i}\n".encode()
    assert (needle in bytes(tr.tokens)) != (needle in bytes(va.tokens)), i


def test_empty_or_missing_corpus_is_a_clear_error(tmp_path):
  with pytest.raises(ConfigError) as e:
    text.load_corpus(_cfg(tmp_path / "nothing-here"), "train")
  assert e.value.field == "data.path"
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "a.txt").write_bytes(b"\x00\x00")
  with pytest.raises(ConfigError, match="1 binary") as e:
    text.load_corpus(_cfg(tmp_path / "bin", validation_fraction=0.01), "train")
  assert e.value.field == "data.path"


def test_training_order_resumes_and_reshuffles_per_epoch(tmp_path):
  d = _corpus_dir(tmp_path)
  c = lm.get_config("attention")
  c.data.path, c.data.pattern, c.data.seq_len = str(d), "*.txt", 16
  c.data.validation_fraction = 0.3
  n = text.load_corpus(pipeline.text_config(c.data), "train").num_rows
  fn = pipeline.task_example_fn(c.data)
  epoch0 = [fn(0, i)["inputs"].tobytes() for i in range(n)]
  epoch1 = [fn(0, n + i)["inputs"].tobytes() for i in range(n)]
  assert sorted(epoch0) == sorted(epoch1)  # every row once per epoch
  assert epoch0 != epoch1 or n < 3  # in a new order
  it = pipeline.train_iterator(c.data, seed=0, global_batch_size=2)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it)["inputs"] for _ in range(2)]
  it2 = pipeline.train_iterator(c.data, seed=0, global_batch_size=2)
  it2.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(it2)["inputs"], w)


def test_lm_config_validation(tmp_path):
  d = _corpus_dir(tmp_path)
  c = lm.get_config("attention")
  c.data.path, c.data.pattern, c.data.seq_len = str(d), "*.txt", 16
  c.data.validation_fraction, c.eval.num_examples, c.eval.batch_size = 0.3, 2, 2
  config_lib.validate(c, num_devices=1)
  for field, value in [("vocab_size", 100), ("tokenizer", "wordpiece"),
                       ("validation_fraction", 1.5), ("path", str(tmp_path / "none"))]:
    bad = lm.get_config("attention")
    bad.data.path, bad.data.pattern, bad.data.seq_len = str(d), "*.txt", 16
    bad.data.validation_fraction, bad.eval.num_examples, bad.eval.batch_size = 0.3, 2, 2
    bad.data[field] = value
    with pytest.raises(ConfigError) as e:
      config_lib.validate(bad, num_devices=1)
    assert e.value.field == ("data.path" if field == "path" else f"data.{field}")
  c.eval.num_examples = 10_000
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=1)
  assert e.value.field == "eval.num_examples"


def test_bits_per_byte():
  c = text.Corpus(tokens=np.zeros(101, np.uint8), doc_ids=np.zeros(101, np.int32),
                  num_documents=1, num_bytes=202, skipped={}, seq_len=10, vocab_size=256)
  assert text.bits_per_byte(np.log(2) * 4, c) == pytest.approx(2.0)  # 4 bits/token, 2 B/token


def test_stdlib_default_corpus_loads():
  cfg = text.TextConfig(max_files=20, seq_len=64)
  tr, va = text.load_corpus(cfg, "train"), text.load_corpus(cfg, "validation")
  assert tr.num_documents + sum(tr.skipped.values()) == 20
  assert va.num_documents + sum(va.skipped.values()) == 20
  assert tr.num_rows > 10 and va.num_rows > 10 and tr.vocab_size == 256
  assert b"def " in bytes(tr.tokens)  # it is Python source


def test_one_file_or_few_files_split_by_a_held_out_tail(tmp_path):
  """One file (or files whose split by path leaves a split without a row) is split by a
  held-out tail of the whole stream: validation = the last max(ceil(0.3 x N), T + 1)
  tokens, train = the rest, together the whole text in path order; too little text for
  one row each is a one-line error naming data.seq_len."""
  one = tmp_path / "one.txt"
  one.write_text("x" * 60 + "y" * 40)
  tr, va = text.load_corpus(_cfg(one), "train"), text.load_corpus(_cfg(one), "validation")
  assert (tr.split_mode, va.split_mode) == ("tail", "tail")
  assert bytes(va.tokens) == b"y" * 30 and bytes(tr.tokens) == b"x" * 60 + b"y" * 10
  assert tr.num_rows == 4 and va.num_rows == 1 and tr.num_bytes + va.num_bytes == 100
  assert "held-out tail" in va.describe("validation") and "30 tokens" in va.describe("validation")
  d = _corpus_dir(tmp_path)  # 12 short documents and bad files: split by file still
  assert text.load_corpus(_cfg(d, seq_len=16), "train").split_mode == "files"
  # seq_len 300: the validation files do not hold a row, so the tail; bad files are named.
  tr = text.load_corpus(_cfg(d, seq_len=300), "train")
  va = text.load_corpus(_cfg(d, seq_len=300), "validation")
  assert tr.split_mode == "tail" and va.num_rows == 1
  assert tr.num_documents + va.num_documents == 13  # the document at the cut is in both
  described = tr.describe("train") + va.describe("validation")
  assert "binary.txt (binary)" in described and "latin1.txt (not_utf8)" in described
  small = tmp_path / "small.txt"
  small.write_text("z" * 30)
  with pytest.raises(ConfigError) as e:
    text.load_corpus(_cfg(small), "train")
  assert e.value.field == "data.seq_len" and "30 tokens" in str(e.value)
  assert len(str(e.value).splitlines()) == 1


def test_a_one_file_corpus_trains_from_the_command_line(tmp_path):
  """``experiments.train`` on a single text file (before: "no usable validation documents")
  trains, and says how the corpus was split (in-process ``cli_main``: the real argument
  parsing, validation and training loop)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from experiments import train as train_cli  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / "book.txt"
  corpus.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(200)))
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = train_cli.cli_main([
        "experiments.train", "--config=configs/lm.py:attention", f"--workdir={tmp_path / 'run'}",
        f"--config.data.path={corpus}", "--config.data.seq_len=32",
        "--config.data.batch_size=8", "--config.model.d_model=16",
        "--config.model.num_layers=1", "--config.train.steps=2",
        "--config.train.warmup_steps=1", "--config.eval.num_examples=8",
        "--config.eval.batch_size=8", "--config.train.progress=False"])
  text_out = out.getvalue() + err.getvalue()
  assert code == 0, text_out[-2000:]
  assert "validation: 1 documents" in text_out and "held-out tail" in text_out
  assert (tmp_path / "run" / "summary.json").exists()
