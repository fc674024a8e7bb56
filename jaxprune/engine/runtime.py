"""Process-level runtime settings, applied before JAX starts its backends.

Allocator: XLA:CPU allocates fresh activation buffers every step; glibc serves
large ones with mmap and returns them on free, so every step pays page faults on
tens of MB. Raising glibc's mmap and trim thresholds keeps them in the heap
(measured: CIFAR ResNet-20 training step 406 -> 364 ms, forward 117 -> 86 ms at
batch 128; CWI forward+backward 25 -> 19 ms). The cost is that up to the threshold of
freed memory stays with the process.

XLA:CPU sends small convolutions to YNNPACK by default, which is slower than
Eigen for the 16x16 and 8x8 convs of CIFAR ResNets (forward+backward ~25 -> 15 ms
and ~23 -> 12 ms per layer at batch 128); this flag keeps YNNPACK for reductions
and dots and gives convs to Eigen. It is set only for the jaxlib versions it was
measured on (an unknown XLA flag aborts the process) and never overrides a user's
own choice of the same flag.
"""
import ctypes
import os

import jaxlib

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
_TESTED_JAXLIB = ((0, 10),)


def configure_xla_flags() -> bool:
  """Adds :data:`CPU_FLAGS` to ``XLA_FLAGS``; returns whether it did.

  Call before the first JAX computation (``main`` does); later calls have no
  effect on an already started backend.
  """
  version = tuple(int(v) for v in jaxlib.__version__.split(".")[:2])
  if version not in _TESTED_JAXLIB:
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  added = [f for f in CPU_FLAGS if f.split("=")[0] not in flags]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
  return bool(added)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MALLOC_THRESHOLD = 1 << 30


def configure_malloc() -> bool:
  """Raises glibc's mmap/trim thresholds (see the module docstring).

  A no-op returning False where libc is not glibc or ``JAXPRUNE_MALLOC_TUNING=0``.
  """
  if os.environ.get("JAXPRUNE_MALLOC_TUNING", "1") == "0":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD) and
                libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD))
  except (OSError, AttributeError):
    return False


def configure() -> None:
  """All process-level settings: XLA flags and the allocator."""
  configure_xla_flags()
  configure_malloc()
