"""Passkey retrieval in a noise haystack: S-NIAH (one needle) and MK-NIAH (several keys).

References: Mohtashami & Jaggi 2023 ("Landmark Attention", the passkey task); Hsieh et al.
2024 (RULER: S-NIAH-1/2/3 -- one needle with a word-pair key whose value is a 7-digit
number, a 7-digit number, a 32-hex UUID, in repeated-sentence, essay and essay filler
respectively -- and MK-NIAH-1 -- several needles with their own keys, the question asks for
one); Behrouz et al. 2025 (Titans, Table 2: S-NIAH at 2k..16k). This is lcm's own
token-level version, a pure function of ``(seed, index)`` like every lcm task, whose
haystack is random tokens so that a model cannot lean on language statistics. It is much
easier than the papers' protocols (which test a text-trained LM zero-shot, with natural
filler that contains other numbers) and models are trained on it directly: its scores are
not comparable with the papers' numbers.

Vocabulary (``V``): ``1`` = needle marker, ``2`` = query marker, ``3..12`` = the ten
digits, ``13..V-1`` = haystack tokens (``0`` is never used). The value alphabet depends on
``needle_kind`` (``L = passkey_len`` value tokens in every kind):

* ``"number"`` (default, ``V >= 16``): ``L`` digits from ``3..12``;
* ``"word"`` (``V >= 18``): ``L`` tokens from the word range ``[13, 13 + W)``,
  ``W = (V - 13) // 2``; the haystack is then ``[13 + W, V)`` (``L = 1``: one "word", as in
  RULER's S-NIAH with word values);
* ``"uuid"`` (``V >= 22``): ``L`` hex-like tokens from ``3..18`` (the ten digits, then six
  "letters" ``13..18``); the haystack is then ``[19, V)``. RULER's UUIDs have 32 hex
  symbols: use ``passkey_len=32`` for that length.

Layout of one example of length ``T`` (``N = num_needles``):

* haystack: every position not listed below holds a uniform token from the haystack range;
* ``N = 1`` (S-NIAH): the needle is ``[NEEDLE, v_1, .., v_L]`` (``L + 1`` tokens) starting
  at ``p = round(depth * (T - 2L - 1))`` (``depth`` in [0, 1]: 0 = at the start, 1 = right
  before the question), with ``depth`` uniform per example when ``needle_depth < 0``; the
  last ``L`` inputs are ``[QUERY, v_1, .., v_{L-1}]`` and their targets ``v_1 .. v_L``
  (teacher forcing). With the default kind this is exactly the original single-needle task.
* ``N > 1`` (MK-NIAH): needle ``j`` is ``[NEEDLE, key_j, v_j1, .., v_jL]``; the ``N`` keys
  are distinct haystack-range tokens (a key is recognised by following ``NEEDLE``); the last
  ``L + 1`` inputs are ``[QUERY, key_q, v_q1, .., v_q(L-1)]`` with targets ``v_q1 .. v_qL`` at
  the last ``L`` positions. The queried needle sits at ``depth`` of the free haystack, the
  other ``N - 1`` at uniform random places (needles never overlap).

``max_tail > 0`` (a training option) moves the question off the end: a uniform number
``r`` in ``[0, max_tail]`` of haystack tokens follows the answer, i.e. the example above is
built at length ``T - r`` and ``r`` haystack tokens are appended. A model that imposes a
block structure (landmark attention: a landmark every ``block_size - 1`` tokens) then sees
the question at every offset within a block; with the question always at the end of a
fixed training length it only ever sees one offset, and a test length that puts the
question across a block boundary fails (docs/known-issues.md, "Landmark attention").
Causal models never see the tail before they answer.

``loss_mask`` is 1 at the ``L`` answer positions (the last ``L`` when ``max_tail == 0``)
and 0 elsewhere (elsewhere the target is simply the next token). An example is *retrieved*
when all ``L`` predictions are right (for greedy decoding that is the same event: every
step then sees the correct previous token).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from layers.common import ConfigError

__all__ = ["PasskeyConfig", "passkey_example", "passkey_oracle", "NEEDLE", "QUERY",
           "DIGIT0", "HAYSTACK0", "NEEDLE_KINDS", "value_alphabet"]

NEEDLE, QUERY, DIGIT0, HAYSTACK0 = 1, 2, 3, 13
NEEDLE_KINDS = ("number", "word", "uuid")
_HEX_END = HAYSTACK0 + 6  # uuid kind: hex-like tokens are [DIGIT0, _HEX_END)
_MIN_VOCAB = {"number": HAYSTACK0 + 3, "word": HAYSTACK0 + 5, "uuid": _HEX_END + 3}
_MAX_SEED = 2**32


def is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_seed_and_index(seed, index) -> None:
  """The common argument checks of every lcm task's ``<task>_example``."""
  if not is_int(seed) or not 0 <= seed < _MAX_SEED:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if not is_int(index) or index < 0:
    raise ValueError(f"index must be a non-negative integer, got {index!r}")


