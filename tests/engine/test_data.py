"""Tests for jaxprune.data: real datasets built offline, batches, augmentation, errors.

The real data (../shared/data relative to the project root) is required in CI
(CI=true fails without it) and skipped elsewhere when missing.
"""

import importlib.util
import io
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

import ml_collections
import numpy as np
import pytest
from conftest import require, require_shared
from PIL import Image

from jaxprune import data
from jaxprune.errors import UserError

DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
CIFAR_NPZ = DATA / "cifar10-subset" / "cifar10_exact_train0-3999_test0-999.npz"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _require(path: pathlib.Path):
  require_shared(path)


def _require_tensorflow():
  require(importlib.util.find_spec("tensorflow") is not None,
          "building TFDS datasets needs TensorFlow: pip install 'jaxprune[test]'")


def _cfg(**kwargs):
  return ml_collections.ConfigDict(kwargs)


def _ids_dataset(n, image_shape=(8, 8, 3), augment="none"):
  """A dataset whose label is the example's index, to follow examples through batches."""
  rng = np.random.default_rng(n)
  return data.Dataset(
      name="ids", num_classes=n, num_examples=n, image_shape=image_shape,
      images=rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8),
      labels=np.arange(n, dtype=np.int32), augment=augment,
      mean=(0.5,) * image_shape[-1], std=(0.5,) * image_shape[-1])


def _unnormalize(images, ds):
  x = images * (255.0 * np.asarray(ds.std)) + 255.0 * np.asarray(ds.mean)
  return np.round(x).astype(np.uint8)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
  """MNIST built once with the stock TFDS builder from the manual files, then loaded."""
  _require(DATA / "mnist")
  _require_tensorflow()
  data_dir = tmp_path_factory.mktemp("tfds")
  splits = data.load(_cfg(name="mnist", data_dir=str(data_dir),
                          manual_dir=str(DATA / "mnist")))
  return data_dir, splits


# ---------------------------------------------------------------------------------------
# Real datasets.


@pytest.mark.slow
def test_mnist_offline_build_has_canonical_sizes_and_label_counts(mnist):
  _, splits = mnist
  train, test = splits["train"], splits["test"]
  assert (train.num_examples, test.num_examples) == (60000, 10000)
  assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
  assert train.image_shape == (28, 28, 1) and train.num_classes == 10
  assert train.augment == "none"  # auto: no augmentation for MNIST-like data
  np.testing.assert_array_equal(np.bincount(train.labels), MNIST_TRAIN_COUNTS)
  np.testing.assert_array_equal(np.bincount(test.labels), MNIST_TEST_COUNTS)


@pytest.mark.slow
def test_mnist_second_load_reads_the_array_cache_without_rebuilding(mnist):
  data_dir, splits = mnist
  assert sorted(p.name for p in data_dir.glob("mnist/*/jaxprune-*-arrays.npz")) == [
      "jaxprune-test-arrays.npz", "jaxprune-train-arrays.npz"]
  # A manual_dir that does not exist proves no build is attempted.
  again = data.load(_cfg(name="mnist", data_dir=str(data_dir), manual_dir="/nonexistent"))
  for split in ("train", "test"):
    np.testing.assert_array_equal(again[split].images, splits[split].images)
    np.testing.assert_array_equal(again[split].labels, splits[split].labels)


def _python_without_tensorflow(tmp_path: pathlib.Path, script: str):
  """Runs `script` in a Python that sees every installed package except TensorFlow.

  The site-packages holding TensorFlow is replaced by a directory of links to all of its
  entries but TensorFlow's own, so TFDS and etils find no TensorFlow, as on a machine
  where it was never installed.
  """
  tf_site = pathlib.Path(importlib.util.find_spec("tensorflow").origin).parents[1]
  farm = tmp_path / "site-packages"
  farm.mkdir()
  for entry in tf_site.iterdir():
    if entry.name == "tensorflow" or entry.name.startswith(("tensorflow-", "tensorflow_cpu")):
      continue
    (farm / entry.name).symlink_to(entry)
  repo = pathlib.Path(__file__).resolve().parents[2]
  prelude = f"import site, sys; site.addsitedir({str(farm)!r}); sys.path.insert(0, {str(repo)!r})\n"
  return subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(script)],
                        capture_output=True, text=True, check=False, cwd=tmp_path)


