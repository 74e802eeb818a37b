"""Text corpora: read local files, tokenise, pack documents into fixed-length rows.

A corpus is a directory (every file matching ``pattern`` below it), a glob, a single
file, ArrayRecord files (one document per record), or ``"stdlib"``: the source files of
the running Python's standard library (``sysconfig.get_paths()["stdlib"]``), which needs
no download. Files are split into train / validation by a stable hash of their path
relative to the corpus root, so the split is the same on every machine. When that leaves a
split without one full row (one file, or a handful), the corpus is split by a *held-out
tail* instead: all documents in path order form one stream, its last
``max(ceil(validation_fraction x tokens), seq_len + 1)`` tokens are the validation split
and the rest the training split (``Corpus.split_mode``; ``Corpus.describe()`` reports the
sizes, the mode and the skipped files by name).

Packing: the documents of a split are concatenated into one token stream with a parallel
document-id stream; row ``r`` covers stream positions ``[r*T, r*T + T]`` (``T + 1`` tokens:
inputs and next-token targets). ``segment_ids`` are the document ids of the inputs, so
mixers restart positions and state at every document start, and ``loss_mask`` is 0 where
the target belongs to the next document (no prediction across a boundary).

Training rows are visited in a fresh random order every epoch
(``np.random.default_rng([seed, epoch]).permutation``), a pure function of
``(seed, index)``, so a training iterator resumes exactly.

Bad inputs never crash deep inside grain: unreadable (broken links, no permission, not a
regular file: FIFOs and devices are never opened, they could block or never end), empty,
binary (NUL bytes), truncated (valid UTF-8 cut inside its last character) or otherwise
non-UTF-8 files are skipped and counted by reason (``Corpus.skipped``; the trainer prints
the counts and puts them in ``summary.json``); a split with no usable document raises
``ConfigError("data.path", ...)``, so a run never trains on nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import glob as glob_lib
import hashlib
import math
import os
import stat
import sysconfig
from typing import Callable

import numpy as np

from layers.common import ConfigError

TOKENIZERS = ("byte", "sentencepiece", "tiktoken")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  path: str = "stdlib"  # "stdlib", a directory, a glob, a file, or *.array_record files
  pattern: str = "**/*.py"  # files matched under a directory
  tokenizer: str = "byte"  # byte | sentencepiece | tiktoken
  tokenizer_model: str = ""  # SentencePiece model file / tiktoken encoding name
  validation_fraction: float = 0.05
  max_files: int = 0  # files per split, 0 = all; a cap keeps tests and CPU runs small
  seq_len: int = 256

  def validate(self, prefix: str = "data") -> "TextConfig":
    f = lambda n: f"{prefix}.{n}"
    if self.tokenizer not in TOKENIZERS:
      raise ConfigError(f("tokenizer"), f"must be one of {', '.join(TOKENIZERS)} "
                        f"(got {self.tokenizer!r})")
    if self.tokenizer != "byte" and not self.tokenizer_model:
      raise ConfigError(f("tokenizer_model"), f"is required for tokenizer "
                        f"{self.tokenizer!r} (a model file or encoding name)")
    vf = self.validation_fraction
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 < vf < 1.0:
      raise ConfigError(f("validation_fraction"),
                        f"must be in (0, 1) (got {self.validation_fraction!r})")
    if not isinstance(self.max_files, int) or self.max_files < 0:
      raise ConfigError(f("max_files"), f"must be an integer >= 0 (got {self.max_files!r})")
    if not isinstance(self.seq_len, int) or self.seq_len < 2:
      raise ConfigError(f("seq_len"), f"must be an integer >= 2 (got {self.seq_len!r})")
    if not isinstance(self.path, str) or not self.path:
      raise ConfigError(f("path"), "must name 'stdlib', a directory, a glob or files")
    if not isinstance(self.pattern, str) or not self.pattern:
      raise ConfigError(f("pattern"), f"must be a glob such as '**/*.py' (got {self.pattern!r})")
    if not isinstance(self.tokenizer_model, str):
      raise ConfigError(f("tokenizer_model"), f"must be a string (got {self.tokenizer_model!r})")
    return self


# ----------------------------------------------------------------------------- tokenisers


class ByteTokenizer:
  """UTF-8 bytes; vocab 256; no special tokens (documents are delimited by segment ids)."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


