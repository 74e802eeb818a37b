"""Multi-query associative recall (MQAR), as defined by Zoology.

Reference: Arora, Eyuboglu et al., "Zoology: Measuring and improving recall in efficient
language models" (2023); generator ``_mqar`` in HazyResearch/zoology,
``zoology/data/associative_recall.py``. This is an independent implementation of the
same distribution, made a pure function of ``(seed, index)`` so that any example can be
regenerated and a data iterator can be resumed exactly.

Layout of one example (vocabulary ``V``, input length ``T``, ``N`` key-value pairs),
built as a sequence ``full`` of length ``T + 1``; ``inputs = full[:-1]``:

* positions ``0 .. 2N-1``: the context ``k1 v1 k2 v2 ... kN vN``; the ``N`` keys are
  distinct tokens from ``[1, V//2)``, the ``N`` values distinct tokens from ``[V//2, V)``.
* ``space = (T - 2N) // 2`` candidate query slots; the gaps ``g_1..g_N`` are drawn from
  ``0 .. space-1`` without replacement with ``P(g) ∝ a * (g+1)**(a-1)`` (a power law:
  with the default ``a = 0.01`` queries cluster right after the context; ``a = 1`` is
  uniform). Key ``k_j`` is repeated at position ``2N + 2*g_j``. Every key is queried once.
* every other position is a filler: ``0``, or, with ``random_non_queries`` (Zoology's
  default), a uniform random token from ``[0, V)`` (fillers may collide with keys or
  values, exactly as in Zoology).

Targets and loss mask: at a query position ``2N + 2*g_j`` the target is the paired value
``v_j`` and ``loss_mask`` is 1; there are exactly ``N`` such positions. As in Zoology the
value is *not* written into the inputs after the query (the next input token is a
filler); everywhere else the target is simply the next token ``full[t+1]`` with
``loss_mask`` 0 (Zoology puts the ignore label -100 there).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from layers.common import ConfigError

__all__ = ["MQARConfig", "mqar_example", "query_gap_probs"]

# The seed and the example index are each mixed into numpy's SeedSequence as unsigned
# integers; keep the seed in 32 bits so (seed, index) pairs never alias.
_MAX_SEED = 2**32


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Hyper-parameters of the MQAR task (Zoology defaults)."""

  vocab_size: int = 8192
  seq_len: int = 64
  num_kv_pairs: int = 4
  power_a: float = 0.01
  random_non_queries: bool = True

  def validate(self, prefix: str = "data") -> "MQARConfig":
    """Raises ``ConfigError`` naming ``<prefix>.<field>`` for a bad value; returns self."""
    _validate(self.vocab_size, self.seq_len, self.num_kv_pairs, self.power_a,
              self.random_non_queries, prefix)
    return self

  def example(self, index: int, *, seed: int) -> dict[str, np.ndarray]:
    return mqar_example(index, seed=seed, **dataclasses.asdict(self))


def is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _validate(vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries,
              prefix: str = "data") -> None:
  f = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
  if not is_int(num_kv_pairs) or num_kv_pairs < 1:
    raise ConfigError(f("num_kv_pairs"),
                      f"must be an integer >= 1, got {num_kv_pairs!r}")
  n = int(num_kv_pairs)
  min_vocab = 2 * n + 2
  if not is_int(vocab_size) or vocab_size < min_vocab:
    raise ConfigError(
        f("vocab_size"),
        f"must be an integer >= 2*num_kv_pairs + 2 = {min_vocab} (keys are drawn from "
        f"[1, vocab_size//2) and values from [vocab_size//2, vocab_size), {n} distinct "
        f"of each), got {vocab_size!r}")
  min_len = 4 * n
  if not is_int(seq_len) or seq_len < min_len or seq_len % 2:
    raise ConfigError(
        f("seq_len"),
        f"must be an even integer >= 4*num_kv_pairs = {min_len} (2*num_kv_pairs "
        f"context tokens plus (seq_len - 2*num_kv_pairs)//2 >= num_kv_pairs query "
        f"slots; Zoology also requires it even), got {seq_len!r}")
  if (isinstance(power_a, (bool, np.bool_)) or not isinstance(power_a, (int, float, np.number))
      or not 0.0 < float(power_a) <= 1.0):
    raise ConfigError(
        f("power_a"),
        f"must be a number in (0, 1] (1 = uniform query placement, small values cluster "
        f"queries right after the context; Zoology uses 0.01), got {power_a!r}")
  if not isinstance(random_non_queries, (bool, np.bool_)):
    raise ConfigError(f("random_non_queries"),
                      f"must be True or False, got {random_non_queries!r}")


