"""Process-level runtime settings, applied before JAX starts its backends.

XLA:CPU sends small convolutions to YNNPACK by default, which is slower than
Eigen for the 16x16 and 8x8 convs of CIFAR ResNets (forward+backward ~25 -> 15 ms
and ~23 -> 12 ms per layer at batch 128); this flag keeps YNNPACK for reductions
and dots and gives convs to Eigen. It is set only for the jaxlib versions it was
measured on (an unknown XLA flag aborts the process) and never overrides a user's
own choice of the same flag.
"""
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