class _SentencePiece:
  def __init__(self, model_file: str):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("data.tokenizer", "sentencepiece is not installed: "
                        "pip install sentencepiece, or use tokenizer='byte'") from None
    if not os.path.isfile(model_file):
      raise ConfigError("data.tokenizer_model", f"no SentencePiece model at {model_file!r}")
    self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = int(self._sp.get_piece_size())

  def encode(self, text):
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids):
    return self._sp.decode([int(i) for i in ids])


class _Tiktoken:
  def __init__(self, name: str):
    try:
      import tiktoken  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("data.tokenizer", "tiktoken is not installed: pip install "
                        "tiktoken, or use tokenizer='byte'") from None
    self._enc = tiktoken.get_encoding(name)
    self.vocab_size = int(self._enc.n_vocab)

  def encode(self, text):
    return np.asarray(self._enc.encode_ordinary(text), np.int32)

  def decode(self, ids):
    return self._enc.decode([int(i) for i in ids])


def make_tokenizer(cfg: TextConfig):
  if cfg.tokenizer == "byte":
    return ByteTokenizer()
  if cfg.tokenizer == "sentencepiece":
    return _SentencePiece(cfg.tokenizer_model)
  return _Tiktoken(cfg.tokenizer_model)


# ----------------------------------------------------------------------------- files


def _root_and_files(cfg: TextConfig) -> tuple[str, list[str]]:
  path = cfg.path
  if path == "stdlib":
    root = sysconfig.get_paths()["stdlib"]
    files = [f for f in glob_lib.glob(os.path.join(root, cfg.pattern), recursive=True)
             if "site-packages" not in f and "dist-packages" not in f]
  elif os.path.isdir(path):
    root = path
    files = glob_lib.glob(os.path.join(root, cfg.pattern), recursive=True)
  elif os.path.isfile(path):
    root, files = os.path.dirname(os.path.abspath(path)), [path]
  else:
    files = glob_lib.glob(path, recursive=True)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]) \
        if files else ""
  files = sorted(f for f in files if not os.path.isdir(f))  # broken links: counted later
  if not files:
    raise ConfigError("data.path", f"no files match {path!r}"
                      + (f" with pattern {cfg.pattern!r}" if os.path.isdir(path) else ""))
  return root, files


def split_of(relpath: str, validation_fraction: float) -> str:
  """'train' or 'validation', by a stable hash of the path relative to the corpus root."""
  h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
  return "validation" if h / 2**64 < validation_fraction else "train"


def _read_documents(files: list[str], skipped: dict[str, int],
                    skipped_files: list[tuple[str, str]] | None = None):
  """Yields (path, text) for usable documents; counts what it skips and why (and lists
  ``(path, reason)`` in ``skipped_files`` when given)."""
  def skip(path, why):
    skipped[why] = skipped.get(why, 0) + 1
    if skipped_files is not None:
      skipped_files.append((path, why))

  for f in files:
    if f.endswith(".array_record"):
      try:
        from array_record.python import array_record_data_source as ards  # pylint: disable=g-import-not-at-top
        source = ards.ArrayRecordDataSource([f])
        records = [source[i] for i in range(len(source))]
      except Exception:  # pylint: disable=broad-except
        skip(f, "unreadable")
        continue
      for i, rec in enumerate(records):
        text, why = _decode(rec)
        if why:
          skip(f"{f}#{i}", why)
        else:
          yield f"{f}#{i}", text
      continue
    try:
      if not stat.S_ISREG(os.stat(f).st_mode):  # FIFO / device / socket: never open it
        raise OSError(f"{f} is not a regular file")
      with open(f, "rb") as fh:
        data = fh.read()
    except OSError:
      skip(f, "unreadable")
      continue
    text, why = _decode(data)
    if why:
      skip(f, why)
    else:
      yield f, text


