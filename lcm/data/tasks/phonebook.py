"""Phonebook lookup: retrieve a multi-token number given a multi-token name.

Reference: Jelassi, Brandfonbrener, Kakade & Malach 2024, "Repeat after me: Transformers are
better than state space models at copying" (Section 4: the phone-book task -- a list of
(name, phone number) entries, then a name, and the model must produce that person's
number). This is lcm's own token-level version, a pure function of ``(seed, index)`` like
every lcm task.

Vocabulary (``V``, at least ``15``; names must be able to be distinct, see ``validate``):
``0`` = padding, ``1`` = ``ENTRY`` (an entry follows), ``2`` = ``QUERY``, ``3..12`` = the
ten digits, ``13..V-1`` = name tokens.

Layout of one example of length ``T`` with ``E = num_entries`` entries, names of
``N = name_len`` tokens and numbers of ``D = number_len`` digits, built as ``full`` of
length ``T + 1``; ``inputs = full[:-1]``, ``targets = full[1:]``:

* left padding: ``T - (E * (1 + N + D) + N + D)`` tokens ``0``;
* ``E`` entries ``[ENTRY, n_1..n_N, d_1..d_D]``: the ``E`` names are distinct token
  strings (tokens uniform from ``13..V-1``), the numbers uniform digit strings;
* the question ``[QUERY, n_1..n_N, d_1..d_D]`` for a uniform entry (``d_D`` is ``full[T]``,
  a target only).

The last ``D`` inputs are ``[n_N, d_1, .., d_{D-1}]`` and their targets ``d_1 .. d_D``
(teacher forcing), ``loss_mask`` 1 there and 0 elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from layers.common import ConfigError
from lcm.data.tasks.passkey import is_int, check_seed_and_index

__all__ = ["PhonebookConfig", "phonebook_example", "phonebook_oracle", "PAD", "ENTRY",
           "QUERY", "DIGIT0", "NAME0"]

PAD, ENTRY, QUERY, DIGIT0, NAME0 = 0, 1, 2, 3, 13
_MIN_VOCAB = NAME0 + 2
_MAX_TRIES = 1000


@dataclasses.dataclass(frozen=True)
class PhonebookConfig:
  """Hyper-parameters of the phonebook task.

  num_entries: E (name, number) entries. name_len / number_len: tokens per name / digits
  per number.
  """

  vocab_size: int = 64
  seq_len: int = 64
  num_entries: int = 8
  name_len: int = 2
  number_len: int = 4

  def validate(self, prefix: str = "data") -> "PhonebookConfig":
    _validate(self.vocab_size, self.seq_len, self.num_entries, self.name_len,
             self.number_len, prefix)
    return self


def _validate(vocab_size, seq_len, num_entries, name_len, number_len, prefix="") -> None:
  f = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
  for name, x in (("num_entries", num_entries), ("name_len", name_len),
                  ("number_len", number_len)):
    if not is_int(x) or x < 1:
      raise ConfigError(f(name), f"must be an integer >= 1, got {x!r}")
  e, n, d = int(num_entries), int(name_len), int(number_len)
  if not is_int(vocab_size) or vocab_size < _MIN_VOCAB:
    raise ConfigError(f("vocab_size"), f"must be an integer >= {_MIN_VOCAB} (2 markers, 10 "
                      f"digits and >= 2 name tokens), got {vocab_size!r}")
  names = (int(vocab_size) - NAME0) ** min(n, 64)  # >= 2**64 names is plenty
  if names < 2 * e:
    raise ConfigError(f("vocab_size"), f"{vocab_size} gives {int(vocab_size) - NAME0} name "
                      f"tokens, so only {names} distinct names of name_len={n}; need >= "
                      f"2*num_entries = {2 * e}: use a larger vocabulary or longer names")
  min_len = e * (1 + n + d) + n + d
  if not is_int(seq_len) or seq_len < min_len:
    raise ConfigError(f("seq_len"), f"must be an integer >= num_entries * (1 + name_len + "
                      f"number_len) + name_len + number_len = {min_len}, got {seq_len!r}")


# Example functions re-check their (hashable) arguments on every call: cache it.
_checked = functools.lru_cache(maxsize=64)(_validate)


def phonebook_example(index: int, *, seed: int, vocab_size: int, seq_len: int,
                      num_entries: int = 8, name_len: int = 2,
                      number_len: int = 4) -> dict[str, np.ndarray]:
  """Example ``index`` of the phonebook stream ``seed``; a pure function of its arguments.

  Returns ``inputs`` int32[T], ``targets`` int32[T] and ``loss_mask`` float32[T] (1 at the
  last ``number_len`` positions). See the module docstring for the layout.
  """
  _checked(vocab_size, seq_len, num_entries, name_len, number_len)
  check_seed_and_index(seed, index)
  v, t, e, n, d = (int(vocab_size), int(seq_len), int(num_entries), int(name_len),
                   int(number_len))
  rng = np.random.default_rng([int(seed), int(index)])
  names = rng.integers(NAME0, v, size=(e, n))
  for _ in range(_MAX_TRIES):  # redraw repeated names until all E are distinct
    _, first = np.unique(names, axis=0, return_index=True)
    if first.size == e:
      break
    dup = np.setdiff1d(np.arange(e), first)
    names[dup] = rng.integers(NAME0, v, size=(dup.size, n))
  else:  # unreachable for configs that pass validation
    raise RuntimeError(f"no {e} distinct names after {_MAX_TRIES} draws")
  numbers = rng.integers(DIGIT0, DIGIT0 + 10, size=(e, d))
  q = int(rng.integers(0, e))
  book = np.concatenate([np.full((e, 1), ENTRY), names, numbers], axis=1)
  pad = t - (e * (1 + n + d) + n + d)
  full = np.concatenate([np.full(pad, PAD, np.int64), book.ravel(), [QUERY], names[q],
                         numbers[q]])
  loss_mask = np.zeros(t, np.float32)
  loss_mask[t - d:] = 1.0
  return {"inputs": full[:-1].astype(np.int32), "targets": full[1:].astype(np.int32),
          "loss_mask": loss_mask}


def phonebook_oracle(inputs: np.ndarray, name_len: int, number_len: int) -> np.ndarray:
  """The answer by construction: int[..., T] -> int[..., D], the number of the entry whose
  name the question asks (read from the inputs only)."""
  inputs = np.asarray(inputs)
  if inputs.ndim > 1:
    return np.stack([phonebook_oracle(x, name_len, number_len) for x in inputs])
  t, n, d = inputs.shape[0], int(name_len), int(number_len)
  book = {}
  for p in np.flatnonzero(inputs == ENTRY):
    book[tuple(inputs[p + 1:p + 1 + n].tolist())] = inputs[p + 1 + n:p + 1 + n + d]
  q = t - n - d  # the QUERY position
  return np.asarray(book[tuple(inputs[q + 1:q + 1 + n].tolist())], np.int64)
