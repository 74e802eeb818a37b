"""Synthetic tasks: each is a pure function of (seed, index) returning one example.

``TASKS`` names every ``data.task`` (these and ``text``); the pipeline and the config
validation both read it."""

from lcm.data.tasks.mqar import MQARConfig, mqar_example, query_gap_probs
from lcm.data.tasks.mqar_hidden import (MQARHiddenConfig, hidden_dictionary,
                                        hidden_query_mask, mqar_hidden_example,
                                        mqar_hidden_oracle)
from lcm.data.tasks.passkey import PasskeyConfig, passkey_example, passkey_oracle
from lcm.data.tasks.joint_recall import (JointRecallConfig, joint_recall_example,
                                         joint_recall_oracle)
from lcm.data.tasks.phonebook import PhonebookConfig, phonebook_example, phonebook_oracle
from lcm.data.tasks.selective_copy import (SelectiveCopyConfig, selective_copy_example,
                                           selective_copy_oracle)
from lcm.data.tasks.sequence_order import (SequenceOrderConfig, sequence_order_example,
                                           sequence_order_oracle)
from lcm.data.tasks.set_disjointness import (SetDisjointnessConfig, set_disjointness_example,
                                             set_disjointness_oracle)

# Every data.task: the synthetic tasks above and the text corpus (lcm.data.text).
TASKS = ("mqar", "passkey", "text", "joint_recall", "set_disjointness", "selective_copy",
         "sequence_order", "phonebook", "mqar_hidden")

__all__ = ["MQARConfig", "mqar_example", "query_gap_probs", "MQARHiddenConfig",
           "mqar_hidden_example", "mqar_hidden_oracle", "hidden_dictionary",
           "hidden_query_mask", "PasskeyConfig", "passkey_example",
           "passkey_oracle", "JointRecallConfig", "joint_recall_example", "joint_recall_oracle",
           "PhonebookConfig", "phonebook_example", "phonebook_oracle", "SelectiveCopyConfig",
           "selective_copy_example", "selective_copy_oracle", "SequenceOrderConfig",
           "sequence_order_example", "sequence_order_oracle", "SetDisjointnessConfig",
           "set_disjointness_example", "set_disjointness_oracle", "TASKS"]
