"""Memory mixtures: Memory Caching over a matrix-memory mixer or Titans' neural memory, and
Mixture-of-Memories.

References (the math and inits; the code is lcm's own):
  * Behrouz, Li, Deng, Zhong, Razaviyayn, Mirrokni 2026, "Memory Caching: RNNs with Growing
    Memory" (arXiv 2602.24281) (:class:`MemoryCaching`, module ``memory_caching``; its inner
    memories in ``memories``).
  * Du, Sun, Lan, Hu, Cheng 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories"
    (:class:`MoM`, module ``mom``); layer as OpenSparseLLMs/MoM
    ``mom/layers/mom_gated_deltanet.py``, load balance as its ``load_balancing_loss_func``.
  * Fedus, Zoph, Shazeer 2021, "Switch Transformers" (eqs. 4-6: the load-balance loss).
"""

from __future__ import annotations

from layers.memory_mixtures.memories import INNER_MIXERS
from layers.memory_mixtures.memory_caching import (MemoryCaching, MemoryCachingConfig,
                                                   cache_weights)
from layers.memory_mixtures.mom import MoM, MoMConfig, load_balance_loss

__all__ = ["MemoryCaching", "MemoryCachingConfig", "MoM", "MoMConfig", "INNER_MIXERS",
           "load_balance_loss", "cache_weights"]