@functools.lru_cache(maxsize=64)
def query_gap_probs(space: int, power_a: float) -> np.ndarray:
  """P(gap = g) for g = 0..space-1: proportional to ``a * (g+1)**(a-1)`` (Zoology)."""
  i = np.arange(1, space + 1, dtype=np.float64)
  p = power_a * i ** (power_a - 1.0)
  p /= p.sum()
  p.setflags(write=False)
  return p


@functools.lru_cache(maxsize=64)
def _checked(vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries) -> None:
  _validate(vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries, prefix="")


def _weighted_sample_without_replacement(rng: np.random.Generator, p: np.ndarray,
                                         n: int) -> np.ndarray:
  """n distinct indices drawn one after another with probabilities ``p`` renormalised.

  Same distribution as ``rng.choice(len(p), n, replace=False, p=p)`` (what Zoology calls),
  computed with exponential keys (Efraimidis & Spirakis 2006: the order of ``E_i / p_i``,
  ``E_i ~ Exp(1)``, is the order of successive weighted draws), which is ~10x faster.
  """
  key = rng.standard_exponential(p.shape[0]) / p
  first = np.argpartition(key, n - 1)[:n] if n < p.shape[0] else np.arange(p.shape[0])
  return first[np.argsort(key[first], kind="stable")]


def mqar_example(
    index: int,
    *,
    seed: int,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> dict[str, np.ndarray]:
  """Example ``index`` of the MQAR stream ``seed``; a pure function of its arguments.

  Returns ``inputs`` int32[T], ``targets`` int32[T] and ``loss_mask`` float32[T] (1 at the
  ``num_kv_pairs`` answer positions, 0 elsewhere). See the module docstring for the layout.
  """
  _checked(vocab_size, seq_len, num_kv_pairs, power_a, random_non_queries)
  if not is_int(seed) or not 0 <= seed < _MAX_SEED:
    raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
  if not is_int(index) or index < 0:
    raise ValueError(f"index must be a non-negative integer, got {index!r}")

  v, t, n = int(vocab_size), int(seq_len), int(num_kv_pairs)
  half = v // 2
  context = 2 * n
  space = (t - context) // 2
  rng = np.random.default_rng([int(seed), int(index)])

  keys = 1 + rng.choice(half - 1, size=n, replace=False)           # [1, V//2)
  values = half + rng.choice(v - half, size=n, replace=False)      # [V//2, V)
  gaps = _weighted_sample_without_replacement(rng, query_gap_probs(space, float(power_a)), n)
  query_pos = context + 2 * gaps

  return assemble(rng, v, t, keys, values, keys, values, query_pos, random_non_queries)


def assemble(rng, vocab_size, seq_len, keys, values, query_keys, query_values, query_pos,
             random_non_queries):
  """The example row: ``keys`` / ``values`` interleaved at the start, ``query_keys`` at
  ``query_pos`` with ``query_values`` as their targets (the loss mask), the rest 0 or, with
  ``random_non_queries``, random tokens drawn from ``rng`` (also used by ``mqar_hidden``)."""
  t, context = int(seq_len), 2 * len(keys)
  full = np.zeros(t + 1, dtype=np.int64)
  full[0:context:2] = keys
  full[1:context:2] = values
  full[query_pos] = query_keys
  if random_non_queries:
    filler = np.ones(t + 1, dtype=bool)
    filler[:context] = False
    filler[query_pos] = False
    noise = rng.integers(0, int(vocab_size), size=t + 1)
    full[filler] = noise[filler]

  inputs = full[:-1].astype(np.int32)
  targets = full[1:].astype(np.int32)
  targets[query_pos] = query_values
  loss_mask = np.zeros(t, dtype=np.float32)
  loss_mask[query_pos] = 1.0
  return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}
