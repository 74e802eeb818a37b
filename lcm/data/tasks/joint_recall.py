"""Joint recall: context-dependent multi-query associative recall.

Reference: Zhan, Zhao, Zhu & Tang 2025, "Overcoming long-context limitations of state-space
models via context-dependent sparse attention" (NeurIPS 2025, arXiv:2507.00449). Joint recall
extends associative recall so that the value of a key depends on the *context* it was given
in: several named contexts bind the same keys to different values, and a query names a
context and a key. This is lcm's own token-level version, a pure function of
``(seed, index)`` like every lcm task.

Vocabulary (``V >= 8``; ``R = V - 3``): ``0`` = padding, ``1`` = ``CONTEXT`` marker, ``2`` =
``QUERY`` marker, then three ranges: context ids ``[3, 3 + R//4)``, keys (the next
``(R - R//4) // 2`` tokens) and values (the rest, up to ``V - 1``); see :func:`token_ranges`.

Layout of one example of length ``T`` with ``C`` contexts, ``K`` keys and ``Q`` queries,
built as ``full`` of length ``T + 1``; ``inputs = full[:-1]``, ``targets = full[1:]``:

* left padding: ``P = T - (C * (2 + 2K) + 3Q)`` tokens ``0``;
* ``C`` contexts, each ``[CONTEXT, c, k_1 v_1 .. k_K v_K]``: the ``C`` context ids are
  distinct; every context holds the *same* ``K`` distinct keys, in its own random order;
  a key's ``C`` values (one per context) are distinct, so the answer always depends on the
  context;
* the question block ``[QUERY, c_1 k_1 v_1, .., c_Q k_Q v_Q]``: ``Q`` distinct
  ``(context, key)`` pairs; the last ``v_Q`` is ``full[T]`` (a target only).

Targets and loss mask: at the position of each queried key the target is its value in the
named context and ``loss_mask`` is 1 (``Q`` positions); the value is then given as the next
input (teacher forcing; no later query depends on it). Elsewhere the target is the next
token with ``loss_mask`` 0.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from layers.common import ConfigError
from lcm.data.tasks.passkey import is_int, check_seed_and_index

__all__ = ["JointRecallConfig", "joint_recall_example", "joint_recall_oracle",
           "joint_recall_table", "token_ranges", "PAD", "CONTEXT", "QUERY"]

PAD, CONTEXT, QUERY = 0, 1, 2
_FIRST = 3
_MIN_VOCAB = 8


def token_ranges(vocab_size: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
  """``(ids, keys, values)``, each a half-open token range ``(lo, hi)``."""
  r = int(vocab_size) - _FIRST
  n_id = r // 4
  n_key = (r - n_id) // 2
  a, b = _FIRST + n_id, _FIRST + n_id + n_key
  return (_FIRST, a), (a, b), (b, int(vocab_size))


@dataclasses.dataclass(frozen=True)
class JointRecallConfig:
  """Hyper-parameters of the joint recall task.

  num_contexts: C named contexts. num_keys: K keys, shared by every context. num_queries:
  Q distinct (context, key) questions at the end (at most C * K).
  """

  vocab_size: int = 64
  seq_len: int = 64
  num_contexts: int = 4
  num_keys: int = 4
  num_queries: int = 4

  def validate(self, prefix: str = "data") -> "JointRecallConfig":
    _validate(self.vocab_size, self.seq_len, self.num_contexts, self.num_keys,
             self.num_queries, prefix)
    return self


def _validate(vocab_size, seq_len, num_contexts, num_keys, num_queries, prefix="") -> None:
  f = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
  for name, x in (("num_contexts", num_contexts), ("num_keys", num_keys),
                  ("num_queries", num_queries)):
    if not is_int(x) or x < 1:
      raise ConfigError(f(name), f"must be an integer >= 1, got {x!r}")
  c, k, q = int(num_contexts), int(num_keys), int(num_queries)
  if q > c * k:
    raise ConfigError(f("num_queries"), f"must be <= num_contexts * num_keys = {c * k} "
                      f"(the questions are distinct (context, key) pairs), got {q}")
  if not is_int(vocab_size) or vocab_size < _MIN_VOCAB:
    raise ConfigError(f("vocab_size"), f"must be an integer >= {_MIN_VOCAB} (3 special "
                      f"tokens + ids, keys and values), got {vocab_size!r}")
  (i0, i1), (k0, k1), (v0, v1) = token_ranges(vocab_size)
  if i1 - i0 < c or k1 - k0 < k or v1 - v0 < c:
    raise ConfigError(f("vocab_size"), f"{vocab_size} gives {i1 - i0} context ids, {k1 - k0} "
                      f"keys and {v1 - v0} values; need >= num_contexts={c} ids, >= "
                      f"num_keys={k} keys and >= num_contexts={c} values (a key's values "
                      f"differ between contexts): use a larger vocabulary")
  min_len = c * (2 + 2 * k) + 3 * q
  if not is_int(seq_len) or seq_len < min_len:
    raise ConfigError(f("seq_len"), f"must be an integer >= num_contexts * (2 + 2*num_keys) "
                      f"+ 3*num_queries = {min_len}, got {seq_len!r}")


# Example functions re-check their (hashable) arguments on every call: cache it.
_checked = functools.lru_cache(maxsize=64)(_validate)


def joint_recall_example(index: int, *, seed: int, vocab_size: int, seq_len: int,
                         num_contexts: int = 4, num_keys: int = 4,
                         num_queries: int = 4) -> dict[str, np.ndarray]:
  """Example ``index`` of the joint recall stream ``seed``; a pure function of its arguments.

  Returns ``inputs`` int32[T], ``targets`` int32[T] and ``loss_mask`` float32[T] (1 at the
  ``num_queries`` answer positions). See the module docstring for the layout.
  """
  _checked(vocab_size, seq_len, num_contexts, num_keys, num_queries)
  check_seed_and_index(seed, index)
  t, c, k, q = int(seq_len), int(num_contexts), int(num_keys), int(num_queries)
  (i0, i1), (k0, k1), (v0, v1) = token_ranges(vocab_size)
  rng = np.random.default_rng([int(seed), int(index)])
  ids = i0 + rng.choice(i1 - i0, size=c, replace=False)
  keys = k0 + rng.choice(k1 - k0, size=k, replace=False)
  # values[i, j]: value of key j in context i; each key's C values are distinct.
  values = v0 + np.argsort(rng.random((k, v1 - v0)), axis=1)[:, :c].T
  order = np.argsort(rng.random((c, k)), axis=1)  # each context lists its keys in its order
  asked = rng.choice(c * k, size=q, replace=False)
  qc, qk = asked // k, asked % k

  block = np.empty((c, 2 + 2 * k), np.int64)
  block[:, 0] = CONTEXT
  block[:, 1] = ids
  block[:, 2::2] = keys[order]
  block[:, 3::2] = np.take_along_axis(values, order, axis=1)
  questions = np.stack([ids[qc], keys[qk], values[qc, qk]], axis=1)
  pad = t - c * (2 + 2 * k) - 3 * q
  full = np.concatenate([np.full(pad, PAD, np.int64), block.ravel(), [QUERY], questions.ravel()])
  answer_pos = t - 3 * q + 2 + 3 * np.arange(q)  # the queried keys' input positions
  loss_mask = np.zeros(t, np.float32)
  loss_mask[answer_pos] = 1.0
  return {"inputs": full[:-1].astype(np.int32), "targets": full[1:].astype(np.int32),
          "loss_mask": loss_mask}


def joint_recall_table(inputs: np.ndarray, num_keys: int) -> dict[tuple[int, int], int]:
  """``(context id, key) -> value`` of one example's context blocks, read from ``inputs``
  (int[T]) alone."""
  inputs, k = np.asarray(inputs), int(num_keys)
  table = {}
  for p in np.flatnonzero(inputs == CONTEXT):
    pairs = inputs[p + 2:p + 2 + 2 * k].reshape(k, 2)
    for key, value in pairs:
      table[(int(inputs[p + 1]), int(key))] = int(value)
  return table


def joint_recall_oracle(inputs: np.ndarray, num_keys: int, num_queries: int) -> np.ndarray:
  """The answers by construction: int[..., T] -> int[..., Q], read from the inputs only.

  Parses every ``[CONTEXT, c, k v ...]`` block into a table ``(c, k) -> v``
  (:func:`joint_recall_table`) and looks up the ``Q`` questions ``(c_j, k_j)`` of the final
  block.
  """
  inputs = np.asarray(inputs)
  if inputs.ndim > 1:
    return np.stack([joint_recall_oracle(x, num_keys, num_queries) for x in inputs])
  t, q = inputs.shape[0], int(num_queries)
  table = joint_recall_table(inputs, num_keys)
  start = t - 3 * q + 1  # first question's context id
  return np.array([table[(int(inputs[start + 3 * j]), int(inputs[start + 3 * j + 1]))]
                   for j in range(q)], np.int64)
