"""Selective copying: copy the data tokens scattered among noise tokens, in order.

Reference: Gu & Dao 2023, "Mamba: linear-time sequence modeling with selective state
spaces" (Section 3.1 and Appendix E.1: the selective copying task, a variant of the copying
task of Arjovsky et al. 2016 in which the spacing between the tokens to memorise varies
randomly, so a time-invariant model cannot solve it). This is lcm's own token-level
version, a pure function of ``(seed, index)`` like every lcm task (Mamba's setting:
vocabulary 16, 16 data tokens, length 4096).

Vocabulary (``V >= 5``): ``0`` is never used, ``1`` = ``NOISE`` (the blank token), ``2`` =
``COPY`` marker, ``3..V-1`` = data tokens.

Layout of one example of length ``T`` with ``K = num_tokens``, built as ``full`` of length
``T + 1``; ``inputs = full[:-1]``, ``targets = full[1:]``:

* positions ``0 .. T-K-1``: ``NOISE`` everywhere except ``K`` distinct uniform positions,
  which hold the data tokens ``d_1 .. d_K`` (uniform from ``3..V-1``, repeats allowed) in
  position order;
* position ``T-K``: ``COPY``; then ``d_1 .. d_K`` (``d_K`` is ``full[T]``, a target only).

The last ``K`` inputs are ``[COPY, d_1, .., d_{K-1}]`` and their targets ``d_1 .. d_K``
(teacher forcing), ``loss_mask`` 1 there and 0 elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from layers.common import ConfigError
from lcm.data.tasks.passkey import is_int, check_seed_and_index

__all__ = ["SelectiveCopyConfig", "selective_copy_example", "selective_copy_oracle",
           "NOISE", "COPY", "DATA0"]

NOISE, COPY, DATA0 = 1, 2, 3
_MIN_VOCAB = DATA0 + 2


@dataclasses.dataclass(frozen=True)
class SelectiveCopyConfig:
  """Hyper-parameters of the selective copying task (num_tokens: K data tokens to copy)."""

  vocab_size: int = 16
  seq_len: int = 256
  num_tokens: int = 16

  def validate(self, prefix: str = "data") -> "SelectiveCopyConfig":
    _validate(self.vocab_size, self.seq_len, self.num_tokens, prefix)
    return self


def _validate(vocab_size, seq_len, num_tokens, prefix="") -> None:
  f = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
  if not is_int(num_tokens) or num_tokens < 1:
    raise ConfigError(f("num_tokens"), f"must be an integer >= 1, got {num_tokens!r}")
  if not is_int(vocab_size) or vocab_size < _MIN_VOCAB:
    raise ConfigError(f("vocab_size"), f"must be an integer >= {_MIN_VOCAB} (noise, copy "
                      f"marker and >= 2 data tokens), got {vocab_size!r}")
  min_len = 2 * int(num_tokens)
  if not is_int(seq_len) or seq_len < min_len:
    raise ConfigError(f("seq_len"), f"must be an integer >= 2*num_tokens = {min_len} (the "
                      f"data region, the copy marker and the answer), got {seq_len!r}")


# Example functions re-check their (hashable) arguments on every call: cache it.
_checked = functools.lru_cache(maxsize=64)(_validate)


def selective_copy_example(index: int, *, seed: int, vocab_size: int, seq_len: int,
                           num_tokens: int = 16) -> dict[str, np.ndarray]:
  """Example ``index`` of the selective copying stream ``seed``; a pure function of its
  arguments. Returns ``inputs`` int32[T], ``targets`` int32[T], ``loss_mask`` float32[T]
  (1 at the last ``num_tokens`` positions). See the module docstring for the layout."""
  _checked(vocab_size, seq_len, num_tokens)
  check_seed_and_index(seed, index)
  v, t, k = int(vocab_size), int(seq_len), int(num_tokens)
  rng = np.random.default_rng([int(seed), int(index)])
  data = rng.integers(DATA0, v, size=k)
  pos = np.sort(rng.choice(t - k, size=k, replace=False))
  full = np.full(t + 1, NOISE, np.int64)
  full[pos] = data
  full[t - k] = COPY
  full[t - k + 1:] = data
  loss_mask = np.zeros(t, np.float32)
  loss_mask[t - k:] = 1.0
  return {"inputs": full[:-1].astype(np.int32), "targets": full[1:].astype(np.int32),
          "loss_mask": loss_mask}


def selective_copy_oracle(inputs: np.ndarray) -> np.ndarray:
  """The answer by construction: int[..., T] -> int[..., K], the non-noise tokens before
  the ``COPY`` marker in order (read from the inputs only; ``K = T - position of COPY``)."""
  inputs = np.asarray(inputs)
  if inputs.ndim > 1:
    return np.stack([selective_copy_oracle(x) for x in inputs])
  copy = int(np.flatnonzero(inputs == COPY)[0])
  region = inputs[:copy]
  return region[region != NOISE].astype(np.int64)
