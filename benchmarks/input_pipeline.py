"""Throughput of jaxprune.data.batch_at on this machine (images per second, one process).

Measures the host-side input pipeline only: gather, augmentation, normalisation into
float32 NHWC. CIFAR-shaped data (synthetic, and the CIFAR-10 subset .npz) with training
augmentation, MNIST from a prepared TFDS data_dir if there is one, and the ImageNet-style
JPEG decode + random resized crop on generated JPEGs. It never builds a TFDS dataset and
must not be read as a training-step benchmark.

  python benchmarks/input_pipeline.py            # defaults, a few minutes
  python benchmarks/input_pipeline.py --jpeg_threads 1 2 4 8   # decode scaling over cores
  python benchmarks/input_pipeline.py --steps 200 --tfds_data_dir ~/tensorflow_datasets
"""

import argparse
import io
import os
import pathlib
import platform
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jaxprune import data  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_NPZ = (ROOT.parent / "shared" / "data" / "cifar10-subset" /
               "cifar10_exact_train0-3999_test0-999.npz")


class _JpegSource:
  """An in-memory random-access source of encoded images, shaped like TFDS's."""

  def __init__(self, encoded, labels):
    self._encoded, self._labels = encoded, labels

  def __len__(self):
    return len(self._encoded)

  def __getitems__(self, keys):
    return [{"image": self._encoded[k], "label": self._labels[k]} for k in keys]


def _jpeg_dataset(num_images: int, height: int, width: int) -> data.Dataset:
  """ImageNet-sized JPEGs made from smooth synthetic images (realistic file sizes)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = data.synthetic(num_images, 1, (48, 64, 3), 10, seed=0)["train"]
  encoded = []
  for image in small.images:
    big = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    encoded.append(buffer.getvalue())
  return data.Dataset(name="jpeg", num_classes=10, num_examples=num_images,
                      image_shape=(224, 224, 3), source=_JpegSource(encoded, small.labels),
                      augment="imagenet", mean=(0.5,) * 3, std=(0.5,) * 3)


def _images_per_second(ds, batch_size, steps, train=True):
  for step in range(2):  # warm-up: epoch order, thread pool
    data.batch_at(ds, step, batch_size, seed=0, train=train)
  start = time.perf_counter()
  for step in range(2, 2 + steps):
    data.batch_at(ds, step, batch_size, seed=0, train=train)
  seconds = time.perf_counter() - start
  return steps * batch_size / seconds, 1e3 * seconds / steps


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100, help="timed batches per row")
  parser.add_argument("--batch_sizes", type=int, nargs="+", default=[128, 256])
  parser.add_argument("--synthetic_examples", type=int, default=50000,
                      help="train examples of the CIFAR-shaped synthetic dataset")
  parser.add_argument("--npz", default=str(DEFAULT_NPZ), help="CIFAR-shaped .npz dataset")
  parser.add_argument("--tfds_data_dir", default=None,
                      help="TFDS data_dir with a prepared mnist (default: TFDS's default)")
  parser.add_argument("--jpeg_steps", type=int, default=10,
                      help="timed batches of the JPEG row (0 skips it)")
  parser.add_argument("--jpeg_threads", type=int, nargs="+", default=None,
                      help="decode thread counts to compare (default: 1 and one per core)")
  parser.add_argument("--jpeg_rounds", type=int, default=5,
                      help="alternated rounds over the thread counts (median)")
  parser.add_argument("--gpu_images_per_s", type=float, default=3000.0,
                      help="what one modern GPU's ResNet-50 training step consumes")
  args = parser.parse_args(argv)

  print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, numpy {np.__version__}")

  rows = []
  syn = data.synthetic(args.synthetic_examples, 16, (32, 32, 3), 10, seed=0)["train"]
  rows.append((f"synthetic {syn.num_examples}x32x32x3", syn, "cifar"))
  if pathlib.Path(args.npz).is_file():
    npz = data.load({"name": "npz", "path": args.npz})["train"]
    rows.append((f"npz {npz.num_examples}x32x32x3", npz, "cifar"))
  else:
    print(f"skipped npz: {args.npz} not found")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if tfds.builder("mnist", data_dir=args.tfds_data_dir).is_prepared():
      mnist = data.load({"name": "mnist", "data_dir": args.tfds_data_dir})["train"]
      rows.append((f"mnist {mnist.num_examples}x28x28x1", mnist, "none"))
    else:
      print("skipped mnist: not prepared in the TFDS data_dir (jaxprune.data.load builds it)")
  except ImportError:
    print("skipped mnist: tensorflow_datasets not installed")

  print()
  print(f"{'dataset':<28} {'augment':<9} {'batch':>5} {'images/s':>10} {'ms/batch':>9}")
  for label, ds, augment in rows:
    for batch_size in args.batch_sizes:
      rate, ms = _images_per_second(ds, batch_size, args.steps)
      print(f"{label:<28} {augment:<9} {batch_size:>5} {rate:>10,.0f} {ms:>9.2f}")
  if args.jpeg_steps:
    jpeg = _jpeg_dataset(256, 375, 500)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.jpeg_threads or sorted({1, cores})
    samples = {}
    for _ in range(args.jpeg_rounds):  # thread counts alternated, the median kept
      for n in threads:
        data.set_decode_threads(n)
        for train in (True, False):  # train: decode + random resized crop + flip
          samples.setdefault((n, train), []).append(
              _images_per_second(jpeg, 128, args.jpeg_steps, train=train)[0])
    data.set_decode_threads(None)
    rates = {k: float(np.median(v)) for k, v in samples.items()}
    for n in threads:
      for train in (True, False):
        label = f"jpeg 500x375->224 {n} thr"
        rate = rates[(n, train)]
        print(f"{label:<28} {'imagenet' if train else 'eval':<9} {128:>5} {rate:>10,.0f} "
              f"{128e3 / rate:>9.2f}")
    one, most = rates[(threads[0], True)], rates[(threads[-1], True)]
    print()
    print(f"scaling {threads[0]} -> {threads[-1]} decode threads: {most / one:.2f}x "
          f"(ideal {threads[-1] / threads[0]:.0f}x); per thread {most / threads[-1]:,.0f} "
          f"images/s with training augmentation")
    print(f"one GPU's ResNet-50 step needs ~{args.gpu_images_per_s:,.0f} images/s: "
          f"{args.gpu_images_per_s / (most / threads[-1]):.0f} such threads (cores) at this "
          "per-thread rate")


if __name__ == "__main__":
  main()
