"""Input pipelines: TFDS (incl. offline builds), .npz arrays, synthetic data. Every batch is
a pure function of (dataset, step, seed); NumPy only: no TensorFlow import, no iterator
state, no JAX devices."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import io
import math
import os
import pathlib
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxprune.engine import distributed
from jaxprune.errors import UserError

KNOWN_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet2012", "npz",
                  "synthetic")
AUGMENTATIONS = ("auto", "cifar", "imagenet", "none")

# Datasets small enough to hold in memory as uint8 arrays after one read of the prepared split.
_TFDS_IN_MEMORY = ("mnist", "fashion_mnist", "cifar10", "cifar100")

# Per-channel mean/std on the [0, 1] scale. CIFAR values are those of the TAS scripts
# (pixel statistics of the training sets, given there on the 0..255 scale).
_NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": (tuple(v / 255 for v in (125.3, 123.0, 113.9)),
                tuple(v / 255 for v in (63.0, 62.1, 66.7))),
    "cifar100": (tuple(v / 255 for v in (129.3, 124.1, 112.4)),
                 tuple(v / 255 for v in (68.2, 65.4, 70.4))),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# The files a user must place in `manual_dir` for datasets without per-file URLs in TFDS.
_MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}
# TFDS split names behind our "train"/"test".
_SPLITS = {"imagenet2012": {"train": "train", "test": "validation"}}

# ImageNet preprocessing (Inception-style random resized crop; ResNet-style eval crop).
IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
CIFAR_PAD = 4

# Distinct random streams, so the order and the augmentation noise never share draws.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1
_SYNTHETIC_STREAM = 2


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split of a dataset, ready for :func:`batch_at` and :func:`eval_batches`.

  Attributes:
    name: the dataset name from the config (``"cifar10"``, ``"npz"``, ...).
    num_classes: number of label classes.
    num_examples: number of examples in this split.
    image_shape: (H, W, C) of the images a batch holds, after preprocessing
      (``(224, 224, 3)`` for ImageNet, ``(28, 28, 1)`` for MNIST).
    images: uint8 [N, H, W, C] for in-memory datasets, else None.
    labels: int32 [N] for in-memory datasets, else None (ImageNet: reading every label
      would read every image).
    source: for on-disk datasets, a random-access source: ``len()`` and
      ``__getitems__(indices)`` returning dicts with encoded ``image`` bytes and ``label``.
    augment: training augmentation, ``"cifar"``, ``"imagenet"`` or ``"none"``.
    mean: per-channel mean on the [0, 1] scale used for normalisation.
    std: per-channel standard deviation on the [0, 1] scale.
  """
  name: str
  num_classes: int
  num_examples: int
  image_shape: tuple[int, ...]
  images: np.ndarray | None = dataclasses.field(default=None, repr=False)
  labels: np.ndarray | None = dataclasses.field(default=None, repr=False)
  source: Any = dataclasses.field(default=None, repr=False)
  augment: str = "none"
  mean: tuple[float, ...] = (0.5,)
  std: tuple[float, ...] = (0.5,)

  def __post_init__(self):
    if (self.images is None) == (self.source is None):
      raise ValueError("A Dataset holds either `images` (in memory) or a `source`.")
    if self.images is not None:
      if self.images.dtype != np.uint8 or self.images.ndim != 4:
        raise ValueError(f"images must be uint8 NHWC, got {self.images.dtype} "
                         f"{self.images.shape}.")
      if self.labels is None or self.labels.shape != (self.images.shape[0],):
        raise ValueError("labels must be a vector with one label per image.")
      if self.num_examples != self.images.shape[0]:
        raise ValueError("num_examples does not match the number of images.")
    if self.augment not in ("cifar", "imagenet", "none"):
      raise ValueError(f"Unknown augmentation {self.augment!r}.")
    if self.augment == "imagenet" and self.source is None:
      raise ValueError("ImageNet augmentation needs an on-disk source of encoded images.")
    if len(self.mean) != self.image_shape[-1] or len(self.std) != self.image_shape[-1]:
      raise ValueError("mean/std need one value per channel.")


# --------------------------------------------------------------------------------------
# Loading.


