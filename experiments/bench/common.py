"""What the benchmarks share: the flags every mode reads, the interleaved timing loop and its
medians, the scaling-exponent fit, the huge-pages re-exec, the CPU thread count and the
JSON (+ PNG) writer that stamps every report with its provenance (``lcm.provenance``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Hashable, Iterable, Mapping

import jax
import numpy as np
from absl import flags

from lcm import provenance

# The modes of ``python -m experiments.bench`` (``--what`` or the positional argument), one
# module each.
MODES = ("decode", "kernels", "layers", "swa", "auto", "context_parallel")

WHAT = flags.DEFINE_enum("what", "decode", list(MODES),
                         "Which benchmark (may also be given as the positional argument).")
REPEATS = flags.DEFINE_integer("repeats", 7, "Timings per point (median).")
HUGE_PAGES = flags.DEFINE_bool(
    "huge_pages", True,
    "Re-run under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for "
    "malloc's large blocks; see experiments.bench.common.with_huge_pages) unless already "
    "set.")
OUT = flags.DEFINE_string("out", "", "Write <out>.json and <out>.png when given.")
MAX_CALL_S = flags.DEFINE_float("max_call_seconds", 60.0,
                                "A point whose warm-up call takes longer is timed once.")

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def cpu_threads() -> int:
  """Cores this process may run on: XLA:CPU sizes its intra-op thread pool to them, and the
  torch peer is limited to the same number (``torch.set_num_threads``)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def available_bytes() -> int | None:
  """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is none)."""
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def fit_exponent(points: Mapping[int, float]) -> float | None:
  """Least-squares slope of log(time) vs log(T) over ``{T: ms}``."""
  ts = sorted(points)
  if len(ts) < 2:
    return None
  x = np.log(np.asarray(ts, np.float64))
  y = np.log(np.asarray([points[t] for t in ts], np.float64))
  return float(np.polyfit(x, y, 1)[0])


def time_interleaved(cases: Mapping[Hashable, Callable[[], Any]], repeats: int, *,
                     untimed_first: bool = True,
                     alternate: bool = False) -> dict[Hashable, list[float]]:
  """``{key: [ms, ...]}``: ``repeats`` rounds over every case, interleaved so that machine
  noise hits all cases alike. A case is a blocking call (``jax.block_until_ready`` inside).

  ``untimed_first``: each timed call comes right after an untimed call of the same case (the
  previous case, up to GBs of temporaries, leaves cold caches and freed pages behind: time
  the steady state, as a training loop sees it). ``alternate``: reverse the case order every
  other round."""
  times = {k: [] for k in cases}
  order = list(cases)
  for r in range(repeats):
    for k in (order[::-1] if alternate and r % 2 else order):
      run = cases[k]
      if untimed_first:
        run()
      t0 = time.perf_counter()
      run()
      times[k].append((time.perf_counter() - t0) * 1e3)
  return times


def summary(ts: Iterable[float]) -> dict[str, Any]:
  """``{"ms": median, "min_ms": min, "runs": n}`` of a case's timings (ms)."""
  ts = list(ts)
  return {"ms": float(np.median(ts)), "min_ms": float(np.min(ts)), "runs": len(ts)}


def with_huge_pages() -> None:
  """Re-executes this command with glibc's malloc asking for transparent huge pages
  (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35; ignored elsewhere), unless the
  variable already names that tunable.

  Why: XLA:CPU takes each call's temporaries (100+ MB for a layer's fwd+bwd at T=4096)
  from fresh ``mmap``ed memory, so with 4 KiB pages every call page-faults all of it
  again. Measured in session 11 (mamba2 vs mamba2-jax, T=4096, same process): 1.9M minor
  faults -> 88k for the whole run, mamba2 120 -> 85 ms, mamba2-jax 230 -> 176 ms, and the
  run-to-run spread of the medians shrank from ~+-10% to ~+-2% (the ratio stayed ~2.07).
  Kernel THP must be ``always`` or ``madvise`` (``/sys/kernel/mm/transparent_hugepage``).
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGE_PAGES_TUNABLE)
                                                 if t))
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def machine() -> dict[str, Any]:
  """The fields every report carries about where it ran."""
  return {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
          "threads": cpu_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def write_report(report: Mapping[str, Any], *, code: Iterable[str],
                 plot: Callable[[str], None] | None = None, out: str | None = None) -> dict:
  """Stamps ``report`` with its provenance (``lcm.provenance.attach``: the command, commit,
  ``code`` -- the paths the figures depend on -- and the PNG written), prints it and, when
  ``out`` (default ``--out``) is set, writes ``<out>.json`` and ``plot(<out>.png)``.
  Returns the stamped report."""
  out = OUT.value if out is None else out
  outputs = []
  if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if plot is not None:
      plot(out + ".png")
      outputs.append(out + ".png")
  report = provenance.attach(report, code=code, outputs=outputs)
  if out:
    with open(out + ".json", "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))
  return report
