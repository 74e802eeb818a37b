"""Benchmarks: ratios measured inside one process (the machine is shared and noisy).

    python -m experiments.bench --what=decode --mixers=attention,mamba2,gated_deltanet \
        --contexts=1024,32768 --out=results/bench_decode
    python -m experiments.bench kernels --repeats=3 --out=results/bench_kernels
    python -m experiments.bench layers --layers_only=mamba2,mamba2_jax --repeats=9 \
        --out=results/bench_layers_mamba2
    python -m experiments.bench swa --repeats=5 --out=results/bench_swa
    python -m experiments.bench auto --out=results/bench_auto
    JAX_NUM_CPU_DEVICES=8 python -m experiments.bench context_parallel \
        --out=results/context_parallel

One mode per module, chosen by ``--what`` or the one positional argument (``decode`` by
default); each module's docstring says what it times:

  * :mod:`experiments.bench.decode`: per-token decode latency and state memory vs context.
  * :mod:`experiments.bench.kernels`: the scan kernels' ``xla`` form vs their per-token
    ``reference`` vs dense causal attention, fwd+bwd, with scaling exponents and GFLOP/s.
  * :mod:`experiments.bench.layers`: whole lcm mixers vs the published peers, whose
    construction and timing live in :mod:`experiments.bench.peers`.
  * :mod:`experiments.bench.swa`: block-sparse sliding-window vs dense causal attention.
  * :mod:`experiments.bench.auto`: every kernel's implementations at short and long shapes,
    the winners that each kernel's ``AUTO`` table (``impl="auto"``) records.
  * :mod:`experiments.bench.context_parallel`: per-device memory of a mixer's fwd + bwd
    split over ``sequence`` = 1, 2, 4, 8 devices (compiled, not run).
  * :mod:`experiments.bench.common`: the shared flags (``--repeats``, ``--out``,
    ``--huge_pages``, ``--max_call_seconds``), the interleaved timing loop and medians, the
    scaling-exponent fit, the huge-pages re-exec and the JSON (+ PNG) writer, which stamps
    every report with its provenance (``lcm.provenance``: command, commit, the code paths
    the figures depend on and the files written).

A later mode is one more module with its flags and a ``main()``,
its name added to ``common.MODES``, imported below and dispatched in ``__main__``.

Every mode compiles and warms up each case first, then times all cases interleaved in
``--repeats`` rounds and reports medians; every mode re-runs itself under
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` unless ``--nohuge_pages``
(``common.with_huge_pages``).
"""

from __future__ import annotations

# Every mode's flags are defined at import (the README's commands are checked against them).
from experiments.bench import (auto, common, context_parallel, decode, kernels,  # noqa: F401
                               layers, peers, swa)

__all__ = ["auto", "common", "context_parallel", "decode", "kernels", "layers", "peers",
           "swa"]