def load(cfg: Mapping[str, Any]) -> dict[str, Dataset]:
  """Loads the train and test splits named by a ``config.dataset`` section.

  A TFDS dataset that is not prepared in ``data_dir`` is built there first (once); on
  several hosts sharing one ``data_dir``, let one process build it before the others load.

  Args:
    cfg: ``ml_collections.ConfigDict`` (or dict) with ``name`` (one of
      :data:`KNOWN_DATASETS`), and as the name needs: ``data_dir`` (TFDS data_dir, None
      for TFDS's default), ``manual_dir`` (files for an offline TFDS build), ``path`` (the
      .npz file; ``num_classes`` optionally gives its class count), ``synthetic``
      (``num_train``, ``num_test``, ``image_shape``, ``num_classes``, ``seed``), ``augment`` (``"auto"``, ``"cifar"``, ``"imagenet"``,
      ``"none"``; auto picks cifar for 32x32 RGB data, imagenet for ImageNet, else none).

  Returns:
    ``{"train": Dataset, "test": Dataset}``.

  Raises:
    UserError: unknown name or augmentation, missing files, or a TFDS build that cannot
      run here (no TensorFlow, missing or wrong manual files, no network).
  """
  name = cfg.get("name")
  if name not in KNOWN_DATASETS:
    raise UserError(f"Unknown dataset {name!r} in config.dataset.name; known datasets: "
                    f"{', '.join(KNOWN_DATASETS)}.")
  augment = cfg.get("augment") or "auto"
  if augment not in AUGMENTATIONS:
    raise UserError(f"Unknown config.dataset.augment {augment!r}; choose one of "
                    f"{', '.join(AUGMENTATIONS)}.")

  if name == "synthetic":
    syn = cfg.get("synthetic") or {}
    splits = synthetic(
        num_train=int(syn.get("num_train", 2048)),
        num_test=int(syn.get("num_test", 512)),
        image_shape=tuple(syn.get("image_shape", (32, 32, 3))),
        num_classes=int(syn.get("num_classes", 10)),
        seed=int(syn.get("seed", 0)))
  elif name == "npz":
    splits = _load_npz(cfg.get("path"), cfg.get("num_classes"))
  elif name in _TFDS_IN_MEMORY:
    builder = _prepared_builder(name, cfg.get("data_dir"), cfg.get("manual_dir"))
    splits = {}
    for split in ("train", "test"):
      images, labels = _tfds_arrays(builder, split)
      mean, std = _NORMALIZATION[name]
      splits[split] = Dataset(
          name=name, num_classes=builder.info.features["label"].num_classes,
          num_examples=len(labels), image_shape=images.shape[1:], images=images,
          labels=labels, mean=mean, std=std)
  else:  # imagenet2012
    builder = _prepared_builder(name, cfg.get("data_dir"), cfg.get("manual_dir"))
    splits = {split: tfds_source(builder, _SPLITS[name][split], augment="imagenet")
              for split in ("train", "test")}

  return {split: _with_augment(ds, augment) for split, ds in splits.items()}


def _with_augment(ds: Dataset, augment: str) -> Dataset:
  """Resolves ``augment`` ("auto" included) for `ds` and checks that it applies."""
  if augment == "auto":
    if ds.source is not None:
      augment = "imagenet"
    elif tuple(ds.image_shape) == (32, 32, 3):
      augment = "cifar"
    else:
      augment = "none"
  if augment == "imagenet" and ds.source is None:
    raise UserError(f"config.dataset.augment='imagenet' applies to imagenet2012 only; "
                    f"use 'cifar' or 'none' for {ds.name!r}.")
  if augment == "cifar" and ds.source is not None:
    raise UserError(f"{ds.name!r} is decoded and cropped to {ds.image_shape} by the "
                    "imagenet preprocessing; set config.dataset.augment to 'imagenet', "
                    "'none' (the eval crop for training too) or 'auto'.")
  return dataclasses.replace(ds, augment=augment)


def _default_normalization(image_shape: Sequence[int]) -> tuple[tuple[float, ...], ...]:
  """Mean/std for data without published statistics (npz, synthetic).

  CIFAR-10's for 32x32 RGB (the .npz files used here are CIFAR-10 subsets, and the
  synthetic data imitates CIFAR), otherwise 0.5/0.5 per channel, which maps [0, 1]
  to [-1, 1]. Deliberately not computed from the data, so that a subset and the full set
  are normalised alike.
  """
  if tuple(image_shape) == (32, 32, 3):
    return _NORMALIZATION["cifar10"]
  channels = image_shape[-1]
  return (0.5,) * channels, (0.5,) * channels


