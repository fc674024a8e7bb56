"""The one timing helper of the benchmark scripts (run as ``python benchmarks/X.py``)."""
import os
import platform
import shlex
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


def print_header(argv: list[str]):
  """Prints the command that produced the table and the machine it ran on.

  ``argv`` is ``[script, *args]`` (e.g. ``sys.argv``). The machine line names the CPU,
  its usable cores and load, the JAX backend and device, and the XLA and allocator
  settings, so a figure can be compared only with one taken the same way.
  """
  import jax  # pylint: disable=g-import-not-at-top  (after the caller's runtime setup)
  print("command: python " + " ".join(shlex.quote(a) for a in argv))
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count()
  malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                    if k.startswith(("MALLOC_", "JAXPRUNE_MALLOC")))
  print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, load average "
        f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}, backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind} x{jax.device_count()}), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}" + (f", {malloc}" if malloc else ""))
