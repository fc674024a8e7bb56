"""The one timing helper of the benchmark scripts (run as ``python benchmarks/X.py``)."""
import time

import numpy as np


def median_ms(fn, repeats: int, warmup: bool = False) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls, in ms (``fn`` must block)."""
  if warmup:
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times)) * 1e3
