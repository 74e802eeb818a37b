"""Linear-attention token mixers, one module per mixer family:

  * :mod:`.linear_attention`: :class:`LinearAttention`, linear attention with a feature map
    (Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers
    with Linear Attention").
  * :mod:`.retnet`: :class:`RetNet`, multi-scale retention (Sun et al. 2023, "Retentive
    Network: A Successor to Transformer for Large Language Models").
  * :mod:`.gla`: :class:`GLA`, gated linear attention (Yang et al. 2023, "Gated Linear
    Attention Transformers with Hardware-Efficient Training").
  * :mod:`.deltanet`: :class:`DeltaNet` (Yang et al. 2024, "Parallelizing Linear
    Transformers with the Delta Rule over Sequence Length") and :class:`GatedDeltaNet`
    (Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule").
  * :mod:`.based`: :class:`Based` (Arora et al. 2024, "Simple linear attention language
    models balance the recall-throughput tradeoff").
  * :mod:`.jrt`: :class:`JRT`, prefix linear attention (Arora et al. 2024, "Just read twice:
    closing the recall gap for recurrent language models").
  * :mod:`.rwkv7`: :class:`RWKV7`, RWKV-7 time mixing, and :class:`RWKV7ChannelMix`, its
    channel-mixing MLP (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State
    Evolution").
  * :mod:`.common`: the shared base classes and config validators.

Kernels: ``kernels.chunked_scan.linear_recurrence`` (all but the DeltaNets and RWKV-7),
``kernels.delta_rule.delta_rule`` (DeltaNet, Gated DeltaNet) and ``kernels.dplr.dplr_recurrence``
(RWKV-7). Every mixer follows the mixer contract of docs/design.md.
"""

from __future__ import annotations

from layers.linear_attention.based import Based, BasedConfig
from layers.linear_attention.deltanet import (DeltaNet, DeltaNetConfig, GatedDeltaNet,
                                              GatedDeltaNetConfig)
from layers.linear_attention.gla import GLA, GLAConfig
from layers.linear_attention.jrt import JRT, JRTConfig
from layers.linear_attention.linear_attention import LinearAttention, LinearAttentionConfig
from layers.linear_attention.retnet import RetNet, RetNetConfig, retnet_log_decays
from layers.linear_attention.rwkv7 import RWKV7, RWKV7ChannelMix, RWKV7Config, token_shift

__all__ = [
    "LinearAttention", "LinearAttentionConfig", "RetNet", "RetNetConfig", "GLA", "GLAConfig",
    "DeltaNet", "DeltaNetConfig", "GatedDeltaNet", "GatedDeltaNetConfig", "Based",
    "BasedConfig", "JRT", "JRTConfig", "retnet_log_decays", "RWKV7", "RWKV7Config",
    "RWKV7ChannelMix", "token_shift",
]
