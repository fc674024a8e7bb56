"""Process-level runtime settings (XLA:CPU conv flag, allocator, layer implementation),
applied before and after JAX starts its backend; the rule and its measurements:
docs/design/layers.md."""
import ctypes
import importlib.metadata
import os

import jaxlib

from jaxprune import latency

CPU_FLAGS = (latency.EIGEN_CONV_FLAG,)
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


# The rule for the XLA:CPU flag (module docstring): Eigen's convolutions beat YNNPACK's on
# dense convs and lose badly on grouped (depthwise) ones, whose FLOPs are few but whose
# time is not. The flag is set when the grouped convs' share of the conv MACs is at most
# this; the figures behind it are :data:`RECORDED`.
GROUPED_SHARE_MAX = latency.GROUPED_SHARE_MAX
CONV_SHARE_MIN = latency.CONV_SHARE_MIN
CONV_MACS_MIN = 4e9  # ResNet-56 at batch 32 (4.0G): no difference; at 128 (16.1G): faster


# The flag as one program's ``jax.jit(..., compiler_options=...)``: the same YNNPACK fusion
# types less the convolutions (to time both settings in one process).
EIGEN_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


# The figures behind the rule: eval-mode forward ms per batch as
# ``{batch: (stock, convs to Eigen, stock again or None)}`` (the last a control: two
# identical programs' medians, i.e. the noise), each model's three programs timed
# alternately in one process (``python benchmarks/pruned_speed.py --flags``; 2-core
# x86-64 shared with other jobs, load average 8-12; CIFAR 32x32x3 inputs; the models of
# that benchmark). Two runs each (the first without the control); the medians move with
# the load; only differences beyond the noise count (tests/engine/test_runtime_rule.py).
RECORDED = {
    "resnet56": {
        "profile": {"conv": 125747200, "grouped_conv": 0, "dot": 640},
        "ms": {1: (17.10, 18.39, 13.26), 8: (104.28, 63.75, 60.63),
               32: (603.94, 565.57, 554.07), 128: (4039.97, 3068.01, 3575.19)}},
    "resnet56 (run 1)": {
        "profile": {"conv": 125747200, "grouped_conv": 0, "dot": 640},
        "ms": {1: (10.33, 12.47, None), 128: (787.00, 661.34, None)}},
    "mobilenetv2": {
        "profile": {"conv": 82083840, "grouped_conv": 5879808, "dot": 12800},
        "ms": {1: (90.35, 105.07, 48.84), 128: (15361.95, 29841.02, 15675.46)}},
    "mobilenetv2 (run 1)": {
        "profile": {"conv": 82083840, "grouped_conv": 5879808, "dot": 12800},
        "ms": {1: (64.39, 124.07, None), 128: (13949.73, 27022.20, None)}},
    "vit_s": {
        "profile": {"conv": 1179648, "grouped_conv": 0, "dot": 363639552},
        "ms": {1: (54.74, 46.14, 45.62), 128: (4283.81, 4215.46, 4509.27)}},
    # The TAS smoke (configs/tas_resnet.py:smoke): ResNet-20 on 16x16x3 and its derived
    # network (widths rounded to 8), alternated with the control in one process.
    "tas smoke base": {
        "profile": {"conv": 10203136, "grouped_conv": 0, "dot": 640},
        "ms": {128: (341.3, 307.6, None)}},
    "tas smoke derived": {
        "profile": {"conv": 5249024, "grouped_conv": 0, "dot": 160},
        "ms": {128: (207.2, 228.4, 219.3)}},
    "vit_s (run 1)": {
        "profile": {"conv": 1179648, "grouped_conv": 0, "dot": 363639552},
        "ms": {1: (62.28, 40.61, None), 128: (4434.66, 4520.46, None)}},
}
NOISE_WITHOUT_CONTROL = 1.3  # the widest stock/control ratio seen at batch >= 32: 1.13


# The op profile (MACs by op class) lives with the other hardware costs.
op_profile = latency.op_profile
grouped_share = latency.grouped_share


