"""Sequence order recall (SORT): which of two segments of the context came first?

Reference: Pink, Vo, Wu, Mu, Turek, Hasson, Norman, Michelmann, Huth & Toneva 2024,
"Assessing episodic memory in LLMs with sequence order recall tasks" (arXiv:2410.08133):
after reading a text, the model sees two segments copied from it and must say which one
appeared first. This is lcm's own token-level version (the "text" is random tokens), a pure
function of ``(seed, index)`` like every lcm task.

Vocabulary (``V >= 7``): ``0`` is never used, ``1`` = ``SEG`` (a segment follows), ``2`` =
``QUERY`` (answer next), ``3`` = ``FIRST`` (the first segment shown came first in the
text), ``4`` = ``SECOND`` (the second one did), ``5..V-1`` = text tokens.

Layout of one example of length ``T`` with segments of ``L = segment_len`` tokens, built as
``full`` of length ``T + 1``; ``inputs = full[:-1]``, ``targets = full[1:]``:

* positions ``0 .. D-1`` (``D = T - 2L - 3``): the text, uniform tokens from ``5..V-1``;
* ``[SEG, a_1..a_L, SEG, b_1..b_L, QUERY, answer]``: ``a`` and ``b`` are copies of two
  non-overlapping spans of the text at uniform places, shown in a uniformly random order;
  ``answer`` (``full[T]``) is ``FIRST`` when ``a`` starts earlier in the text, else
  ``SECOND``.
* each segment occurs exactly once in the text (an example whose text repeats a segment
  elsewhere is redrawn, from the same random stream), so the answer is unambiguous.

The target at the ``QUERY`` position (the last input) is the answer, ``loss_mask`` 1 there
only; elsewhere the target is the next token.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from layers.common import ConfigError
from lcm.data.tasks.passkey import is_int, check_seed_and_index

__all__ = ["SequenceOrderConfig", "sequence_order_example", "sequence_order_oracle",
           "SEG", "QUERY", "FIRST", "SECOND", "TEXT0"]

SEG, QUERY, FIRST, SECOND, TEXT0 = 1, 2, 3, 4, 5
_MIN_VOCAB = TEXT0 + 2
_MAX_TRIES = 1000


@dataclasses.dataclass(frozen=True)
class SequenceOrderConfig:
  """Hyper-parameters of the sequence order task (segment_len: L tokens per segment)."""

  vocab_size: int = 64
  seq_len: int = 256
  segment_len: int = 4

  def validate(self, prefix: str = "data") -> "SequenceOrderConfig":
    _validate(self.vocab_size, self.seq_len, self.segment_len, prefix)
    return self


def _validate(vocab_size, seq_len, segment_len, prefix="") -> None:
  f = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
  if not is_int(segment_len) or segment_len < 1:
    raise ConfigError(f("segment_len"), f"must be an integer >= 1, got {segment_len!r}")
  if not is_int(vocab_size) or vocab_size < _MIN_VOCAB:
    raise ConfigError(f("vocab_size"), f"must be an integer >= {_MIN_VOCAB} (4 special "
                      f"tokens and >= 2 text tokens), got {vocab_size!r}")
  n = int(segment_len)
  min_len = 4 * n + 3
  if not is_int(seq_len) or seq_len < min_len:
    raise ConfigError(f("seq_len"), f"must be an integer >= 4*segment_len + 3 = {min_len} "
                      f"(a text holding both segments, then SEG a SEG b QUERY), got "
                      f"{seq_len!r}")
  text = int(seq_len) - 2 * n - 3
  if n * math.log(int(vocab_size) - TEXT0) < math.log(4 * text):
    raise ConfigError(f("segment_len"), f"{n} is too short for a text of {text} tokens over "
                      f"{int(vocab_size) - TEXT0} symbols: a segment would often recur "
                      f"elsewhere in the text (need (vocab_size - 5)**segment_len >= "
                      f"4 * text length); use longer segments or a larger vocabulary")


# Example functions re-check their (hashable) arguments on every call: cache it.
_checked = functools.lru_cache(maxsize=64)(_validate)


def _count(text: np.ndarray, seg: np.ndarray) -> int:
  windows = np.lib.stride_tricks.sliding_window_view(text, seg.shape[0])
  return int(np.all(windows == seg, axis=1).sum())


def sequence_order_example(index: int, *, seed: int, vocab_size: int, seq_len: int,
                           segment_len: int = 4) -> dict[str, np.ndarray]:
  """Example ``index`` of the sequence order stream ``seed``; a pure function of its
  arguments. Returns ``inputs`` int32[T], ``targets`` int32[T], ``loss_mask`` float32[T]
  (1 at the last position only). See the module docstring for the layout."""
  _checked(vocab_size, seq_len, segment_len)
  check_seed_and_index(seed, index)
  v, t, n = int(vocab_size), int(seq_len), int(segment_len)
  d = t - 2 * n - 3
  rng = np.random.default_rng([int(seed), int(index)])
  for _ in range(_MAX_TRIES):
    text = rng.integers(TEXT0, v, size=d)
    x, y = np.sort(rng.integers(0, d - 2 * n + 1, size=2))
    a, b = text[x:x + n], text[y + n:y + 2 * n]  # a starts before b; they do not overlap
    if _count(text, a) == 1 and _count(text, b) == 1:
      break
  else:  # unreachable for configs that pass validation (probability < 1e-100)
    raise RuntimeError(f"no text with unique segments after {_MAX_TRIES} draws")
  swap = bool(rng.random() < 0.5)
  shown = (b, a) if swap else (a, b)
  answer = SECOND if swap else FIRST
  full = np.concatenate([text, [SEG], shown[0], [SEG], shown[1], [QUERY, answer]])
  loss_mask = np.zeros(t, np.float32)
  loss_mask[t - 1] = 1.0
  return {"inputs": full[:-1].astype(np.int32), "targets": full[1:].astype(np.int32),
          "loss_mask": loss_mask}


def sequence_order_oracle(inputs: np.ndarray) -> np.ndarray:
  """The answer by construction: int[..., T] -> int[...], ``FIRST`` or ``SECOND``, found by
  locating both shown segments in the text (read from the inputs only)."""
  inputs = np.asarray(inputs)
  if inputs.ndim > 1:
    return np.stack([sequence_order_oracle(x) for x in inputs])
  t = inputs.shape[0]
  s = int(np.flatnonzero(inputs == SEG)[0])
  n = (t - s - 3) // 2
  text, a, b = inputs[:s], inputs[s + 1:s + 1 + n], inputs[s + 2 + n:s + 2 + 2 * n]
  windows = np.lib.stride_tricks.sliding_window_view(text, n)
  pa = int(np.argmax(np.all(windows == a, axis=1)))
  pb = int(np.argmax(np.all(windows == b, axis=1)))
  return np.int64(FIRST if pa < pb else SECOND)
