"""Data: grain pipelines over synthetic tasks that are pure functions of (seed, index)."""

from lcm.data.pipeline import (
    TASKS,
    eval_batches,
    eval_seed,
    task_example_fn,
    train_dataset,
    train_iterator,
)
from lcm.data.tasks import MQARConfig, mqar_example

__all__ = [
    "TASKS",
    "MQARConfig",
    "eval_batches",
    "eval_seed",
    "mqar_example",
    "task_example_fn",
    "train_dataset",
    "train_iterator",
]