def _decode(data: bytes) -> tuple[str | None, str | None]:
  """(text, None) for a usable document, else (None, why it is skipped)."""
  if not data.strip():
    return None, "empty"
  if b"\x00" in data:
    return None, "binary"
  try:
    return data.decode("utf-8"), None
  except UnicodeDecodeError as e:
    # Valid UTF-8 (with multi-byte characters, so it is UTF-8 text) cut inside its last
    # character: a truncated, partially copied file. "caf\xe9" (Latin-1) is not_utf8.
    truncated = (e.reason == "unexpected end of data" and e.end == len(data)
                 and max(data[:e.start], default=0) >= 0x80)
    return None, "truncated" if truncated else "not_utf8"


# ----------------------------------------------------------------------------- corpus


@dataclasses.dataclass
class Corpus:
  """One split, tokenised and concatenated: ``tokens`` and ``doc_ids`` (same length)."""

  tokens: np.ndarray
  doc_ids: np.ndarray
  num_documents: int
  num_bytes: int
  skipped: dict[str, int]
  seq_len: int
  vocab_size: int
  split_mode: str = "files"  # "files" (by path hash) or "tail" (a held-out tail)
  skipped_files: tuple = ()  # ((path, reason), ...) of this split's skipped files

  def describe(self, split: str) -> str:
    """One line: the split's size, how the corpus was split, and what was skipped."""
    how = ("split by file" if self.split_mode == "files" else
           "a held-out tail of the corpus (too few files to split by file)")
    line = (f"{split}: {self.num_documents} documents, {len(self.tokens):,} tokens, "
            f"{self.num_rows:,} rows of {self.seq_len} ({how})")
    if self.skipped_files:
      names = ", ".join(f"{os.path.basename(p.split('#')[0])} ({why})"
                        for p, why in self.skipped_files[:5])
      more = len(self.skipped_files) - 5
      line += f"; skipped {names}" + (f" and {more} more" if more > 0 else "")
    return line

  @property
  def num_rows(self) -> int:
    return max((len(self.tokens) - 1) // self.seq_len, 0)

  @property
  def bytes_per_token(self) -> float:
    return self.num_bytes / max(len(self.tokens), 1)

  def row(self, r: int) -> dict[str, np.ndarray]:
    t = self.seq_len
    s = slice(r * t, r * t + t + 1)
    tok, doc = self.tokens[s], self.doc_ids[s]
    return {
        "inputs": tok[:-1].astype(np.int32),
        "targets": tok[1:].astype(np.int32),
        "segment_ids": doc[:-1].astype(np.int32),
        "loss_mask": (doc[:-1] == doc[1:]).astype(np.float32),
    }


def load_corpus(cfg: TextConfig, split: str) -> Corpus:
  """Reads, tokenises and packs one split (both splits are built and cached together)."""
  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
  return _load_splits(cfg)[split]


def _tokenised(files, tok, skipped, skipped_files):
  """[(path, tokens, utf-8 bytes)] of the usable, non-empty documents of ``files``."""
  docs = []
  for path, text in _read_documents(files, skipped, skipped_files):
    t = tok.encode(text)
    if len(t):
      docs.append((path, t, len(text.encode("utf-8"))))
  return docs


@functools.lru_cache(maxsize=4)
def _load_splits(cfg: TextConfig) -> dict[str, Corpus]:
  cfg.validate()
  root, files = _root_and_files(cfg)
  by_split = {"train": [], "validation": []}
  for f in files:
    by_split[split_of(os.path.relpath(f, root) if root else f, cfg.validation_fraction)].append(f)
  tok = make_tokenizer(cfg)
  dtype = np.uint8 if tok.vocab_size <= 256 else np.int32
  docs, skipped, named = {}, {}, {}
  for name, fs in by_split.items():
    skipped[name], named[name] = {}, []
    docs[name] = _tokenised(fs[:cfg.max_files] if cfg.max_files else fs, tok, skipped[name],
                            named[name])
  need = cfg.seq_len + 1  # tokens of one row
  size = lambda ds: sum(len(t) for _, t, _ in ds)

  def corpus(tokens, doc_ids, n_docs, n_bytes, name, mode):
    return Corpus(tokens=tokens.astype(dtype), doc_ids=doc_ids, num_documents=n_docs,
                  num_bytes=n_bytes, skipped=skipped[name], seq_len=cfg.seq_len,
                  vocab_size=tok.vocab_size, split_mode=mode,
                  skipped_files=tuple(named[name]))

  if all(size(docs[n]) >= need for n in docs):  # split by file
    out = {}
    for name, ds in docs.items():
      ids = [np.full(len(t), i % 2**31, np.int32) for i, (_, t, _) in enumerate(ds)]
      out[name] = corpus(np.concatenate([t for _, t, _ in ds]), np.concatenate(ids), len(ds),
                         sum(b for _, _, b in ds), name, "files")
    return out
  # Too few files for a split by file: hold out the tail of the whole stream.
  every = sorted(docs["train"] + docs["validation"], key=lambda d: d[0])
  total = size(every)
  if not every:
    why = ", ".join(f"{v} {k}" for k, v in
                    {k: skipped["train"].get(k, 0) + skipped["validation"].get(k, 0)
                     for k in {**skipped["train"], **skipped["validation"]}}.items())
    raise ConfigError("data.path", f"no usable documents in {cfg.path!r} "
                      f"({why or 'no files'})")
  n_val = max(math.ceil(cfg.validation_fraction * total), need)
  if total - n_val < need:
    raise ConfigError("data.seq_len", f"the corpus {cfg.path!r} has {total:,} tokens, fewer "
                      f"than one training and one validation row of seq_len={cfg.seq_len} "
                      f"need (2 x {need:,} = {2 * need:,}); use a smaller seq_len or more text")
  tokens = np.concatenate([t for _, t, _ in every])
  doc_ids = np.concatenate([np.full(len(t), i % 2**31, np.int32)
                            for i, (_, t, _) in enumerate(every)])
  # UTF-8 bytes per token of each document, to split the byte count at the cut.
  per_token = np.concatenate([np.full(len(t), b / len(t)) for _, t, b in every])
  cut = total - n_val
  parts = {"train": slice(0, cut), "validation": slice(cut, total)}
  return {name: corpus(tokens[sl], doc_ids[sl], len(np.unique(doc_ids[sl])),
                       int(round(per_token[sl].sum())), name, "tail")
          for name, sl in parts.items()}


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_example_fn(corpus: Corpus) -> Callable[[int, int], dict[str, np.ndarray]]:
  """(seed, index) -> a packed training row; every epoch visits rows in a new order."""
  n = corpus.num_rows

  def fn(seed: int, index: int):
    epoch, i = divmod(int(index), n)
    return corpus.row(int(_epoch_permutation(int(seed), epoch, n)[i]))
  return fn


def eval_example_fn(corpus: Corpus) -> Callable[[int, int], dict[str, np.ndarray]]:
  """(seed, index) -> validation row ``index`` (in order; the seed is unused)."""
  def fn(seed: int, index: int):
    del seed
    if index >= corpus.num_rows:
      raise IndexError(index)
    return corpus.row(int(index))
  return fn


def bits_per_byte(loss_nats_per_token: float, corpus: Corpus) -> float:
  """Cross-entropy in bits per UTF-8 byte of the text."""
  return loss_nats_per_token / math.log(2) / corpus.bytes_per_token
