"""Synthetic tasks: each is a pure function of (seed, index) returning one example."""

from lcm.data.tasks.mqar import MQARConfig, mqar_example, query_gap_probs

__all__ = ["MQARConfig", "mqar_example", "query_gap_probs"]