@pytest.mark.slow
def test_reading_a_prepared_split_works_without_tensorflow(mnist, tmp_path):
  """TensorFlow absent: reading a prepared split works, a build raises UserError."""
  data_dir, splits = mnist
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir / "mnist", copy / "mnist")
  for cache in copy.glob("mnist/*/jaxprune-test-arrays.npz"):
    cache.unlink()  # the test split must come from the array_record files
  result = _python_without_tensorflow(tmp_path, f"""
      import importlib.util
      import numpy as np
      from jaxprune import data
      from jaxprune.errors import UserError
      assert importlib.util.find_spec("tensorflow") is None
      splits = data.load({{"name": "mnist", "data_dir": {str(copy)!r}}})
      np.save("test_images.npy", splits["test"].images)
      np.save("test_labels.npy", splits["test"].labels)
      try:
        data.load({{"name": "fashion_mnist", "data_dir": {str(copy)!r},
                    "manual_dir": {str(DATA / "fashion-mnist")!r}}})
      except UserError as e:
        print("USERERROR", e)
      import sys
      print("TENSORFLOW LOADED", "tensorflow" in sys.modules)
      """)
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_array_equal(np.load(tmp_path / "test_images.npy"),
                                splits["test"].images)
  np.testing.assert_array_equal(np.load(tmp_path / "test_labels.npy"),
                                splits["test"].labels)
  assert "USERERROR" in result.stdout and "jaxprune[tfds-build]" in result.stdout
  assert "TENSORFLOW LOADED False" in result.stdout


@pytest.mark.slow
def test_fashion_mnist_built_beside_mnist_is_not_mnist(mnist):
  """The extract cache pitfall: both datasets use the same four file names."""
  _require(DATA / "fashion-mnist")
  data_dir, mnist_splits = mnist
  splits = data.load(_cfg(name="fashion_mnist", data_dir=str(data_dir),
                          manual_dir=str(DATA / "fashion-mnist")))
  train, test = splits["train"], splits["test"]
  assert (train.num_examples, test.num_examples) == (60000, 10000)
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  assert not np.array_equal(train.images[:100], mnist_splits["train"].images[:100])


def test_npz_cifar10_subset_loads_with_canonical_shapes():
  _require(CIFAR_NPZ)
  splits = data.load(_cfg(name="npz", path=str(CIFAR_NPZ)))
  train, test = splits["train"], splits["test"]
  assert train.images.shape == (4000, 32, 32, 3) and test.images.shape == (1000, 32, 32, 3)
  assert train.num_classes == 10 and train.image_shape == (32, 32, 3)
  assert train.augment == "cifar"
  assert train.labels.dtype == np.int32
  # First labels of the canonical CIFAR-10 order: frog truck truck / cat ship ship.
  np.testing.assert_array_equal(train.labels[:3], [6, 9, 9])
  np.testing.assert_array_equal(test.labels[:3], [3, 8, 8])
  batch = data.batch_at(train, 0, 128, seed=0, train=True)
  assert batch["image"].shape == (128, 32, 32, 3) and batch["image"].dtype == np.float32
  assert abs(float(batch["image"].mean())) < 0.5  # CIFAR-10 statistics roughly centre it


# ---------------------------------------------------------------------------------------
# Augmentation.


def test_pad_crop_flip_matches_a_per_image_reference():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8)
  offsets = rng.integers(0, 9, size=(32, 2))
  flips = rng.random(32) < 0.5
  out = data.pad_crop_flip(images, offsets, flips)
  for i in range(32):
    padded = np.pad(images[i], ((4, 4), (4, 4), (0, 0)))
    window = padded[offsets[i, 0]:offsets[i, 0] + 32, offsets[i, 1]:offsets[i, 1] + 32]
    np.testing.assert_array_equal(out[i], window[:, ::-1] if flips[i] else window)


