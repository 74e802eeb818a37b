"""Context (sequence) parallelism: one long sequence split over the ``sequence`` mesh axis.

With a mesh whose ``sequence`` axis has n > 1 devices, token ``t`` of a length-T row lives
on shard ``r = t // L`` (``L = T / n``). Per-token work (projections, norms, MLPs) needs no
communication; what crosses shard boundaries is what a mixer carries along time, and this
module supplies it:

* **Halo** (:func:`halo`): the last ``w`` tokens of the previous shards, by ``ppermute``
  (``ceil(w / L)`` hops; ``fill`` before the sequence start). Short causal convolutions
  need ``w = K - 1`` (:func:`with_history`), sliding-window attention ``w = window - 1``.

* **Affine state hand-off** (:func:`exclusive_affine_prefix`). A recurrence over a shard
  maps its incoming state to its outgoing one by ``S -> A_r S + B_r``. All shards
  all-gather the small ``(A_j, B_j)`` and each forms its incoming state

      S_in(r) = sum_{j<r} (prod_{j<m<r} A_m) B_j + (prod_{m<r} A_m) S_0

  For a diagonal ``A`` (a decay per head or per key channel) the products are taken in log
  space: ``log prod_{j<m<r} A_m`` is the sum of exactly the ``log A_m`` in between, masked
  before ``exp`` (``-inf`` = a reset inside the shard). A dense ``A`` (``[Dk, Dk]``, the
  delta-rule family) is composed in shard order, n small matmuls. Cost: each device
  receives ``n - 1`` states (``n`` state-sized buffers in memory), independent of T.

* **Linear recurrence** (:func:`linear_recurrence`, a drop-in for
  ``kernels.chunked_scan.linear_recurrence``: ``S_t = diag(e^{g_t}) S_{t-1} + k_t v_t^T``,
  ``o_t = S_t^T q_t``). Each shard (1) runs the kernel from a zero state: outputs ``o^loc``
  and final state ``B_r``; (2) ``A_r = exp(sum of the shard's log decays)``, 0 when a
  document starts inside the shard; (3) the prefix gives ``S_in(r)``; (4) adds S_in's
  contribution to the outputs,

      o_t += S_in^T (q_t * exp(c_t)),   c_t = sum_{s <= t in the shard} g_s,

  for the tokens before the shard's first document start (zero from there on). The
  correction costs one ``[L, Dk] x [Dk, Dv]`` matmul per head and shard, i.e. one chunk's
  state contribution, instead of a second pass of the kernel from ``S_in`` (2x the scan).
  A document that starts exactly on a shard boundary has ``reset`` at the shard's first
  token, so ``A_r = 0`` and the correction is zero: nothing leaks. The full sequence's
  final state is the inclusive prefix over all shards, computed on every shard from the
  gathered values (``initial_state`` enters as ``S_0``), so chunked prefill works too.
  With bf16 inputs the kernel's bf16 ``o^loc`` is rounded once before the fp32 correction
  is added (at most one extra bf16 rounding). This shard_map runs with ``check_vma=False``:
  the Pallas kernels declare no varying-axes type on their outputs (``check_vma=True``
  rejects them); its one replicated input, ``initial_state``, still gets its gradient
  summed over the shards by the transpose (tested with the TPU kernel interpreted).

* **Delta rule** (:func:`delta_rule`, a drop-in for ``kernels.delta_rule.delta_rule``:
  DeltaNet, Gated DeltaNet, MoM). The shard transition ``A_r`` is dense (the product of
  the shard's ``a_t (I - beta_t k_t k_t^T)``). One kernel pass with the values widened to
  ``[v | 0]`` from the state ``[0 | I]`` gives ``o^loc``, ``B_r``, ``A_r`` and
  ``u_t = A_{<=t}^T q_t`` (the update acts on each state column separately); the dense
  prefix gives ``S_in`` and ``o_t += S_in^T u_t`` is exact. Cost: ``Dv + Dk`` value
  columns in the one local pass (about 2x the state work for ``Dk = Dv``).
  The diagonal-plus-low-rank recurrence (:func:`dplr`, a drop-in for
  ``kernels.dplr.dplr_recurrence``: RWKV-7) also acts on each state column separately and
  is split the same way.

* **Diagonal recurrence** (:func:`diagonal_recurrence`, a drop-in for
  ``kernels.diag_scan.diagonal_recurrence``: Mamba, S4D with complex modes). Per channel
  ``log A_r = sum of the shard's log a``; ``h_t += exp(c_t) h_in``.

* **Sequential hand-off** (:func:`sequential`: the Titans memory, whose update is an MLP
  trained online and so not affine in its state). Shard r starts from shard r - 1's final
  state: n rounds, only shard i computing in round i. No speed-up; each device holds only
  its T / n tokens' activations.

* **Attention** (:func:`attention`). Full causal attention all-gathers K and V (and the
  segment ids) over ``sequence``: each device holds ``[B, T, Hkv, Dh]`` K and V and a
  ``[B, H, L, T]`` score block, so memory is O(T) per device for K/V and O(L T) for the
  scores; ring attention (K/V blocks passed around with an online softmax, O(L) K/V
  memory) is the follow-up. The mask uses global positions (``r L + i``) and segment ids.
  Sliding-window attention with ``window - 1 < T - L`` takes a halo of ``window - 1``
  keys and values instead: ``[B, H, L, L + window - 1]`` scores, ``ceil((window-1)/L)``
  ppermute hops.

* **Gathered rows** (:func:`gathered_rows`): the all-gather of attention for maps whose
  rows are more than a masked softmax. Landmark attention's grouped softmax and top-k
  retrieval score each query against every earlier landmark and block, and a block's
  tokens share its landmark's probability, so each shard gathers the un-rotated K / V and
  segment ids and computes its own query rows exactly as the unsplit layer does (global
  positions, global block layout). In the LM, ``mesh.sequence`` must divide ``seq_len /
  (block_size - 1)`` so that the landmark-extended row's shards hold whole blocks.

How a mixer learns the mesh. The trainer enters ``jax.sharding.use_abstract_mesh`` with
its mesh inside the traced step when ``mesh.sequence > 1`` (:func:`sequence_context`). The
entry points here (:func:`linear_recurrence`, :func:`delta_rule`,
:func:`diagonal_recurrence`, :func:`sequential`, :func:`with_history`, :func:`attention`) read
the context mesh with :func:`sequence_mesh` at trace time and, when its ``sequence`` axis
has more than one device and divides the length, run their body in ``jax.shard_map`` over
that axis alone (the other mesh axes stay automatic, so data / fsdp / tensor sharding is
unchanged); otherwise they run the plain single-device code. So the mixer contract does
not change (``mixer(x, segment_ids)`` on global ``[B, T, D]`` arrays), a mixer needs no
mesh argument or new method, the context is part of the traced function (no jit cache can
serve a trace made without it), and with ``mesh.sequence = 1`` nothing is traced
differently. (The alternative, the LM wrapping each mixer call in a ``shard_map``, would
hand every mixer local arrays and make each one responsible for its own collectives,
RoPE offsets and document starts, and put all parameters inside the manual region.)
Parameters never enter a ``shard_map`` except ShortConv's taps (passed replicated; their
gradient is summed over the shards by ``shard_map``'s transpose). A mixer that is not
wired stays exact: XLA's partitioner gathers what its scan needs (correct, not parallel).
A length that the axis does not divide (``step`` with a few tokens) takes the plain path.
``layers`` never imports ``lcm``: the axis name :data:`AXIS` lives here and
``lcm.sharding`` imports it.
"""

from layers.context_parallel.attention import attention, gathered_rows
from layers.context_parallel.primitives import (AXIS, BATCH_AXES, exclusive_affine_prefix,
                                                halo, sequence_context, sequence_mesh,
                                                with_history)
from layers.context_parallel.recurrence import (delta_rule, delta_rule_shard, dplr,
                                                dplr_shard, diagonal_recurrence, diagonal_shard,
                                                handoff_shard, linear_recurrence,
                                                recurrence_shard, sequential)

__all__ = ["AXIS", "BATCH_AXES", "sequence_mesh", "sequence_context", "halo", "exclusive_affine_prefix",
           "recurrence_shard", "linear_recurrence", "delta_rule_shard", "delta_rule",
           "dplr_shard", "dplr", "diagonal_shard", "diagonal_recurrence", "handoff_shard", "sequential",
           "with_history", "attention", "gathered_rows"]
