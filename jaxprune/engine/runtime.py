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

Both were measured on XLA:CPU only, so both follow the backend (``config.runtime``,
each ``"auto"``, ``"on"`` or ``"off"``): the XLA:CPU flag is set under ``"auto"`` unless
a GPU or TPU plugin of jaxlib is installed and ``JAX_PLATFORMS`` does not ask for the CPU
alone (the flag must be set before the backend starts, so it cannot ask the backend);
the allocator settings are applied under ``"auto"`` when the default backend is the CPU
(:func:`apply`, after the backend has started). ``config.runtime.layers`` picks the
layer implementation the same way (:func:`jaxprune.models.layers.use`).
"""
import ctypes
import importlib.metadata
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


SWITCHES = ("auto", "on", "off")
# jaxlib's accelerator plugins: one installed means the default backend is not the CPU.
_ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm60-plugin",
                        "jax-rocm7-plugin", "libtpu", "libtpu-nightly")


def cpu_expected() -> bool:
  """Whether JAX will run on the CPU, decided without starting a backend:
  ``JAX_PLATFORMS=cpu``, or no GPU/TPU plugin installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  for name in _ACCELERATOR_PLUGINS:
    try:
      importlib.metadata.version(name)
      return False
    except importlib.metadata.PackageNotFoundError:
      continue
  return True


def _switch(settings, key: str) -> str:
  value = (settings or {}).get(key, "auto")
  if value not in SWITCHES:
    from jaxprune.errors import UserError  # pylint: disable=g-import-not-at-top
    raise UserError(f"config runtime.{key}={value!r}: use one of {', '.join(SWITCHES)}. "
                    f"Fix it with --config.runtime.{key}=...")
  return value


def configure(settings=None) -> bool:
  """The settings needed before the backend starts: the XLA:CPU flag per
  ``settings["xla_cpu_flags"]`` (``config.runtime``; default ``"auto"``); returns
  whether it is in ``XLA_FLAGS`` now. Without ``settings`` (benchmarks, scripts) it also applies the
  allocator settings, as :func:`apply` does under ``"auto"`` on a CPU."""
  flags = _switch(settings, "xla_cpu_flags")
  on = flags == "on" or (flags == "auto" and cpu_expected())
  if on:
    configure_xla_flags()
  if settings is None and cpu_expected():
    configure_malloc()
  flags_now = os.environ.get("XLA_FLAGS", "")
  return on and all(f in flags_now for f in CPU_FLAGS)


def apply(settings=None) -> dict:
  """The settings that follow the started backend (call after
  ``jax.distributed.initialize``): the allocator (``settings["malloc_tuning"]``) and the
  layer implementation (``settings["layers"]``). Returns what is in effect."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxprune.models import layers  # pylint: disable=g-import-not-at-top
  settings = settings or {}
  backend = jax.default_backend()
  chosen_layers = layers.use(settings.get("layers", "auto"))
  tuning = _switch(settings, "malloc_tuning")
  malloc = (tuning == "on" or (tuning == "auto" and backend == "cpu")) and configure_malloc()
  flags = os.environ.get("XLA_FLAGS", "")
  return {"backend": backend, "layers": chosen_layers, "malloc_tuning": bool(malloc),
          "xla_cpu_flags": all(f in flags for f in CPU_FLAGS)}
