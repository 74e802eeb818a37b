"""State-space token mixers, one module per mixer:

  * :mod:`.s4d`: :class:`S4D` (``s4d``), diagonal S4 (Gu, Gupta, Goel & Re 2022, "On the
    Parameterization and Initialization of Diagonal State Space Models").
  * :mod:`.mamba`: :class:`Mamba` (``mamba``), the selective scan (Gu & Dao 2023, "Mamba:
    Linear-Time Sequence Modeling with Selective State Spaces").
  * :mod:`.mamba2`: :class:`Mamba2` (``mamba2``), SSD (Dao & Gu 2024, "Transformers are
    SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
    Duality").
  * :mod:`.common`: the shared config checks and initialisers.

Kernels: ``kernels.diag_scan.diagonal_recurrence`` (S4D, Mamba) and
``kernels.chunked_scan.linear_recurrence`` (Mamba2). Every mixer follows the mixer contract
of docs/design.md; packed documents reset the scans at each document's first token.
"""

from __future__ import annotations

from kernels.common import IMPLS
from layers.common import doc_starts as segment_starts
from layers.common import dt_bias_init
from layers.ssm.mamba import Mamba, MambaConfig
from layers.ssm.mamba2 import Mamba2, Mamba2Config
from layers.ssm.s4d import S4D, S4D_INITS, S4D_PARALLEL, S4DConfig, s4d_imag_init

__all__ = [
    "IMPLS", "S4D_INITS", "S4D_PARALLEL", "segment_starts", "dt_bias_init", "s4d_imag_init",
    "S4D", "S4DConfig", "Mamba", "MambaConfig", "Mamba2", "Mamba2Config",
]