def _load_npz(path: str | os.PathLike | None,
              num_classes: int | None = None) -> dict[str, Dataset]:
  """Loads x_train, y_train, x_test, y_test (and optional class_names) from a .npz.

  The class count is ``num_classes`` if given, else ``len(class_names)``, else inferred
  from the labels (said on stdout; an inferred count whose classes are not all present
  in the training labels is an error). Labels outside ``0..num_classes-1`` and images
  that look channels-first are errors.
  """
  if not path:
    raise UserError("config.dataset.path must name a .npz file with x_train, y_train, "
                    "x_test, y_test when config.dataset.name='npz'.")
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise UserError(f"config.dataset.path: no such file {str(path)!r}.")
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
      if missing:
        raise UserError(f"{path} lacks the arrays {', '.join(missing)}; a dataset .npz "
                        "needs x_train, y_train, x_test, y_test (images uint8 NHWC).")
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f"config.dataset.path {str(path)!r} is not a readable .npz: {e}") from e

  splits = {}
  for split in ("train", "test"):
    images = _as_uint8_nhwc(arrays[f"x_{split}"], f"x_{split}", path)
    labels = np.asarray(arrays[f"y_{split}"]).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape[0] != images.shape[0]:
      raise UserError(f"{path}: y_{split} must hold one integer label per image.")
    splits[split] = (images, labels.astype(np.int32))
  if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
    raise UserError(f"{path}: x_train images are {splits['train'][0].shape[1:]} but x_test "
                    f"images are {splits['test'][0].shape[1:]}.")
  if num_classes is not None:
    source = "config.dataset.num_classes"
  elif "class_names" in arrays:
    num_classes, source = len(arrays["class_names"]), "class_names"
  else:
    num_classes = int(max(labels.max(initial=0) for _, labels in splits.values())) + 1
    source = "inferred"
    present = np.unique(splits["train"][1])
    absent = sorted(set(range(num_classes)) - set(present.tolist()))
    if absent:
      raise UserError(
          f"{path}: the labels run to {num_classes - 1} but classes "
          f"{', '.join(map(str, absent[:5]))}{'...' if len(absent) > 5 else ''} have no "
          "training images; set config.dataset.num_classes (or store class_names in the "
          ".npz) if that is intended, else fix the labels.")
    print(f"[data] {path.name}: {num_classes} classes inferred from the labels "
          "(set config.dataset.num_classes or store class_names to say so)")
  for split, (_, labels) in splits.items():
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
      raise UserError(f"{path}: y_{split} holds label {int(bad[0])} ({bad.size} such), "
                      f"outside 0..{num_classes - 1} ({num_classes} classes from {source}).")
  mean, std = _default_normalization(splits["train"][0].shape[1:])
  return {
      split: Dataset(name="npz", num_classes=num_classes, num_examples=len(labels),
                     image_shape=images.shape[1:], images=images, labels=labels, mean=mean,
                     std=std)
      for split, (images, labels) in splits.items()
  }


def _as_uint8_nhwc(x: np.ndarray, key: str, path: pathlib.Path) -> np.ndarray:
  if x.ndim == 3:  # grayscale stored as NHW
    x = x[..., None]
  if x.ndim != 4:
    raise UserError(f"{path}: {key} must be images NHWC (or NHW), got shape {x.shape}.")
  if x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
    raise UserError(f"{path}: {key} has shape {x.shape}, which looks channels-first (NCHW); "
                    "store it NHWC, e.g. x.transpose(0, 2, 3, 1).")
  if x.dtype != np.uint8:
    if not np.issubdtype(x.dtype, np.integer) or x.min(initial=0) < 0 or x.max(initial=0) > 255:
      raise UserError(f"{path}: {key} must hold uint8 pixels 0..255, got {x.dtype}.")
    x = x.astype(np.uint8)
  return np.ascontiguousarray(x)


# --------------------------------------------------------------------------------------
# TFDS.