def test_train_batches_are_sub_windows_of_the_padded_examples():
  ds = _ids_dataset(300, image_shape=(12, 12, 3), augment="cifar")
  step, batch_size, seed = 7, 32, 5
  batch = data.batch_at(ds, step, batch_size, seed=seed, train=True)
  epoch, position = divmod(step, data.steps_per_epoch(ds, batch_size))
  indices = data.epoch_order(ds.num_examples, seed, epoch)[
      position * batch_size:(position + 1) * batch_size]
  np.testing.assert_array_equal(batch["label"], indices)
  images = _unnormalize(batch["image"], ds)
  num_flipped = 0
  for image, index in zip(images, indices):
    padded = np.pad(ds.images[index], ((4, 4), (4, 4), (0, 0)))
    windows = [(padded[y:y + 12, x:x + 12], flip) for y in range(9) for x in range(9)
               for flip in (False, True)]
    matches = [flip for w, flip in windows
               if np.array_equal(image, w[:, ::-1] if flip else w)]
    assert matches, f"example {index} is not a window of its padded image"
    num_flipped += matches[0]
  assert 0 < num_flipped < batch_size  # both mirrored and plain crops occur


def test_same_seed_and_step_give_identical_batches():
  ds = data.synthetic(512, 64, (32, 32, 3), 10, seed=3)["train"]
  a = data.batch_at(ds, 11, 64, seed=1, train=True)
  b = data.batch_at(ds, 11, 64, seed=1, train=True)
  for key in ("image", "label"):
    np.testing.assert_array_equal(a[key], b[key])
  c = data.batch_at(ds, 11, 64, seed=2, train=True)
  assert not np.array_equal(a["image"], c["image"])
  d = data.batch_at(ds, 12, 64, seed=1, train=True)
  assert not np.array_equal(a["image"], d["image"])


def test_eval_batches_are_not_augmented():
  ds = _ids_dataset(100, augment="cifar")
  batch = data.batch_at(ds, 1, 10, seed=0, train=False)
  np.testing.assert_array_equal(batch["label"], np.arange(10, 20))
  np.testing.assert_array_equal(_unnormalize(batch["image"], ds), ds.images[10:20])


# ---------------------------------------------------------------------------------------
# Order, processes, splits.


def test_each_example_appears_once_per_epoch_and_epochs_differ():
  ds = _ids_dataset(1000)
  batch_size = 64
  steps = data.steps_per_epoch(ds, batch_size)
  assert steps == 15  # 1000 // 64; the remaining 40 examples are dropped
  epochs = []
  for epoch in range(2):
    seen = np.concatenate([
        data.batch_at(ds, epoch * steps + s, batch_size, seed=0, train=True)["label"]
        for s in range(steps)])
    assert len(seen) == len(np.unique(seen)) == steps * batch_size
    epochs.append(seen)
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_single_process_batch(process_count):
  ds = data.synthetic(400, 16, (32, 32, 3), 10, seed=0)["train"]
  for step in (0, 5, 13):  # 13 is in the second epoch
    whole = data.batch_at(ds, step, 32, seed=4, train=True)
    parts = [data.batch_at(ds, step, 32, seed=4, train=True, process_index=p,
                           process_count=process_count) for p in range(process_count)]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_per_class_split_gives_disjoint_deterministic_halves():
  labels = np.random.default_rng(0).integers(0, 7, size=999)
  a, b = data.per_class_split(labels, 0.5, seed=3)
  assert len(np.intersect1d(a, b)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(999))
  for cls in range(7):
    n = int((labels == cls).sum())
    assert int((labels[a] == cls).sum()) == round(n / 2)
  a2, b2 = data.per_class_split(labels, 0.5, seed=3)
  np.testing.assert_array_equal(a, a2)
  np.testing.assert_array_equal(b, b2)
  a3, _ = data.per_class_split(labels, 0.5, seed=4)
  assert not np.array_equal(a, a3)


def test_subset_keeps_the_chosen_examples_in_order():
  ds = _ids_dataset(50)
  indices = np.array([7, 3, 42])
  sub = data.subset(ds, indices)
  assert sub.num_examples == 3
  np.testing.assert_array_equal(sub.labels, indices)
  np.testing.assert_array_equal(sub.images, ds.images[indices])


