"""Sequence-mixing kernels, one folder per op; each imports nothing but jax.

Every op has a single public function with ``impl=`` dispatch (``"reference"``, ``"xla"``,
``"pallas_tpu"``, ``"pallas_gpu"``, ``"auto"``) and a ``jax.custom_vjp`` for its Pallas
implementations. See ``docs/design.md`` ("The kernel contract").

  * :mod:`kernels.chunked_scan`: ``linear_recurrence`` -- gated linear recurrence
    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t`` (linear attention,
    RetNet, Mamba2/SSD, GLA).
  * :mod:`kernels.delta_rule` (DeltaNet, Gated DeltaNet) and :mod:`kernels.diag_scan`
    (element-wise ``h_t = a_t h_{t-1} + b_t``) follow the same contract.
  * :mod:`kernels.block_sparse`: ``block_sparse_attention`` -- flash attention in which each
    query block visits only its listed key blocks (splash-attention index lists), with the
    list builders ``causal_blocks``, ``sliding_window_blocks`` and ``topk_blocks``
    (sliding-window and landmark attention).
  * :mod:`kernels.neural_memory`: ``memory_recurrence`` -- the Titans neural memory (an MLP
    trained at test time by momentum gradient steps with forgetting, gradients taken at the
    chunk-start weights); ``reference`` (per token) and ``xla`` (chunk-parallel), no Pallas form.

:mod:`kernels.common` holds what the ops share: ``auto_impl``, the static
``KernelConfig`` of a Pallas call, front padding in time, power-of-two padding for Triton
tiles, and exact in-chunk log-decay sums (``segment_sum`` / ``suffix_sum``).
"""