def _prepared_builder(name: str, data_dir: str | None, manual_dir: str | None):
  """Returns the stock TFDS builder for `name`, building the dataset first if needed."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = _tfds_builder(tfds, name, data_dir)
  # Several processes of one run: process 0 builds, then the others find it built (shared
  # storage) or build their host's copy one at a time (per-host disks).
  lock = pathlib.Path(builder.data_dir_root) / f".jaxprune-{name}.lock"
  with distributed.main_process_first(f"prepare:{name}", str(lock)):
    if distributed.is_multiprocess():  # see what process 0 may have just built
      builder = _tfds_builder(tfds, name, data_dir)
    if not builder.is_prepared():
      _prepare(tfds, builder, name, manual_dir)
  return builder


def _tfds_builder(tfds, name: str, data_dir: str | None):
  """``tfds.builder(name, data_dir=...)`` without TFDS's litter: for a dataset not yet
  prepared, TFDS copies its metadata from GCS into a ``tempfile.mkdtemp`` directory it
  never removes (``DatasetInfo.initialize_from_bucket``; one empty ``/tmp/tmp*tfds`` per
  run, also offline). Its temporary files go into a directory of ours, removed after."""
  with _scratch_tempdir():
    return tfds.builder(name, data_dir=data_dir)


@contextlib.contextmanager
def _scratch_tempdir():
  """``tempfile``'s default directory is a fresh one inside it for the block, deleted with
  whatever was left in it (start-up only: the data pipeline's threads are not running)."""
  scratch = tempfile.mkdtemp(prefix="jaxprune-")
  saved, tempfile.tempdir = tempfile.tempdir, scratch
  try:
    yield scratch
  finally:
    tempfile.tempdir = saved
    shutil.rmtree(scratch, ignore_errors=True)


def _prepare(tfds, builder, name: str, manual_dir: str | None):
  """Builds a stock TFDS dataset (offline from ``manual_dir`` when given)."""
  where = builder.data_dir
  if manual_dir is not None:
    manual_dir = pathlib.Path(manual_dir).expanduser()
    expected = _manual_files(builder)
    if not manual_dir.is_dir():
      raise UserError(f"config.dataset.manual_dir {str(manual_dir)!r} is not a directory; "
                      f"TFDS expects the files {', '.join(expected)} there to build {name!r}.")
    missing = [f for f in expected if not (manual_dir / f).is_file()]
    if missing:
      raise UserError(f"config.dataset.manual_dir {str(manual_dir)!r} lacks "
                      f"{', '.join(missing)}; TFDS expects the files {', '.join(expected)} "
                      f"there to build {name!r}.")
  elif name in _MANUAL_FILES:
    raise UserError(f"{name!r} is not prepared in {where} and cannot be downloaded "
                    f"automatically: set config.dataset.manual_dir to a directory with "
                    f"{', '.join(_MANUAL_FILES[name])}.")

  missing_modules = [m for m in ("tensorflow", "importlib_resources")
                     if importlib.util.find_spec(m) is None]
  if missing_modules:
    raise UserError(
        f"{name!r} is not prepared in {where}; building it with TFDS needs TensorFlow "
        f"(missing here: {', '.join(missing_modules)}). Install the build extra with "
        "`pip install 'jaxprune[tfds-build]'` (tensorflow-cpu, importlib_resources), or set "
        "config.dataset.data_dir to a directory where it is already prepared in the "
        "array_record format. Reading a prepared dataset does not need TensorFlow.")

  if manual_dir is None:
    # Offline, TFDS would retry each file 10 times with a doubling backoff (about 3.5 min)
    # before failing: one connection per host first says it at once.
    unreachable = _unreachable(url for url in (builder.url_infos or {}))
    if unreachable:
      raise UserError(f"Could not download {name!r} (no connection to {unreachable}). "
                      f"Without network, set config.dataset.manual_dir to a directory with "
                      f"{', '.join(_manual_files(builder))}.")

  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.core.download import download_manager
  # Extracted files are cached by file name only and MNIST and Fashion-MNIST share theirs:
  # one extraction directory per dataset keeps one from being read as the other.
  extract_dir = pathlib.Path(builder.data_dir_root) / "downloads" / "extracted" / name
  config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else str(manual_dir),
      extract_dir=str(extract_dir), try_download_gcs=False)
  try:
    builder.download_and_prepare(download_config=config, file_format="array_record")
  except download_manager.NonMatchingChecksumError as e:
    raise UserError(f"A file for {name!r} does not match the checksum TFDS registered for "
                    f"it; provide the original, unmodified files in "
                    f"config.dataset.manual_dir.\n{e}") from e
  except (tfds.download.DownloadError, OSError) as e:
    # Offline, the error that arrives is often the HTTP library's (requests'
    # ConnectionError, an OSError), not TFDS's DownloadError; other OSErrors (a full disk,
    # a read-only data_dir) and any error of a manual_dir build are not downloads.
    network = (isinstance(e, (ConnectionError, TimeoutError))
               or type(e).__module__.split(".")[0] in ("requests", "urllib3"))
    if not isinstance(e, tfds.download.DownloadError) and (
        manual_dir is not None or not network):
      raise
    raise UserError(f"Could not download {name!r} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}). Without network, "
                    f"set config.dataset.manual_dir to a directory with "
                    f"{', '.join(_manual_files(builder))}.") from e


def _unreachable(urls, timeout_s: float = 5.0) -> str | None:
  """The first ``host:port (reason)`` of ``urls`` that takes no TCP connection within
  ``timeout_s``, or None: all connect, or a proxy is set for their scheme (the download
  goes through it; not checked here)."""
  proxies = urllib.request.getproxies()
  hosts = {}
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"https": 443, "http": 80, "ftp": 21}.get(parts.scheme)
    if parts.hostname and port and parts.scheme not in proxies:
      hosts.setdefault((parts.hostname, port), None)
  for host, port in hosts:
    try:
      socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
      return f"{host}:{port} ({type(e).__name__}: {e})"
  return None


def _manual_files(builder) -> list[str]:
  """The file names TFDS looks for in manual_dir when building `builder`'s dataset."""
  if builder.name in _MANUAL_FILES:
    return list(_MANUAL_FILES[builder.name])
  return sorted({info.filename for info in (builder.url_infos or {}).values()
                 if info.filename})


