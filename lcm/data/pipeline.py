"""grain pipelines over the synthetic tasks.

Every example is a pure function of ``(seed, index)``, so the whole stream is defined by
index arithmetic and can be regenerated or resumed anywhere:

* Global example index ``step * G + r`` is row ``r`` of the global batch of ``step``
  (``G`` = global batch size).
* Sharding is by contiguous blocks: with ``P`` processes and per-process batch
  ``b = G // P``, process ``p`` gets rows ``p*b .. p*b + b-1`` of each global batch, i.e.
  global indices ``step*G + p*b + j``. Concatenating the per-process batches in process
  order therefore gives exactly the global batch, whatever ``P`` is.
* No shuffle: examples are i.i.d. draws indexed by an integer (each one has its own
  ``np.random.default_rng([seed, index])``), so the index order is already a random order.
* Everything runs in-process (no worker processes, no reader threads): the data is tiny
  and generating it is cheaper than moving it between processes.

Batches are dicts of numpy arrays: ``inputs`` int32[b, T], ``targets`` int32[b, T],
``loss_mask`` float32[b, T].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import grain
import numpy as np

from layers.common import ConfigError
from lcm.data import text as text_lib
from lcm.data.tasks import TASKS
from lcm.data.tasks.mqar import MQARConfig, mqar_example
from lcm.data.tasks.passkey import PasskeyConfig, passkey_example
from lcm.data.tasks.joint_recall import JointRecallConfig, joint_recall_example
from lcm.data.tasks.mqar_hidden import MQARHiddenConfig, mqar_hidden_example
from lcm.data.tasks.phonebook import PhonebookConfig, phonebook_example
from lcm.data.tasks.selective_copy import SelectiveCopyConfig, selective_copy_example
from lcm.data.tasks.sequence_order import SequenceOrderConfig, sequence_order_example
from lcm.data.tasks.set_disjointness import SetDisjointnessConfig, set_disjointness_example

__all__ = [
    "TASKS",
    "eval_seed",
    "task_example_fn",
    "train_dataset",
    "train_iterator",
    "eval_batches",
]

# Effectively infinite: 2**40 examples per process.
_NUM_EXAMPLES = 2**40

# Held-out examples come from seed + _EVAL_SEED_OFFSET (Zoology uses seed + 10 for its
# test set too), so the eval set never shares a random stream with the training run.
_EVAL_SEED_OFFSET = 10

# Read options for in-process iteration: no reader threads, so the only state is the
# next index and get_state()/set_state() are exact.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def eval_seed(seed: int) -> int:
  """The seed of the held-out stream that goes with training seed ``seed``."""
  return (int(seed) + _EVAL_SEED_OFFSET) % 2**32


def _get(cfg: Any, name: str, default: Any) -> Any:
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


def _mqar_config(data_cfg: Any) -> MQARConfig:
  d = MQARConfig()
  cfg = MQARConfig(
      vocab_size=_get(data_cfg, "vocab_size", d.vocab_size),
      seq_len=_get(data_cfg, "seq_len", d.seq_len),
      num_kv_pairs=_get(data_cfg, "num_kv_pairs", d.num_kv_pairs),
      power_a=_get(data_cfg, "power_a", d.power_a),
      random_non_queries=_get(data_cfg, "random_non_queries", d.random_non_queries),
  )
  return cfg.validate("data")


def passkey_config(data_cfg: Any) -> PasskeyConfig:
  d = PasskeyConfig()
  return PasskeyConfig(**{
      f.name: _get(data_cfg, f.name, getattr(d, f.name))
      for f in dataclasses.fields(PasskeyConfig)}).validate("data")


def _task_config(cls, data_cfg: Any):
  """``cls`` (a task's frozen config dataclass) from ``data_cfg``: missing fields take the
  dataclass defaults; validated with fields named ``data.<field>``."""
  d = cls()
  return cls(**{f.name: _get(data_cfg, f.name, getattr(d, f.name))
                for f in dataclasses.fields(cls)}).validate("data")


def joint_recall_config(data_cfg: Any) -> JointRecallConfig:
  return _task_config(JointRecallConfig, data_cfg)


def set_disjointness_config(data_cfg: Any) -> SetDisjointnessConfig:
  return _task_config(SetDisjointnessConfig, data_cfg)


def selective_copy_config(data_cfg: Any) -> SelectiveCopyConfig:
  return _task_config(SelectiveCopyConfig, data_cfg)


def sequence_order_config(data_cfg: Any) -> SequenceOrderConfig:
  return _task_config(SequenceOrderConfig, data_cfg)


def phonebook_config(data_cfg: Any) -> PhonebookConfig:
  return _task_config(PhonebookConfig, data_cfg)


def mqar_hidden_config(data_cfg: Any) -> MQARHiddenConfig:
  return _task_config(MQARHiddenConfig, data_cfg)


# Synthetic tasks beyond mqar / passkey: name -> (config builder, example function).
SYNTHETIC_TASKS = {
    "joint_recall": (joint_recall_config, joint_recall_example),
    "set_disjointness": (set_disjointness_config, set_disjointness_example),
    "selective_copy": (selective_copy_config, selective_copy_example),
    "sequence_order": (sequence_order_config, sequence_order_example),
    "phonebook": (phonebook_config, phonebook_example),
    "mqar_hidden": (mqar_hidden_config, mqar_hidden_example),
}


def text_config(data_cfg: Any) -> text_lib.TextConfig:
  d = text_lib.TextConfig()
  return text_lib.TextConfig(**{
      f.name: _get(data_cfg, f.name, getattr(d, f.name))
      for f in dataclasses.fields(text_lib.TextConfig)}).validate("data")


def task_example_fn(data_cfg: Any, split: str = "train") -> Callable[[int, int], dict[str, np.ndarray]]:
  """``(seed, index) -> example`` for ``data_cfg.task``; validates the config first.

  ``data_cfg`` is an ``ml_collections.ConfigDict`` or any object with attributes: ``task``
  and that task's fields (missing fields take the task's defaults). ``split`` is "train"
  or "eval": synthetic tasks hold out by seed, text corpora by file (validation split).
  """
  task = _get(data_cfg, "task", None)
  if task == "text":
    cfg = text_config(data_cfg)
    if split == "train":
      return text_lib.train_example_fn(text_lib.load_corpus(cfg, "train"))
    return text_lib.eval_example_fn(text_lib.load_corpus(cfg, "validation"))
  if task == "mqar":
    kwargs = dataclasses.asdict(_mqar_config(data_cfg))
    return functools.partial(_call_with_seed, functools.partial(mqar_example, **kwargs))
  if task == "passkey":
    kwargs = dataclasses.asdict(passkey_config(data_cfg))
    return functools.partial(_call_with_seed, functools.partial(passkey_example, **kwargs))
  if task in SYNTHETIC_TASKS:
    builder, example = SYNTHETIC_TASKS[task]
    kwargs = dataclasses.asdict(builder(data_cfg))
    return functools.partial(_call_with_seed, functools.partial(example, **kwargs))
  raise ConfigError("data.task", f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def _call_with_seed(fn: Callable[..., dict], seed: int, index: int) -> dict:
  return fn(int(index), seed=int(seed))


def _check_seed(seed: Any, field: str = "seed") -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ConfigError(field, f"must be an integer in [0, 2**32), got {seed!r}")
  return int(seed)


def _per_process_batch(batch_size: int, process_index: int, process_count: int,
                       field: str) -> int:
  if isinstance(process_count, bool) or not isinstance(process_count, (int, np.integer)) or process_count < 1:
    raise ValueError(f"process_count must be an integer >= 1, got {process_count!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or batch_size < 1 or batch_size % process_count):
    raise ConfigError(
        field,
        f"must be a positive multiple of the process count {process_count} (each process "
        f"loads batch_size // process_count rows), got {batch_size!r}")
  return int(batch_size) // int(process_count)


def _global_index(local: int, *, base: int, global_batch: int, local_batch: int,
                  process_index: int) -> int:
  """Local example ``local`` of process ``process_index`` -> global example index."""
  step, row = divmod(int(local), local_batch)
  return base + step * global_batch + process_index * local_batch + row


def _sharded(example_fn, seed, *, num_examples, global_batch, process_index,
             process_count, field, base=0) -> grain.MapDataset:
  """Per-process MapDataset of batches (contiguous-block sharding, see module doc)."""
  local_batch = _per_process_batch(global_batch, process_index, process_count, field)
  num_local = (num_examples // global_batch) * local_batch
  to_global = functools.partial(_global_index, base=base, global_batch=global_batch,
                                local_batch=local_batch, process_index=process_index)
  ds = grain.MapDataset.range(num_local)
  ds = ds.map(to_global)
  ds = ds.map(functools.partial(example_fn, seed))
  return ds.batch(local_batch, drop_remainder=True)


def train_dataset(data_cfg: Any, *, seed: int, global_batch_size: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The endless training stream of this process: batches of ``global_batch_size // process_count``."""
  example_fn = task_example_fn(data_cfg)
  seed = _check_seed(seed)
  ds = _sharded(example_fn, seed, num_examples=_NUM_EXAMPLES * process_count,
                global_batch=global_batch_size, process_index=process_index,
                process_count=process_count, field="data.batch_size")
  return ds.to_iter_dataset(_READ_OPTIONS)