def test_eval_batches_pad_the_last_batch_and_mask_it():
  ds = _ids_dataset(1000)
  batches = list(data.eval_batches(ds, 96))
  assert len(batches) == 11
  assert all(b["image"].shape == (96, 8, 8, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert mask.sum() == 1000 and not mask[1000:].any()
  np.testing.assert_array_equal(labels[:1000], np.arange(1000))
  np.testing.assert_array_equal(batches[-1]["image"][40:], 0)
  # Per process: every process gets 11 batches of 48, together the global batch.
  per_process = [list(data.eval_batches(ds, 96, process_index=p, process_count=2))
                 for p in range(2)]
  assert [len(p) for p in per_process] == [11, 11]
  for i, whole in enumerate(batches):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(
          np.concatenate([per_process[0][i][key], per_process[1][i][key]]), whole[key])


# ---------------------------------------------------------------------------------------
# Synthetic data.


def test_synthetic_is_deterministic_balanced_and_learnable():
  splits = data.synthetic(2000, 500, (32, 32, 3), 10, seed=0)
  again = data.synthetic(2000, 500, (32, 32, 3), 10, seed=0)
  np.testing.assert_array_equal(splits["train"].images, again["train"].images)
  other = data.synthetic(2000, 500, (32, 32, 3), 10, seed=1)
  assert not np.array_equal(splits["train"].images, other["train"].images)
  train, test = splits["train"], splits["test"]
  np.testing.assert_array_equal(np.bincount(train.labels), [200] * 10)
  # A nearest-class-mean classifier is far above chance (0.1): the classes carry signal.
  flat = lambda x: x.reshape(len(x), -1).astype(np.float32)
  means = np.stack([flat(train.images[train.labels == k]).mean(0) for k in range(10)])
  dists = ((flat(test.images)[:, None] - means[None]) ** 2).sum(-1)
  assert (dists.argmin(1) == test.labels).mean() > 0.5


def test_synthetic_grayscale_keeps_one_channel():
  ds = data.load(_cfg(name="synthetic", synthetic=dict(
      num_train=64, num_test=8, image_shape=(28, 28, 1), num_classes=4, seed=0)))["train"]
  assert ds.images.shape == (64, 28, 28, 1) and ds.augment == "none"
  assert ds.mean == (0.5,) and ds.std == (0.5,)
  assert data.batch_at(ds, 0, 16, seed=0, train=True)["image"].shape == (16, 28, 28, 1)


# ---------------------------------------------------------------------------------------
# ImageNet-style preprocessing (no ImageNet here: random images and prepared MNIST).


def test_random_resized_crop_box_respects_scale_ratio_and_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    height, width = rng.integers(50, 600, size=2)
    top, left, h, w = data.random_resized_crop_box(height, width, rng.random(40))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    if (h, w) != (height, width):  # not the fallback
      assert 0.08 * 0.9 <= h * w / (height * width) <= 1.0
      assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_box_falls_back_to_a_centered_box():
  # Every attempt asks for the whole area at ratio 4/3, which cannot fit a square.
  box = data.random_resized_crop_box(100, 100, np.full(40, 0.999999))
  assert box == (0, 0, 100, 100)
  box = data.random_resized_crop_box(100, 300, np.full(40, 0.999999))
  assert box == (0, 83, 100, 133)  # too wide: clamped to ratio 4/3, centered


def test_center_crop_box_matches_resize_256_crop_224():
  top, left, h, w = data.center_crop_box(384, 512)
  assert (top, left, h, w) == (24.0, 88.0, 336.0, 336.0)


def test_crop_resize_matches_crop_then_resize_and_flips():
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
  box = (17, 40, 150, 180)
  expected = np.asarray(image.crop((40, 17, 220, 167)).resize((224, 224),
                                                             Image.Resampling.BILINEAR))
  out = data.crop_resize(image, box, 224)
  # Resampling the box in place lets pixels just outside it into the border rows.
  np.testing.assert_array_equal(out[3:-3, 3:-3], expected[3:-3, 3:-3])
  np.testing.assert_array_equal(data.crop_resize(image, box, 224, flip=True), out[:, ::-1])
  whole = np.asarray(image.resize((224, 224), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(data.crop_resize(image, (0, 0, 300, 400), 224), whole)


def test_decode_and_crop_returns_fixed_shapes():
  rng = np.random.default_rng(0)
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, size=(333, 500, 3), dtype=np.uint8)).save(
      buffer, format="JPEG")
  encoded = buffer.getvalue()
  train = data.decode_and_crop(encoded, 3, rng.random(41))
  evaluated = data.decode_and_crop(encoded, 3, None)
  assert train.shape == evaluated.shape == (224, 224, 3) and train.dtype == np.uint8
  assert data.decode_and_crop(encoded, 1, None).shape == (224, 224, 1)


class _Jpegs:
  """A random-access source of encoded images (TFDS data_source's interface)."""

  def __init__(self, encoded, labels):
    self.encoded, self.labels = encoded, labels

  def __len__(self):
    return len(self.encoded)

  def __getitems__(self, keys):
    return [{"image": self.encoded[k], "label": self.labels[k]} for k in keys]


def test_jpeg_batches_do_not_depend_on_the_decode_threads():
  """The decode pool's size changes the speed only: the same step gives the same batch
  with 1 thread and with 3 (every image's crop comes from its own noise)."""
  rng = np.random.default_rng()
  encoded = []
  for _ in range(12):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)).save(
        buffer, format="JPEG")
    encoded.append(buffer.getvalue())
  labels = rng.integers(0, 3, size=12)
  ds = data.Dataset(name="jpegs", num_classes=3, num_examples=12, image_shape=(224, 224, 3),
                    source=_Jpegs(encoded, labels), augment="imagenet", mean=(0.5,) * 3,
                    std=(0.5,) * 3)
  step, seed = int(rng.integers(0, 5)), int(rng.integers(0, 1000))
  try:
    data.set_decode_threads(1)
    one = data.batch_at(ds, step, 6, seed=seed, train=True)
    data.set_decode_threads(3)
    three = data.batch_at(ds, step, 6, seed=seed, train=True)
  finally:
    data.set_decode_threads(None)
  np.testing.assert_array_equal(one["image"], three["image"])
  np.testing.assert_array_equal(one["label"], three["label"])
  with pytest.raises(data.UserError, match="decode threads"):
    data.set_decode_threads(0)