def _tfds_arrays(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a prepared split into uint8 images and int32 labels, via an .npz cache.

  The cache sits next to the prepared files (``<data_dir>/<name>/<version>/``), so it
  belongs to exactly that build; decoding 60,000 PNGs takes seconds, loading the cache a
  fraction of one.
  """
  expected = builder.info.splits[split].num_examples
  cache = pathlib.Path(builder.data_dir) / f"jaxprune-{split}-arrays.npz"
  local = "://" not in str(builder.data_dir)
  if local and cache.is_file():
    try:
      with np.load(cache, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
      if images.shape[0] == expected == labels.shape[0]:
        return images, labels
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
      pass  # A damaged or foreign cache is rebuilt below.

  images, labels = _read_split(builder, split)
  if local:
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
      with open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels)
      os.replace(tmp, cache)  # Atomic: concurrent readers see the old file or the new.
    except OSError:  # A read-only data_dir: work without the cache.
      tmp.unlink(missing_ok=True)
  return images, labels


def _read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every example of a prepared split, by random access (no TensorFlow)."""
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:  # prepared as tfrecord: no random access
    if importlib.util.find_spec("tensorflow") is None:
      raise UserError(
          f"{builder.name!r} in {builder.data_dir} was prepared in the "
          f"{builder.info.file_format} format, which only TensorFlow reads. Install "
          "`pip install 'jaxprune[tfds-build]'`, or set config.dataset.data_dir to another "
          "directory so that it is built again in the array_record format.") from e
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    return (np.ascontiguousarray(arrays["image"], dtype=np.uint8),
            arrays["label"].astype(np.int32))
  n = len(source)
  shape = builder.info.features["image"].shape
  images = np.empty((n, *shape), np.uint8)
  labels = np.empty((n,), np.int32)
  chunk = 4096
  for start in range(0, n, chunk):
    records = source.__getitems__(range(start, min(start + chunk, n)))
    images[start:start + len(records)] = np.stack([r["image"] for r in records])
    labels[start:start + len(records)] = [r["label"] for r in records]
  return images, labels


def tfds_source(builder, split: str, augment: str) -> Dataset:
  """A prepared TFDS split read by random access, images left encoded and decoded by PIL
  in threads at ``IMAGENET_SIZE`` (the ImageNet reading path, for any image builder)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = builder.as_data_source(split=split,
                                    decoders={"image": tfds.decode.SkipDecoding()})
  except NotImplementedError as e:
    raise UserError(
        f"{builder.name!r} in {builder.data_dir} was prepared in the "
        f"{builder.info.file_format} format, which has no random access; set "
        "config.dataset.data_dir to another directory so that it is built again in the "
        "array_record format.") from e
  channels = builder.info.features["image"].shape[-1] or 3
  name = builder.name
  mean, std = _NORMALIZATION.get(name, ((0.5,) * channels, (0.5,) * channels))
  return Dataset(name=name, num_classes=builder.info.features["label"].num_classes,
                 num_examples=len(source),
                 image_shape=(IMAGENET_SIZE, IMAGENET_SIZE, channels), source=source,
                 augment=augment, mean=mean, std=std)


# --------------------------------------------------------------------------------------
# Synthetic data.


def synthetic(num_train: int, num_test: int, image_shape: Sequence[int] = (32, 32, 3),
              num_classes: int = 10, seed: int = 0) -> dict[str, Dataset]:
  """A learnable, deterministic image dataset generated in-process.

  Each class has a smooth template (a sum of a few low-frequency 2-D cosines per channel);
  an example is its class template at a random contrast, circularly shifted by up to 4
  pixels, plus strong pixel noise. Learnable but not trivial (measured with the defaults,
  5,000 train / 1,000 test examples): a nearest-class-mean classifier scores about 0.89,
  a small 3-stage ResNet trained 100 SGD steps of 128 with CIFAR augmentation about 0.77.

  Args:
    num_train: examples in the train split.
    num_test: examples in the test split.
    image_shape: (H, W, C).
    num_classes: number of classes; labels are balanced.
    seed: generates templates and examples; the same seed gives the same arrays.

  Returns:
    ``{"train": Dataset, "test": Dataset}`` with uint8 images; augmentation as for
    ``augment="auto"`` (cifar for 32x32 RGB, else none).
  """
  h, w, c = (int(d) for d in image_shape)
  if min(num_train, num_test, num_classes) < 1 or seed < 0:
    raise UserError("config.dataset.synthetic needs num_train, num_test, num_classes >= 1 "
                    "and seed >= 0.")
  rng = np.random.default_rng([_SYNTHETIC_STREAM, seed])
  yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
  num_waves = 3
  freq = rng.uniform(0.5, 2.5, size=(num_classes, c, num_waves, 2))
  freq *= rng.choice([-1.0, 1.0], size=freq.shape)
  phase = rng.uniform(0, 2 * np.pi, size=(num_classes, c, num_waves))
  waves = np.cos(2 * np.pi * (freq[..., 0, None, None] * yy + freq[..., 1, None, None] * xx)
                 + phase[..., None, None])
  templates = waves.sum(axis=2) / np.sqrt(num_waves)  # [K, C, H, W], about unit variance
  templates = templates.transpose(0, 2, 3, 1).astype(np.float32)

  mean, std = _default_normalization((h, w, c))
  splits = {}
  for split_id, (split, n) in enumerate((("train", num_train), ("test", num_test))):
    srng = np.random.default_rng([_SYNTHETIC_STREAM, seed, split_id + 1])
    labels = srng.permutation(np.arange(n) % num_classes).astype(np.int32)
    images = np.empty((n, h, w, c), np.uint8)
    chunk = 1024
    for start in range(0, n, chunk):
      lab = labels[start:start + chunk]
      b = len(lab)
      contrast = srng.uniform(0.3, 1.0, size=(b, 1, 1, 1)).astype(np.float32)
      x = templates[lab] * contrast
      shifts = srng.integers(-4, 5, size=(b, 2))
      rows = (np.arange(h) - shifts[:, :1]) % h
      cols = (np.arange(w) - shifts[:, 1:]) % w
      x = x[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
      x += 1.5 * srng.standard_normal(size=x.shape, dtype=np.float32)
      images[start:start + b] = np.clip(128 + 48 * x, 0, 255).astype(np.uint8)
    splits[split] = _with_augment(
        Dataset(name="synthetic", num_classes=num_classes, num_examples=n,
                image_shape=(h, w, c), images=images, labels=labels, mean=mean, std=std),
        "auto")
  return splits


# --------------------------------------------------------------------------------------
# Subsets.


def per_class_split(labels: np.ndarray, fraction: float = 0.5,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Splits example indices per class, e.g. TAS's 50/50 split of the training set.

  Within every class, a fixed-seed permutation puts ``round(fraction * n_class)`` examples
  in the first part and the rest in the second.

  Args:
    labels: int [N] class labels.
    fraction: share of each class that goes to the first part.
    seed: the permutation seed; the same seed gives the same split.

  Returns:
    (idx_a, idx_b): sorted int64 index arrays, disjoint, together all of ``range(N)``.
  """
  labels = np.asarray(labels).reshape(-1)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must lie in [0, 1], got {fraction}.")
  parts_a, parts_b = [], []
  for cls in np.unique(labels):
    members = np.flatnonzero(labels == cls)
    members = np.random.default_rng([seed, int(cls)]).permutation(members)
    k = int(round(fraction * len(members)))
    parts_a.append(members[:k])
    parts_b.append(members[k:])
  if not parts_a:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
  return (np.sort(np.concatenate(parts_a)).astype(np.int64),
          np.sort(np.concatenate(parts_b)).astype(np.int64))


class _IndexedSource:
  """A random-access source restricted to `indices` of another one."""

  def __init__(self, source, indices: np.ndarray):
    self._source = source
    self._indices = indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]

  def __getitems__(self, keys):
    return self._source.__getitems__([int(i) for i in self._indices[np.asarray(keys)]])