def value_alphabet(vocab_size: int, needle_kind: str = "number") -> tuple[int, int, int]:
  """``(lo, hi, haystack_lo)``: values are drawn from ``[lo, hi)``, haystack from
  ``[haystack_lo, vocab_size)``."""
  if needle_kind == "number":
    return DIGIT0, HAYSTACK0, HAYSTACK0
  if needle_kind == "word":
    w = (int(vocab_size) - HAYSTACK0) // 2
    return HAYSTACK0, HAYSTACK0 + w, HAYSTACK0 + w
  return DIGIT0, _HEX_END, _HEX_END


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  """Hyper-parameters of the passkey task.

  passkey_len: L, value tokens to retrieve. needle_depth: where the (queried) needle sits as
  a fraction of the haystack (0 = start, 1 = end); a negative value draws it uniformly per
  example. num_needles: 1 = S-NIAH, > 1 = multi-key NIAH. needle_kind: the value alphabet,
  one of ``NEEDLE_KINDS``. max_tail: up to this many haystack tokens after the answer
  (uniform per example; 0 = the answer ends the sequence).
  """

  vocab_size: int = 64
  seq_len: int = 256
  passkey_len: int = 4
  needle_depth: float = -1.0
  num_needles: int = 1
  needle_kind: str = "number"
  max_tail: int = 0

  def validate(self, prefix: str = "data") -> "PasskeyConfig":
    _validate(self.vocab_size, self.seq_len, self.passkey_len, self.needle_depth, prefix,
             self.num_needles, self.needle_kind, self.max_tail)
    return self


def _validate(vocab_size, seq_len, passkey_len, needle_depth, prefix: str = "",
             num_needles=1, needle_kind="number", max_tail=0) -> None:
  f = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
  if not is_int(passkey_len) or passkey_len < 1:
    raise ConfigError(f("passkey_len"), f"must be an integer >= 1, got {passkey_len!r}")
  if not is_int(num_needles) or num_needles < 1:
    raise ConfigError(f("num_needles"), f"must be an integer >= 1 (1 = single needle, more "
                      f"= multi-key needles), got {num_needles!r}")
  if not isinstance(needle_kind, str) or needle_kind not in NEEDLE_KINDS:
    raise ConfigError(f("needle_kind"), f"must be one of {', '.join(NEEDLE_KINDS)}, got "
                      f"{needle_kind!r}")
  min_vocab = _MIN_VOCAB[needle_kind]
  if not is_int(vocab_size) or vocab_size < min_vocab:
    raise ConfigError(f("vocab_size"), f"must be an integer >= {min_vocab} for needle_kind="
                      f"{needle_kind!r} (2 markers, the value alphabet and >= 3 haystack "
                      f"tokens), got {vocab_size!r}")
  n, k = int(num_needles), int(passkey_len)
  hay = int(vocab_size) - value_alphabet(vocab_size, needle_kind)[2]
  if n > 1 and n > hay:
    raise ConfigError(f("num_needles"), f"must be <= the {hay} haystack tokens (each needle's "
                      f"key is a distinct one) for vocab_size={vocab_size}, got {n}")
  if n == 1:
    min_len = 2 * k + 2
    why = "2*passkey_len + 2 (needle + question + one haystack token)"
  else:
    min_len = (n + 1) * (k + 2)
    why = ("(num_needles + 1) * (passkey_len + 2) (the needles [NEEDLE, key, value], "
           "the question [QUERY, key, value] and one haystack token)")
  if not is_int(seq_len) or seq_len < min_len:
    raise ConfigError(f("seq_len"), f"must be an integer >= {why} = {min_len}, got "
                      f"{seq_len!r}")
  if not is_int(max_tail) or max_tail < 0:
    raise ConfigError(f("max_tail"), f"must be an integer >= 0, got {max_tail!r}")
  if seq_len - max_tail < min_len:
    raise ConfigError(f("max_tail"), f"leaves seq_len - max_tail = {seq_len - max_tail} "
                      f"tokens for the example, fewer than {why} = {min_len}; got "
                      f"max_tail={max_tail}, seq_len={seq_len}")
  if (isinstance(needle_depth, (bool, np.bool_))
      or not isinstance(needle_depth, (int, float, np.number))
      or not np.isfinite(needle_depth) or needle_depth > 1.0):
    raise ConfigError(f("needle_depth"), f"must be a number in [0, 1], or negative for a "
                      f"uniform random depth per example, got {needle_depth!r}")


# Example functions re-check their (hashable) arguments on every call: cache it.
_checked = functools.lru_cache(maxsize=64)(_validate)


