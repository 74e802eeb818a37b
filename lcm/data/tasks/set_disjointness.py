"""Set disjointness (SD), the recall problem whose difficulty depends on the data order.

Reference: Arora, Timalsina, Singhal, Spector, Eyuboglu, Zhao, Rao, Rudra & Ré 2024, "Just
read twice: closing the recall gap for recurrent language models" (arXiv:2407.05483). The
paper reduces recall to SD (decide whether two sets intersect) and shows that the state a
recurrent model needs depends on whether the shorter set comes first. Its synthetic
version, followed here, gives two sets that share exactly one element, separated by a
separator token, and asks for the shared element (the intersection), with the short set
first or the long set first. (The paper's exact token format was not available to us; this
layout is lcm's own, a pure function of ``(seed, index)`` like every lcm task.)

Vocabulary (``V >= 3 + short_size + long_size - 1``): ``0`` = padding, ``1`` = ``SEP``
between the sets, ``2`` = ``QUERY`` (answer next), ``3..V-1`` = set elements.

Layout of one example of length ``T`` (``S = short_size``, ``L = long_size``), built as
``full`` of length ``T + 1``; ``inputs = full[:-1]``, ``targets = full[1:]``:

* left padding: ``T - (S + L + 2)`` tokens ``0``;
* ``order="short_first"``: ``[short set] SEP [long set] QUERY x``; ``"long_first"``:
  ``[long set] SEP [short set] QUERY x``. The ``S + L - 1`` distinct elements are uniform
  from ``3..V-1``; ``x`` is in both sets, at a uniform place in each (the sets are in random
  order);
* the target at the ``QUERY`` position (the last input) is ``x``, ``loss_mask`` 1 there
  only; elsewhere the target is the next token.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from layers.common import ConfigError
from lcm.data.tasks.passkey import is_int, check_seed_and_index

__all__ = ["SetDisjointnessConfig", "set_disjointness_example", "set_disjointness_oracle",
           "ORDERS", "PAD", "SEP", "QUERY", "ELEMENT0"]

PAD, SEP, QUERY, ELEMENT0 = 0, 1, 2, 3
ORDERS = ("short_first", "long_first")


@dataclasses.dataclass(frozen=True)
class SetDisjointnessConfig:
  """Hyper-parameters of the set disjointness task.

  short_size / long_size: the two set sizes (short <= long). order: which set comes first,
  one of ``ORDERS``.
  """

  vocab_size: int = 64
  seq_len: int = 64
  short_size: int = 4
  long_size: int = 16
  order: str = "short_first"

  def validate(self, prefix: str = "data") -> "SetDisjointnessConfig":
    _validate(self.vocab_size, self.seq_len, self.short_size, self.long_size, self.order,
             prefix)
    return self


def _validate(vocab_size, seq_len, short_size, long_size, order, prefix="") -> None:
  f = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
  if not is_int(short_size) or short_size < 1:
    raise ConfigError(f("short_size"), f"must be an integer >= 1, got {short_size!r}")
  if not is_int(long_size) or long_size < short_size:
    raise ConfigError(f("long_size"), f"must be an integer >= short_size={short_size}, got "
                      f"{long_size!r}")
  if not isinstance(order, str) or order not in ORDERS:
    raise ConfigError(f("order"), f"must be one of {', '.join(ORDERS)}, got {order!r}")
  need = ELEMENT0 + int(short_size) + int(long_size) - 1
  if not is_int(vocab_size) or vocab_size < need:
    raise ConfigError(f("vocab_size"), f"must be an integer >= 3 + short_size + long_size - "
                      f"1 = {need} (the sets' elements are distinct apart from the shared "
                      f"one), got {vocab_size!r}")
  min_len = int(short_size) + int(long_size) + 2
  if not is_int(seq_len) or seq_len < min_len:
    raise ConfigError(f("seq_len"), f"must be an integer >= short_size + long_size + 2 = "
                      f"{min_len} (both sets, SEP and QUERY), got {seq_len!r}")


# Example functions re-check their (hashable) arguments on every call: cache it.
_checked = functools.lru_cache(maxsize=64)(_validate)


def set_disjointness_example(index: int, *, seed: int, vocab_size: int, seq_len: int,
                             short_size: int = 4, long_size: int = 16,
                             order: str = "short_first") -> dict[str, np.ndarray]:
  """Example ``index`` of the set disjointness stream ``seed``; a pure function of its
  arguments. Returns ``inputs`` int32[T], ``targets`` int32[T], ``loss_mask`` float32[T]
  (1 at the last position only). See the module docstring for the layout."""
  _checked(vocab_size, seq_len, short_size, long_size, order)
  check_seed_and_index(seed, index)
  v, t, s, n = int(vocab_size), int(seq_len), int(short_size), int(long_size)
  rng = np.random.default_rng([int(seed), int(index)])
  elems = ELEMENT0 + rng.choice(v - ELEMENT0, size=s + n - 1, replace=False)
  shared = elems[0]
  short = rng.permutation(elems[:s])
  long = rng.permutation(np.concatenate([[shared], elems[s:]]))
  first, second = (short, long) if order == "short_first" else (long, short)
  pad = t - (s + n + 2)
  full = np.concatenate([np.full(pad, PAD, np.int64), first, [SEP], second, [QUERY, shared]])
  loss_mask = np.zeros(t, np.float32)
  loss_mask[t - 1] = 1.0
  return {"inputs": full[:-1].astype(np.int32), "targets": full[1:].astype(np.int32),
          "loss_mask": loss_mask}


def set_disjointness_oracle(inputs: np.ndarray) -> np.ndarray:
  """The answer by construction: int[..., T] -> int[...], the one element in both sets
  (read from the inputs only: the elements before and after ``SEP``)."""
  inputs = np.asarray(inputs)
  if inputs.ndim > 1:
    return np.stack([set_disjointness_oracle(x) for x in inputs])
  sep = int(np.flatnonzero(inputs == SEP)[0])
  first = inputs[:sep][inputs[:sep] >= ELEMENT0]
  second = inputs[sep + 1:-1]
  both = np.intersect1d(first, second)
  return np.int64(both[0]) if both.size else np.int64(-1)