def subset(ds: Dataset, indices: np.ndarray) -> Dataset:
  """The examples `indices` of `ds` (in that order) as a dataset of their own."""
  indices = np.asarray(indices).reshape(-1)
  if not np.issubdtype(indices.dtype, np.integer) and indices.size:
    raise ValueError(f"indices must be integers, got {indices.dtype}.")
  indices = indices.astype(np.int64)
  if indices.size and (indices.min() < 0 or indices.max() >= ds.num_examples):
    raise ValueError(f"indices must lie in [0, {ds.num_examples}).")
  if ds.source is not None:
    return dataclasses.replace(ds, num_examples=len(indices),
                               source=_IndexedSource(ds.source, indices))
  return dataclasses.replace(ds, num_examples=len(indices), images=ds.images[indices],
                             labels=ds.labels[indices])


# --------------------------------------------------------------------------------------
# Batches.


def steps_per_epoch(ds: Dataset, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  if global_batch_size < 1:
    raise UserError(f"The batch size must be positive, got {global_batch_size}.")
  steps = ds.num_examples // global_batch_size
  if steps == 0:
    raise UserError(f"The global batch size {global_batch_size} exceeds the "
                    f"{ds.num_examples} examples of {ds.name!r}; lower the batch size.")
  return steps


def _local_rows(global_batch_size: int, process_index: int,
                process_count: int) -> tuple[int, int]:
  if global_batch_size % process_count:
    raise UserError(f"The global batch size {global_batch_size} must be divisible by the "
                    f"number of processes {process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  local = global_batch_size // process_count
  return process_index * local, (process_index + 1) * local


_ORDER_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The permutation of ``range(num_examples)`` that training epoch `epoch` visits."""
  key = (num_examples, seed, epoch)
  order = _ORDER_CACHE.get(key)
  if order is None:
    order = np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    if len(_ORDER_CACHE) >= 4:  # one run needs the current epoch's (a few for TAS's halves)
      _ORDER_CACHE.pop(next(iter(_ORDER_CACHE)))
    _ORDER_CACHE[key] = order
  return order


def batch_at(ds: Dataset, step: int, global_batch_size: int, *, seed: int, train: bool,
             process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of global batch number `step`; a pure function of its arguments.

  Training batches visit the examples of epoch ``step // steps_per_epoch`` in a permutation
  drawn from (seed, epoch), dropping the epoch's remainder, and carry augmentation drawn
  for the whole global batch from (seed, step); process `p` of `P` takes rows
  ``[p * B / P, (p + 1) * B / P)``, so the global batch does not depend on `P`.
  Non-training batches walk the split in order, without augmentation (ImageNet: resize 256,
  center crop 224).

  Args:
    ds: the dataset.
    step: global step (>= 0).
    global_batch_size: B, summed over processes.
    seed: order and augmentation seed (>= 0).
    train: shuffle and augment.
    process_index: this process's index.
    process_count: number of processes.

  Returns:
    ``image``: float32 [B / P, H, W, C] normalised; ``label``: int32 [B / P].
  """
  if step < 0 or seed < 0:
    raise ValueError(f"step and seed must be >= 0, got step={step}, seed={seed}.")
  lo, hi = _local_rows(global_batch_size, process_index, process_count)
  epoch, position = divmod(int(step), steps_per_epoch(ds, global_batch_size))
  first = position * global_batch_size
  if train:
    indices = epoch_order(ds.num_examples, seed, epoch)[first + lo:first + hi]
  else:
    indices = np.arange(first + lo, first + hi)
  if not train or ds.augment == "none":
    return _make_batch(ds, indices, augment="none")
  rng = np.random.default_rng([_AUGMENT_STREAM, seed, int(step)])
  if ds.augment == "cifar":
    offsets = rng.integers(0, 2 * CIFAR_PAD + 1, size=(global_batch_size, 2))
    flips = rng.random(global_batch_size) < 0.5
    noise = (offsets[lo:hi], flips[lo:hi])
  else:  # imagenet: per example, the crop attempts' uniforms and one for the flip
    noise = rng.random((global_batch_size, 4 * CROP_ATTEMPTS + 1))[lo:hi]
  return _make_batch(ds, indices, augment=ds.augment, noise=noise)


def eval_batches(ds: Dataset, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The whole split in order, in batches of one shape.

  `batch_size` is global: each process gets its rows of every global batch (the same
  number of batches on every process). The last batch is padded with rows of zeros whose
  ``mask`` is 0.

  Yields:
    ``image`` float32 [b, H, W, C], ``label`` int32 [b], ``mask`` float32 [b] (1 for real
    examples), where b = batch_size / process_count.
  """
  lo, hi = _local_rows(batch_size, process_index, process_count)
  for start in range(0, ds.num_examples, batch_size):
    rows = np.arange(start + lo, start + hi)
    valid = rows < ds.num_examples
    batch = _make_batch(ds, rows[valid], augment="none")
    mask = valid.astype(np.float32)
    if not valid.all():
      pad = len(rows) - int(valid.sum())
      batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
    batch["mask"] = mask
    yield batch


def _make_batch(ds: Dataset, indices: np.ndarray, augment: str,
                noise: Any = None) -> dict[str, np.ndarray]:
  """Gathers, augments and normalises the examples `indices`."""
  if ds.source is not None:
    images, labels = _decode_batch(ds, indices, noise if augment == "imagenet" else None)
  else:
    images, labels = ds.images[indices], ds.labels[indices]
    if augment == "cifar":
      images = pad_crop_flip(images, *noise)
  return {"image": normalize(images, ds.mean, ds.std),
          "label": np.asarray(labels, np.int32)}


def normalize(images: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """uint8 [..., W, C] -> float32 ``(x / 255 - mean) / std`` per channel."""
  width = images.shape[-2]
  # Broadcasting over a trailing axis of C = 1 or 3 runs NumPy's inner loop per pixel;
  # over rows of W * C values it runs once per row (4x faster for CIFAR batches).
  scale = np.tile(1.0 / (255.0 * np.asarray(std, np.float32)), width).astype(np.float32)
  shift = np.tile(255.0 * np.asarray(mean, np.float32), width).astype(np.float32)
  out = images.astype(np.float32)
  rows = out.reshape(*out.shape[:-2], width * out.shape[-1])
  rows -= shift
  rows *= scale
  return out


def pad_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                  pad: int = CIFAR_PAD) -> np.ndarray:
  """CIFAR augmentation: zero-pad by `pad`, crop back to H x W, mirror; vectorised.

  Args:
    images: [b, H, W, C].
    offsets: int [b, 2], the crop's (top, left) in the padded image, in [0, 2 * pad].
    flips: bool [b], mirror the crop left-right.
    pad: padding on every side.

  Returns:
    [b, H, W, C], same dtype.
  """
  b, h, w, c = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  # One opaque item per pixel: the gather and the mirror then move whole pixels, not
  # channel by channel (8x faster than fancy-indexing rows and columns).
  pixels = padded.view(np.dtype((np.void, c * images.itemsize)))[..., 0]
  windows = np.lib.stride_tricks.sliding_window_view(pixels, (h, w), axis=(1, 2))
  out = windows[np.arange(b), offsets[:, 0], offsets[:, 1]]  # a copy: [b, h, w]
  out[flips] = out[flips][:, :, ::-1]
  return out.view(images.dtype).reshape(b, h, w, c)


# --------------------------------------------------------------------------------------
# ImageNet-style decoding and cropping.

_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_DECODE_THREADS: int | None = None  # None: one per core


def set_decode_threads(threads: int | None) -> None:
  """Worker threads that decode and crop JPEG batches (default, None: one per core).

  PIL releases the GIL while it decodes and resizes, so the threads run in parallel;
  ``benchmarks/input_pipeline.py --jpeg_threads`` measures how the rate scales.
  """
  global _POOL, _DECODE_THREADS  # pylint: disable=global-statement
  if threads is not None and (int(threads) != threads or threads < 1):
    raise UserError(f"decode threads must be a positive int or None, got {threads!r}.")
  if _POOL is not None:
    _POOL.shutdown(wait=True)
  _POOL, _DECODE_THREADS = None, threads


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  global _POOL  # pylint: disable=global-statement
  if _POOL is None:
    _POOL = concurrent.futures.ThreadPoolExecutor(
        max_workers=_DECODE_THREADS or os.cpu_count() or 1,
        thread_name_prefix="jaxprune-decode")
  return _POOL


def random_resized_crop_box(height: int, width: int, uniforms: np.ndarray,
                            scale: tuple[float, float] = CROP_SCALE,
                            ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, ...]:
  """Inception-style crop: area share in `scale`, aspect ratio (w/h) in `ratio`.

  Tries ``len(uniforms) // 4`` times to draw a box that fits; falls back to the
  largest centered box whose aspect ratio lies in `ratio`.

  Args:
    height: image height.
    width: image width.
    uniforms: float [4 * attempts] in [0, 1): area, log-ratio, top, left per attempt.
    scale: range of the crop's share of the image area.
    ratio: range of the crop's width / height.

  Returns:
    (top, left, crop_height, crop_width).
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for u_area, u_ratio, u_top, u_left in np.asarray(uniforms).reshape(-1, 4):
    target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = min(int(u_top * (height - h + 1)), height - h)
      left = min(int(u_left * (width - w + 1)), width - w)
      return top, left, h, w
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, resize: int = IMAGENET_RESIZE,
                    crop: int = IMAGENET_SIZE) -> tuple[float, ...]:
  """The box that "resize the shorter side to `resize`, center crop `crop`" keeps.

  Returns:
    (top, left, crop_height, crop_width) in the original image's (float) coordinates.
  """
  size = crop * min(height, width) / resize
  return (height - size) / 2, (width - size) / 2, size, size


def crop_resize(image, box: Sequence[float], size: int, flip: bool = False) -> np.ndarray:
  """Resamples the box (top, left, h, w) of a PIL image to size x size (bilinear).

  One resample of the box, without an intermediate crop: the interior equals
  crop-then-resize exactly; the filter may read pixels just outside the box for the
  border rows, which avoids the crop's edge clamping.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  top, left, h, w = box
  out = image.resize((size, size), Image.Resampling.BILINEAR,
                     box=(left, top, left + w, top + h))
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  array = np.asarray(out, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def decode_and_crop(encoded: bytes, channels: int, noise: np.ndarray | None,
                    size: int = IMAGENET_SIZE) -> np.ndarray:
  """Decodes one encoded image and applies the train (noise given) or eval crop.

  Args:
    encoded: JPEG/PNG bytes.
    channels: 3 (RGB) or 1 (grayscale).
    noise: float [4 * attempts + 1] uniforms for :func:`random_resized_crop_box` and the
      flip, or None for the eval crop.
    size: output side.

  Returns:
    uint8 [size, size, channels].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.open(io.BytesIO(encoded))
  image = image.convert("RGB" if channels == 3 else "L")
  if noise is None:
    return crop_resize(image, center_crop_box(image.height, image.width, crop=size), size)
  box = random_resized_crop_box(image.height, image.width, noise[:-1])
  return crop_resize(image, box, size, flip=bool(noise[-1] < 0.5))


def _decode_batch(ds: Dataset, indices: np.ndarray,
                  noise: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  h, w, c = ds.image_shape
  images = np.empty((len(indices), h, w, c), np.uint8)
  if not len(indices):
    return images, np.zeros((0,), np.int32)
  records = ds.source.__getitems__([int(i) for i in indices])

  def work(i):
    images[i] = decode_and_crop(records[i]["image"], c, None if noise is None else noise[i],
                                size=h)

  list(_pool().map(work, range(len(records))))
  return images, np.asarray([r["label"] for r in records], np.int32)
