"""Titans: a neural long-term memory (LMM) and the MAC / MAG / MAL architectures.

Paper: Behrouz, Zhong & Mirrokni 2025, "Titans: Learning to Memorize at Test Time".

  * :mod:`layers.neural_memory.lmm`: :class:`TitansLMM` (``titans_lmm``), the long-term
    memory as a token mixer: an MLP whose weights are trained online per token by gradient
    descent on ``||M(W, k_t) - v_t||^2 / Dh`` with momentum and forgetting, read with q_t.
    Its recurrence (:func:`memory_recurrence`) and the memory network (:class:`MemoryMLP`)
    are the kernel op :mod:`kernels.neural_memory`.
  * :mod:`layers.neural_memory.window`: :class:`TitansMAG` (``titans_mag``, memory as a
    gate) and :class:`TitansMAL` (``titans_mal``, memory as a layer), with sliding-window
    attention.
  * :mod:`layers.neural_memory.mac`: :class:`TitansMAC` (``titans_mac``, memory as
    context), segment attention over the memory's read of the segment.
  * :mod:`layers.neural_memory.prefix_attention`: attention with the persistent-memory
    tokens, shared by the three architectures; :mod:`layers.neural_memory.common`: shared
    helpers.
"""

from __future__ import annotations

from kernels.neural_memory import ACTIVATIONS, MemoryMLP, Weights, memory_recurrence
from layers.neural_memory.lmm import TitansLMM, TitansLMMConfig
from layers.neural_memory.mac import TitansMAC, TitansMACConfig
from layers.neural_memory.window import TitansMAG, TitansMAGConfig, TitansMAL, TitansMALConfig

__all__ = [
    "ACTIVATIONS", "MemoryMLP", "Weights", "memory_recurrence", "TitansLMM", "TitansLMMConfig", "TitansMAC",
    "TitansMACConfig", "TitansMAG", "TitansMAGConfig", "TitansMAL", "TitansMALConfig",
]
