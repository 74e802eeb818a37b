"""Passkey retrieval in a noise haystack (single needle, S-NIAH-1 style).

References: Mohtashami & Jaggi 2023 ("Landmark Attention", the passkey task); Hsieh et al.
2024 (RULER, S-NIAH-1: one needle, a key that must be copied out); Behrouz et al. 2025
(Titans, Table 2: S-NIAH at 2k..16k). This is lcm's own token-level version, a pure
function of ``(seed, index)`` like every lcm task, whose haystack is random tokens so that
a model cannot lean on language statistics.

Vocabulary (``V >= 16``): ``1`` = needle marker, ``2`` = query marker, ``3..12`` = the ten
digits, ``13..V-1`` = haystack tokens (``0`` is never used).

Layout of one example of length ``T`` with a ``K``-digit passkey ``d_1..d_K``:

* haystack: every position not listed below holds a uniform token from ``[13, V)``;
* needle: ``[NEEDLE, d_1, .., d_K]`` (``K + 1`` tokens) starting at position
  ``p = round(depth * (T - 2K - 1))`` (``depth`` in [0, 1]: 0 = at the start, 1 = right
  before the question), with ``depth`` uniform per example when ``needle_depth < 0``;
* question: the last ``K`` inputs are ``[QUERY, d_1, .., d_{K-1}]`` and their targets are
  ``d_1 .. d_K`` (teacher forcing), ``loss_mask`` 1 there and 0 elsewhere (elsewhere the
  target is simply the next token).

An example is *retrieved* when all ``K`` digit predictions are right (for greedy decoding
that is the same event: every step then sees the correct previous digit).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from layers.common import ConfigError

__all__ = ["PasskeyConfig", "passkey_example", "passkey_oracle", "NEEDLE", "QUERY",
           "DIGIT0", "HAYSTACK0"]

NEEDLE, QUERY, DIGIT0, HAYSTACK0 = 1, 2, 3, 13
_MIN_VOCAB = HAYSTACK0 + 3
_MAX_SEED = 2**32


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  """Hyper-parameters of the passkey task.

  passkey_len: K, digits to retrieve. needle_depth: where the needle sits as a fraction of
  the haystack (0 = start, 1 = end); a negative value draws it uniformly per example.
  """

  vocab_size: int = 64
  seq_len: int = 256
  passkey_len: int = 4
  needle_depth: float = -1.0

  def validate(self, prefix: str = "data") -> "PasskeyConfig":
    _checked(self.vocab_size, self.seq_len, self.passkey_len, self.needle_depth, prefix)
    return self


@functools.lru_cache(maxsize=64)
def _checked(vocab_size, seq_len, passkey_len, needle_depth, prefix: str = "") -> None:
  f = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
  if not _is_int(passkey_len) or passkey_len < 1:
    raise ConfigError(f("passkey_len"), f"must be an integer >= 1, got {passkey_len!r}")
  if not _is_int(vocab_size) or vocab_size < _MIN_VOCAB:
    raise ConfigError(f("vocab_size"), f"must be an integer >= {_MIN_VOCAB} (2 markers, 10 "
                      f"digits and >= 3 haystack tokens), got {vocab_size!r}")
  min_len = 2 * int(passkey_len) + 2
  if not _is_int(seq_len) or seq_len < min_len:
    raise ConfigError(f("seq_len"), f"must be an integer >= 2*passkey_len + 2 = {min_len} "
                      f"(needle + question + one haystack token), got {seq_len!r}")
  if (isinstance(needle_depth, (bool, np.bool_))
      or not isinstance(needle_depth, (int, float, np.number))
      or not np.isfinite(needle_depth) or needle_depth > 1.0):
    raise ConfigError(f("needle_depth"), f"must be a number in [0, 1], or negative for a "
                      f"uniform random depth per example, got {needle_depth!r}")


def passkey_example(index: int, *, seed: int, vocab_size: int, seq_len: int,
                    passkey_len: int = 4, needle_depth: float = -1.0) -> dict[str, np.ndarray]:
  """Example ``index`` of the passkey stream ``seed``; a pure function of its arguments.

  Returns ``inputs`` int32[T], ``targets`` int32[T] and ``loss_mask`` float32[T] (1 at the
  ``passkey_len`` answer positions); the needle starts at the one ``NEEDLE`` input.
  """
  _checked(vocab_size, seq_len, passkey_len, needle_depth)
  if not _is_int(seed) or not 0 <= seed < _MAX_SEED:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if not _is_int(index) or index < 0:
    raise ValueError(f"index must be a non-negative integer, got {index!r}")
  v, t, k = int(vocab_size), int(seq_len), int(passkey_len)
  rng = np.random.default_rng([int(seed), int(index)])
  digits = DIGIT0 + rng.integers(0, 10, size=k)
  depth = rng.random() if needle_depth < 0 else float(needle_depth)
  pos = int(round(depth * (t - 2 * k - 1)))
  full = rng.integers(HAYSTACK0, v, size=t + 1)
  full[pos] = NEEDLE
  full[pos + 1:pos + 1 + k] = digits
  full[t - k] = QUERY
  full[t - k + 1:t + 1] = digits
  loss_mask = np.zeros(t, np.float32)
  loss_mask[t - k:] = 1.0
  return {"inputs": full[:-1].astype(np.int32), "targets": full[1:].astype(np.int32),
          "loss_mask": loss_mask}


def passkey_oracle(inputs: np.ndarray, passkey_len: int) -> np.ndarray:
  """The answer by construction: the ``K`` tokens after the first needle marker.

  ``inputs`` int[..., T] -> int[..., K]; the predictions an exact retriever makes at the
  ``K`` answer positions.
  """
  inputs = np.asarray(inputs)
  start = np.argmax(inputs == NEEDLE, axis=-1)[..., None] + 1
  idx = start + np.arange(passkey_len)
  return np.take_along_axis(inputs, idx, axis=-1)