@pytest.mark.slow
def test_on_disk_source_path_with_prepared_mnist(mnist):
  """The ImageNet reading path (random access, PIL decode in threads) on real PNGs."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir, splits = mnist
  builder = tfds.builder("mnist", data_dir=str(data_dir))
  ds = data.tfds_source(builder, "test", augment="imagenet")
  assert ds.image_shape == (224, 224, 1) and ds.num_examples == 10000
  whole = data.batch_at(ds, 3, 8, seed=0, train=True)
  assert whole["image"].shape == (8, 224, 224, 1)
  parts = [data.batch_at(ds, 3, 8, seed=0, train=True, process_index=p, process_count=2)
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
  indices = data.epoch_order(10000, 0, 0)[24:32]
  np.testing.assert_array_equal(whole["label"], splits["test"].labels[indices])
  evaluated = next(data.eval_batches(data.subset(ds, np.arange(5)), 4))
  np.testing.assert_array_equal(evaluated["label"], splits["test"].labels[:4])


# ---------------------------------------------------------------------------------------
# Errors a user can fix.


def test_unknown_dataset_name_lists_the_known_names():
  with pytest.raises(UserError, match="cifar10.*imagenet2012.*synthetic"):
    data.load(_cfg(name="cifar11"))


def test_unknown_augmentation_is_a_user_error():
  with pytest.raises(UserError, match="augment"):
    data.load(_cfg(name="synthetic", augment="mixup"))


def test_missing_manual_dir_names_the_expected_files(tmp_path):
  with pytest.raises(UserError, match="train-images-idx3-ubyte.gz"):
    data.load(_cfg(name="mnist", data_dir=str(tmp_path / "tfds"),
                   manual_dir=str(tmp_path / "missing")))
  (tmp_path / "partial").mkdir()
  (tmp_path / "partial" / "train-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(UserError, match="lacks .*t10k-images-idx3-ubyte.gz"):
    data.load(_cfg(name="mnist", data_dir=str(tmp_path / "tfds"),
                   manual_dir=str(tmp_path / "partial")))


def test_an_unprepared_tfds_dataset_leaves_no_temporary_directory(tmp_path, monkeypatch):
  """TFDS's builder of an unprepared dataset makes a ``tempfile.mkdtemp`` it never
  removes; jaxprune gives it a scratch directory and deletes it."""
  _require_tensorflow()
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  with pytest.raises(UserError, match="train-images-idx3-ubyte.gz"):
    data.load(_cfg(name="mnist", data_dir=str(tmp_path / "tfds"),
                   manual_dir=str(tmp_path / "missing")))
  assert tempfile.tempdir == str(temp)  # restored
  assert not list(temp.iterdir())
  # TFDS itself does leave one (the leak this guards against is still there to catch).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.builder("mnist", data_dir=str(tmp_path / "tfds"))
  assert [p.name for p in temp.iterdir()] and all(p.name.endswith("tfds") for p in temp.iterdir())


def test_imagenet_without_manual_dir_names_the_tars(tmp_path):
  with pytest.raises(UserError, match="ILSVRC2012_img_train.tar"):
    data.load(_cfg(name="imagenet2012", data_dir=str(tmp_path)))


def test_missing_npz_path_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="config.dataset.path"):
    data.load(_cfg(name="npz", path=None))
  with pytest.raises(UserError, match="no such file"):
    data.load(_cfg(name="npz", path=str(tmp_path / "nope.npz")))
  np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(UserError, match="y_train"):
    data.load(_cfg(name="npz", path=str(tmp_path / "partial.npz")))


def test_batch_larger_than_the_dataset_is_a_user_error():
  with pytest.raises(UserError, match="batch size"):
    data.batch_at(_ids_dataset(10), 0, 16, seed=0, train=True)


@pytest.mark.parametrize("error", ["requests", "download"])
def test_offline_download_is_one_line_naming_manual_dir(tmp_path, monkeypatch, error):
  """Offline, TFDS's download ends in requests' ConnectionError (an OSError) or in its own
  DownloadError: either becomes one UserError naming config.dataset.manual_dir and the
  files, before any retry loop of ours."""
  import requests
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import dataset_builder
  exc = (requests.exceptions.ConnectionError("HTTPSConnectionPool(host='x'): Max retries")
         if error == "requests" else tfds.download.DownloadError("no network"))

  def offline(self, *args, **kwargs):
    raise exc
  monkeypatch.setattr(data, "_unreachable", lambda urls: None)  # the hosts answer
  monkeypatch.setattr(dataset_builder.DatasetBuilder, "download_and_prepare", offline)
  with pytest.raises(UserError, match=r"(?s)Could not download 'mnist'.*manual_dir.*"
                                      r"train-images-idx3-ubyte.gz") as info:
    data.load(_cfg(name="mnist", data_dir=str(tmp_path / "tfds")))
  assert type(exc).__name__ in str(info.value)
  # Another OSError is not a download: it reaches the user as itself.
  exc = PermissionError("read-only data_dir")
  with pytest.raises(PermissionError):
    data.load(_cfg(name="mnist", data_dir=str(tmp_path / "tfds")))


def test_unreachable_download_host_is_one_line_before_any_download(tmp_path, monkeypatch):
  """Without a connection to the dataset's hosts (name resolution fails here: a random
  host per run), the one line comes before TFDS starts (its retries take minutes); with a
  proxy for the scheme the hosts are not probed; a host that connects lets TFDS run."""
  import socket
  import types
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import dataset_builder
  for var in ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy"):
    monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(var.upper(), raising=False)
  started = []

  def download(self, *args, **kwargs):
    started.append(self.name)
    raise tfds.download.DownloadError("stopped by the test")
  monkeypatch.setattr(dataset_builder.DatasetBuilder, "download_and_prepare", download)
  host = f"h{np.random.randint(1 << 30)}.invalid"  # RFC 2606: never resolves
  monkeypatch.setattr(dataset_builder.DatasetBuilder, "url_infos", property(
      lambda self: {f"https://{host}/a/train-images-idx3-ubyte.gz":
                    types.SimpleNamespace(filename="train-images-idx3-ubyte.gz")}))
  with pytest.raises(UserError, match=rf"(?s)Could not download 'mnist' \(no connection "
                                      rf"to {host}:443 .*manual_dir.*train-images"):
    data.load(_cfg(name="mnist", data_dir=str(tmp_path / "tfds")))
  assert not started

  calls = []
  def connected(address, timeout):
    calls.append((address, timeout))
    return socket.socket()  # closed at once by the probe
  monkeypatch.setattr(socket, "create_connection", connected)
  with pytest.raises(UserError, match="DownloadError"):
    data.load(_cfg(name="mnist", data_dir=str(tmp_path / "tfds")))
  assert started == ["mnist"] and calls == [((host, 443), 5.0)]

  monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
  monkeypatch.setattr(socket, "create_connection", None)  # a probe would fail the test
  with pytest.raises(UserError, match="DownloadError"):
    data.load(_cfg(name="mnist", data_dir=str(tmp_path / "tfds")))
  assert started == ["mnist", "mnist"]
