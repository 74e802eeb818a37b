"""Synthetic tasks: each is a pure function of (seed, index) returning one example."""

from lcm.data.tasks.mqar import MQARConfig, mqar_example, query_gap_probs
from lcm.data.tasks.passkey import PasskeyConfig, passkey_example, passkey_oracle

__all__ = ["MQARConfig", "mqar_example", "query_gap_probs", "PasskeyConfig", "passkey_example",
           "passkey_oracle"]
