"""MQAR with a hidden dictionary: some queried keys have values that no context shows.

The task the state-tuning experiment (``lcm/state_tuning.py``) is measured on; lcm's own
variant of Zoology's MQAR (``lcm/data/tasks/mqar.py``), a pure function of
``(seed, index)`` like every lcm task.

A *hidden dictionary* of ``H = num_hidden`` key -> value pairs is drawn once from
``hidden_seed`` (:func:`hidden_dictionary`; the same for every example and every example
seed): ``H`` distinct keys from MQAR's key range ``[1, V//2)`` and ``H`` distinct values
from the value range ``[V//2, V)``. An example is an MQAR example whose ``N`` context keys
avoid the hidden keys and whose query slots also ask ``Q = hidden_queries`` distinct
hidden keys. The values of the hidden keys never appear after them anywhere, so a model
can only answer them from something it carries into every sequence: weights, or (what
state tuning learns) the initial recurrent state. A model trained on ordinary MQAR answers
them at chance.

Layout (vocabulary ``V``, input length ``T``), built as ``full`` of length ``T + 1``;
``inputs = full[:-1]``:

* positions ``0 .. 2N-1``: the context ``k1 v1 .. kN vN`` (distinct keys from
  ``[1, V//2)`` minus the hidden keys, distinct values from ``[V//2, V)``);
* ``space = (T - 2N) // 2`` candidate query slots at ``2N + 2g``; ``N + Q`` distinct gaps
  ``g`` drawn with MQAR's power law (``power_a``); the ``N`` context keys and the ``Q``
  hidden keys are assigned to them in a random order;
* every other position is a filler: ``0``, or with ``random_non_queries`` a uniform token
  from ``[0, V)`` (as in MQAR, fillers may collide with keys or values).

Targets and loss mask: at each of the ``N + Q`` query positions the target is the key's
value (from the context, or from the hidden dictionary) and ``loss_mask`` is 1; as in MQAR
the value is not written into the inputs. Elsewhere the target is the next token with
``loss_mask`` 0. :func:`hidden_query_mask` tells the two kinds of queries apart (a
hidden key never appears as a context key), :func:`mqar_hidden_oracle` answers both.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from layers.common import ConfigError
from lcm.data.tasks.mqar import assemble, is_int, query_gap_probs

__all__ = ["MQARHiddenConfig", "mqar_hidden_example", "mqar_hidden_oracle",
           "hidden_dictionary", "hidden_query_mask"]

_MAX_SEED = 2**32
# Domain separation: the dictionary's random stream has a 3-word entropy, every example's
# has two ([seed, index]), so no (seed, index) can reproduce the dictionary's draws.
_DICT_STREAM = 0x68696464  # "hidd"


@dataclasses.dataclass(frozen=True)
class MQARHiddenConfig:
  """MQAR's fields (Zoology defaults) plus the hidden dictionary.

  num_hidden: H pairs in the hidden dictionary. hidden_queries: Q hidden keys asked per
  example (distinct, at most H). hidden_seed: the dictionary's seed (independent of the
  example seed, so training and held-out streams share one dictionary).
  """

  vocab_size: int = 8192
  seq_len: int = 64
  num_kv_pairs: int = 4
  power_a: float = 0.01
  random_non_queries: bool = True
  num_hidden: int = 8
  hidden_queries: int = 2
  hidden_seed: int = 0

  def validate(self, prefix: str = "data") -> "MQARHiddenConfig":
    """Raises ``ConfigError`` naming ``<prefix>.<field>`` for a bad value; returns self."""
    _validate(*dataclasses.astuple(self), prefix=prefix)
    return self

  def example(self, index: int, *, seed: int) -> dict[str, np.ndarray]:
    return mqar_hidden_example(index, seed=seed, **dataclasses.asdict(self))


def _validate(vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries, num_hidden,
              hidden_queries, hidden_seed, prefix: str = "") -> None:
  f = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
  for name, x in (("num_kv_pairs", num_kv_pairs), ("num_hidden", num_hidden),
                  ("hidden_queries", hidden_queries)):
    if not is_int(x) or x < 1:
      raise ConfigError(f(name), f"must be an integer >= 1, got {x!r}")
  n, h, q = int(num_kv_pairs), int(num_hidden), int(hidden_queries)
  if q > h:
    raise ConfigError(f("hidden_queries"), f"must be <= num_hidden={h} (distinct hidden keys "
                      f"per example), got {q}")
  min_vocab = 2 * (n + h) + 2
  if not is_int(vocab_size) or vocab_size < min_vocab:
    raise ConfigError(
        f("vocab_size"),
        f"must be an integer >= 2*(num_kv_pairs + num_hidden) + 2 = {min_vocab} (the key "
        f"range [1, vocab_size//2) holds {h} hidden and {n} context keys, the value range "
        f"[vocab_size//2, vocab_size) {max(n, h)} distinct values), got {vocab_size!r}")
  min_len = 2 * n + 2 * (n + q)
  if not is_int(seq_len) or seq_len < min_len or seq_len % 2:
    raise ConfigError(
        f("seq_len"),
        f"must be an even integer >= 2*num_kv_pairs + 2*(num_kv_pairs + hidden_queries) = "
        f"{min_len} (the context plus one query slot per context and hidden key), got "
        f"{seq_len!r}")
  if (isinstance(power_a, (bool, np.bool_)) or not isinstance(power_a, (int, float, np.number))
      or not 0.0 < float(power_a) <= 1.0):
    raise ConfigError(f("power_a"), f"must be a number in (0, 1] (1 = uniform query "
                      f"placement; MQAR uses 0.01), got {power_a!r}")
  if not isinstance(random_non_queries, (bool, np.bool_)):
    raise ConfigError(f("random_non_queries"),
                      f"must be True or False, got {random_non_queries!r}")
  if not is_int(hidden_seed) or not 0 <= hidden_seed < _MAX_SEED:
    raise ConfigError(f("hidden_seed"), f"must be an integer in [0, 2**32), got "
                      f"{hidden_seed!r}")


@functools.lru_cache(maxsize=64)
def _checked(*args) -> None:
  _validate(*args)


def _gaps(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
  """n distinct slots drawn one after another with probabilities ``p`` (renormalised), by
  exponential keys, as MQAR draws its query gaps."""
  key = rng.standard_exponential(p.shape[0]) / p
  first = np.argpartition(key, n - 1)[:n] if n < p.shape[0] else np.arange(p.shape[0])
  return first[np.argsort(key[first], kind="stable")]


@functools.lru_cache(maxsize=64)
def hidden_dictionary(vocab_size: int, num_hidden: int, hidden_seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """``(keys, values)``, int64[H] each: the hidden dictionary of ``hidden_seed`` (read-only
  arrays; a pure function of the three arguments)."""
  v, h = int(vocab_size), int(num_hidden)
  half = v // 2
  rng = np.random.default_rng([int(hidden_seed), _DICT_STREAM, h])
  keys = 1 + rng.choice(half - 1, size=h, replace=False)
  values = half + rng.choice(v - half, size=h, replace=False)
  keys.setflags(write=False)
  values.setflags(write=False)
  return keys, values


def mqar_hidden_example(index: int, *, seed: int, vocab_size: int, seq_len: int,
                        num_kv_pairs: int, power_a: float = 0.01,
                        random_non_queries: bool = True, num_hidden: int = 8,
                        hidden_queries: int = 2, hidden_seed: int = 0
                        ) -> dict[str, np.ndarray]:
  """Example ``index`` of stream ``seed``: ``inputs`` int32[T], ``targets`` int32[T],
  ``loss_mask`` float32[T] (1 at the ``num_kv_pairs + hidden_queries`` query positions)."""
  _checked(vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries, num_hidden,
           hidden_queries, hidden_seed)
  if not is_int(seed) or not 0 <= seed < _MAX_SEED:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if not is_int(index) or index < 0:
    raise ValueError(f"index must be a non-negative integer, got {index!r}")

  v, t, n, q = int(vocab_size), int(seq_len), int(num_kv_pairs), int(hidden_queries)
  half = v // 2
  hkeys, hvalues = hidden_dictionary(v, num_hidden, hidden_seed)
  rng = np.random.default_rng([int(seed), int(index)])

  free = np.setdiff1d(np.arange(1, half), hkeys)  # keys a context may use
  keys = free[rng.choice(free.shape[0], size=n, replace=False)]
  values = half + rng.choice(v - half, size=n, replace=False)
  asked = rng.choice(hkeys.shape[0], size=q, replace=False)
  context = 2 * n
  space = (t - context) // 2
  gaps = _gaps(rng, query_gap_probs(space, float(power_a)), n + q)
  order = rng.permutation(n + q)  # which query goes to which slot
  query_keys = np.concatenate([keys, hkeys[asked]])[order]
  query_values = np.concatenate([values, hvalues[asked]])[order]
  query_pos = context + 2 * gaps

  return assemble(rng, v, t, keys, values, query_keys, query_values, query_pos,
                  random_non_queries)


def hidden_query_mask(inputs: np.ndarray, loss_mask: np.ndarray, *, vocab_size: int,
                      num_hidden: int, hidden_seed: int) -> np.ndarray:
  """bool[..., T]: the query positions (``loss_mask`` 1) that ask a hidden key; the other
  query positions ask a context key."""
  hkeys, _ = hidden_dictionary(vocab_size, num_hidden, hidden_seed)
  return (np.asarray(loss_mask) > 0) & np.isin(np.asarray(inputs), hkeys)


def mqar_hidden_oracle(inputs: np.ndarray, loss_mask: np.ndarray, *, vocab_size: int,
                       num_kv_pairs: int, num_hidden: int, hidden_seed: int) -> np.ndarray:
  """The answers by construction, int64[..., N + Q] in position order: a context key's value
  is the token after its occurrence in the context (positions ``< 2N``), a hidden key's is
  the hidden dictionary's. ``loss_mask`` marks the query positions."""
  inputs, loss_mask = np.asarray(inputs), np.asarray(loss_mask)
  if inputs.ndim > 1:
    return np.stack([mqar_hidden_oracle(x, m, vocab_size=vocab_size,
                                        num_kv_pairs=num_kv_pairs, num_hidden=num_hidden,
                                        hidden_seed=hidden_seed)
                     for x, m in zip(inputs, loss_mask)])
  n = int(num_kv_pairs)
  table = {int(k): int(v) for k, v in zip(inputs[0:2 * n:2], inputs[1:2 * n:2])}
  hkeys, hvalues = hidden_dictionary(vocab_size, num_hidden, hidden_seed)
  table.update({int(k): int(v) for k, v in zip(hkeys, hvalues)})
  return np.array([table[int(inputs[p])] for p in np.flatnonzero(loss_mask > 0)], np.int64)