def model_profile(model, input_shape) -> dict:
  """:func:`op_profile` of a Linen model's eval-mode forward on one example (traced
  through ``init``, so no variables are needed and no backend starts)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxprune.models import layers  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with layers.chosen("stock"):  # the same forward ops; "auto" would ask the backend
    return op_profile(
        lambda x_: model.init_with_output(jax.random.key(0), x_, train=False)[0], x)


def eigen_convs_faster(profile, batch: int = 128) -> bool:
  """The rule: whether the XLA:CPU flag (convolutions to Eigen) is expected to make a
  model with this :func:`op_profile` faster at ``batch``: its MACs are mostly dense
  convs (at least :data:`CONV_SHARE_MIN`), its grouped convs at most
  :data:`GROUPED_SHARE_MAX` of the conv MACs, and one call does at least
  :data:`CONV_MACS_MIN` conv MACs (``batch`` times the profile's). Elsewhere XLA's stock
  settings stay: a depthwise network (2x slower with the flag), a transformer (no
  difference beyond the noise: only a patch conv changes), a small call (the TAS smoke's
  ResNet-20s on 16x16 inputs at batch 128, whose derived network was slower with it)."""
  return latency.dense_convs(profile) and profile["conv"] * batch >= CONV_MACS_MIN


def config_profile(config):
  """:func:`op_profile` of the model a run's config names, traced without starting a
  backend (before :func:`configure`); None when it cannot be built so early (the flag
  then keeps XLA's stock setting under ``"auto"``). The input shape is the dataset's
  (a synthetic dataset's ``image_shape``, 28x28x1 for the MNISTs, 224x224x3 for ImageNet,
  32x32x3 otherwise): only the shares of the op classes matter."""
  try:
    import jax  # pylint: disable=g-import-not-at-top
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    from jaxprune import models  # pylint: disable=g-import-not-at-top
    from jaxprune.models import layers  # pylint: disable=g-import-not-at-top
    ds = config.get("dataset") or {}
    name = ds.get("name", "")
    if name == "synthetic":
      shape = tuple((ds.get("synthetic") or {}).get("image_shape", (32, 32, 3)))
    elif "mnist" in name:
      shape = (28, 28, 1)
    elif name.startswith("imagenet"):
      shape = (224, 224, 3)
    else:
      shape = (32, 32, 3)

    def forward(x):  # built inside the trace: an NNX model's Rngs start no backend
      model = models.build_model(config.model, 10, shape)
      return model.init_with_output(jax.random.key(0), x, train=False)[0]
    started = xla_bridge.backends_are_initialized()
    with layers.chosen("stock"):  # the same forward ops; "auto" would ask the backend
      profile = op_profile(forward, jax.ShapeDtypeStruct((1, *shape), "float32"))
    # A model whose construction started the backend came too late for the flag.
    return profile if started or not xla_bridge.backends_are_initialized() else None
  except Exception:  # pylint: disable=broad-except  (the run reports a bad model itself)
    return None


# The default ``round_to`` per backend lives with the other hardware costs.
ROUND_TO = latency.ROUND_TO
default_round_to = latency.default_round_to


def run_round_to(config) -> int:
  """:func:`default_round_to` for the model a run's config names (:func:`config_profile`;
  call after the backend started), process 0's on every process: the CPUs of a
  multi-host run may differ, the widths they build must not."""
  from jaxprune.engine import distributed  # pylint: disable=g-import-not-at-top
  return int(distributed.from_main(default_round_to(profile=config_profile(config))))


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


def configure(settings=None, profile=None, batch: int = 128) -> bool:
  """The settings needed before the backend starts: the XLA:CPU flag per
  ``settings["xla_cpu_flags"]`` (``config.runtime``; default ``"auto"``); returns
  whether it is in ``XLA_FLAGS`` now. Under ``"auto"`` the flag is set on a CPU when
  :func:`eigen_convs_faster` says so for ``profile`` (the model's :func:`op_profile`) at
  ``batch`` (``profile`` None: no model known, the flag is set as before the rule, for
  scripts timing convolutional ResNets). Without ``settings`` (benchmarks, scripts) it also applies the
  allocator settings, as :func:`apply` does under ``"auto"`` on a CPU."""
  flags = _switch(settings, "xla_cpu_flags")
  on = flags == "on" or (flags == "auto" and cpu_expected()
                         and (profile is None or eigen_convs_faster(profile, batch)))
  if on:
    configure_xla_flags()
  if settings is None and cpu_expected():
    configure_malloc()
  flags_now = os.environ.get("XLA_FLAGS", "")
  return on and all(f in flags_now for f in CPU_FLAGS)


def configure_run(config) -> bool:
  """:func:`configure` for a run's config (``main`` calls it before the backend starts):
  under ``runtime.xla_cpu_flags="auto"`` on a CPU the flag follows the rule
  (:func:`eigen_convs_faster`) for the model the config names (:func:`config_profile`;
  a model that cannot be traced this early keeps XLA's stock setting) at the report's
  batch (``report.inference_batch_size``, the speed the run reports)."""
  settings = config.get("runtime") or {}
  profile = None
  if _switch(settings, "xla_cpu_flags") == "auto" and cpu_expected():
    profile = config_profile(config) or {"conv": 0, "grouped_conv": 0, "dot": 0}
  batch = (config.get("report") or {}).get("inference_batch_size", 128)
  return configure(settings, profile, batch if isinstance(batch, int) else 128)


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