def train_iterator(data_cfg: Any, *, seed: int, global_batch_size: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """A checkpointable iterator over :func:`train_dataset` (``get_state``/``set_state``)."""
  return iter(train_dataset(data_cfg, seed=seed, global_batch_size=global_batch_size,
                            process_index=process_index, process_count=process_count))


def eval_batches(data_cfg: Any, *, seed: int, num_examples: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The fixed held-out set: ``num_examples // batch_size`` batches, this process's rows.

  Examples come from stream ``eval_seed(seed)`` (never the training stream of ``seed``),
  indices ``0 .. num_examples-1``; ``batch_size`` is global and sharded like training.
  """
  example_fn = task_example_fn(data_cfg, split="eval")
  seed = _check_seed(seed)
  if _get(data_cfg, "task", None) == "text":
    rows = text_lib.load_corpus(text_config(data_cfg), "validation").num_rows
    if num_examples > rows:
      raise ConfigError("eval.num_examples", f"the validation split has only {rows} rows of "
                        f"seq_len={_get(data_cfg, 'seq_len', None)}; use at most that many")
  if (isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer))
      or num_examples < 1):
    raise ConfigError("eval.num_examples", f"must be a positive integer, got {num_examples!r}")
  _per_process_batch(batch_size, process_index, process_count, "eval.batch_size")
  if num_examples % batch_size:
    raise ConfigError(
        "eval.num_examples",
        f"must be a multiple of eval.batch_size={batch_size} so every eval batch has the "
        f"same shape, got {num_examples}")
  ds = _sharded(example_fn, eval_seed(seed), num_examples=num_examples,
                global_batch=batch_size, process_index=process_index,
                process_count=process_count, field="eval.batch_size")
  return [ds[i] for i in range(len(ds))]