def _answer_end(rng, seq_len: int, k: int, max_tail: int):
  """``(t, loss_mask)``: the answer ends at ``t = seq_len - r``, ``r`` uniform in
  ``[0, max_tail]`` (no draw when ``max_tail == 0``); the mask is 1 at ``[t - k, t)``."""
  t = seq_len - (int(rng.integers(0, max_tail + 1)) if max_tail else 0)
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[t - k:t] = 1.0
  return t, loss_mask


def passkey_example(index: int, *, seed: int, vocab_size: int, seq_len: int,
                    passkey_len: int = 4, needle_depth: float = -1.0, num_needles: int = 1,
                    needle_kind: str = "number", max_tail: int = 0) -> dict[str, np.ndarray]:
  """Example ``index`` of the passkey stream ``seed``; a pure function of its arguments.

  Returns ``inputs`` int32[T], ``targets`` int32[T] and ``loss_mask`` float32[T] (1 at the
  ``passkey_len`` answer positions). See the module docstring for the layout.
  """
  _checked(vocab_size, seq_len, passkey_len, needle_depth, "", num_needles, needle_kind,
           max_tail)
  check_seed_and_index(seed, index)
  v, n_all, k, n = int(vocab_size), int(seq_len), int(passkey_len), int(num_needles)
  lo, hi, hay0 = value_alphabet(v, needle_kind)
  rng = np.random.default_rng([int(seed), int(index)])
  # The original draw order when max_tail == 0: default outputs stay bit-identical. ``t`` is
  # where the answer ends; ``full`` always spans the whole sequence (the tail is haystack).
  if n == 1:
    digits = lo + rng.integers(0, hi - lo, size=k)
    depth = rng.random() if needle_depth < 0 else float(needle_depth)
    t, loss_mask = _answer_end(rng, n_all, k, max_tail)
    pos = int(round(depth * (t - 2 * k - 1)))
    full = rng.integers(hay0, v, size=n_all + 1)
    full[pos] = NEEDLE
    full[pos + 1:pos + 1 + k] = digits
    full[t - k] = QUERY
    full[t - k + 1:t + 1] = digits
    return {"inputs": full[:-1].astype(np.int32), "targets": full[1:].astype(np.int32),
            "loss_mask": loss_mask}

  values = lo + rng.integers(0, hi - lo, size=(n, k))
  keys = hay0 + rng.choice(v - hay0, size=n, replace=False)
  q = int(rng.integers(0, n))  # the queried needle
  depth = rng.random() if needle_depth < 0 else float(needle_depth)
  t, loss_mask = _answer_end(rng, n_all, k, max_tail)
  needle_len = k + 2
  region = t - k - 1  # full[:region] holds haystack + needles; the question follows
  free = region - n * needle_len
  # Needle j goes after ins[j] haystack tokens (insertion points in [0, free]); the queried
  # one at its depth, the others uniform; equal points keep the queried needle first.
  ins = rng.integers(0, free + 1, size=n)
  ins[q] = int(round(depth * free))
  order = np.lexsort((np.arange(n) != q, ins))
  full = rng.integers(hay0, v, size=n_all + 1)
  for rank, j in enumerate(order):
    start = int(ins[j]) + rank * needle_len
    full[start] = NEEDLE
    full[start + 1] = keys[j]
    full[start + 2:start + 2 + k] = values[j]
  full[region] = QUERY
  full[region + 1] = keys[q]
  full[region + 2:t + 1] = values[q]
  return {"inputs": full[:-1].astype(np.int32), "targets": full[1:].astype(np.int32),
          "loss_mask": loss_mask}


def passkey_oracle(inputs: np.ndarray, passkey_len: int, *, num_needles: int = 1) -> np.ndarray:
  """The answer by construction: the ``L`` value tokens of the (queried) needle.

  ``inputs`` int[..., T] -> int[..., L]; the predictions an exact retriever makes at the
  ``L`` answer positions. One needle: the ``L`` tokens after the first needle marker. Several:
  the ``L`` tokens after the ``[NEEDLE, key]`` pair whose key the question names.
  """
  inputs = np.asarray(inputs)
  if num_needles == 1:
    start = np.argmax(inputs == NEEDLE, axis=-1)[..., None] + 1
  else:  # the key follows the (single) query marker, wherever the question sits
    q = np.argmax(inputs == QUERY, axis=-1)[..., None]
    key = np.take_along_axis(inputs, q + 1, axis=-1)
    hit = (inputs[..., :-1] == NEEDLE) & (inputs[..., 1:] == key)
    start = np.argmax(hit, axis=-1)[..., None] + 2
  idx = start + np.arange(passkey_len)
  return np.take_along_axis(inputs, idx, axis=-1)
