"""Image folders: ``<split>/<class>/<image>`` as a directory or a tarball, decoded once.

``load(path, cache_dir)`` returns ((x_train, y_train, x_test, y_test), class names) with uint8
NHWC images, labels the class folders sorted by name. A tarball is read in one sequential pass
without extraction; a truncated or corrupt archive, an empty class folder, a class missing from
a split or images of different sizes are a DataError naming the problem. Images are the
files named ``EXTENSIONS`` (what Pillow reads); any other file in a class folder is left out
with one warning that counts them, given again on every load from the cache. The decoded arrays
are cached as an ``.npz`` in ``cache_dir`` keyed by the source's path, size and mtime, written
only after every image decoded (nothing partial is ever cached).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import lzma
import os
import tarfile
import tempfile
import warnings
import zlib

import numpy as np

from sovr_jax import progress
from sovr_jax.errors import DataError, DatasetNotFoundError

SPLITS = ("train", "test")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
              ".pgm")
# 2: 16-bit grayscale images keep their high byte (1 saturated them); 3: BMP, GIF, TIFF, WebP
# and PPM/PGM are read too (2 left them out without a word); 4: the warning about files left
# out is cached with the arrays, and their names are part of a directory's key.
CACHE_VERSION = 4

LAYOUT_HELP = (
    "Expected layout: <path>/train/<class>/*.png (or .jpg, .bmp, .tif, .webp, ...) and "
    "<path>/test/<class>/*.png (optionally inside one top-level "
    "folder), as a directory or a .tar/.tar.gz/.tgz file.")


@dataclasses.dataclass(frozen=True)
class ImageFolderListing:
  """What an image folder holds, from its file names only (nothing decoded)."""

  path: str
  root: str                    # top-level folder inside the source ('' if none)
  class_names: tuple[str, ...]
  counts: dict[str, dict[str, int]]   # split -> class -> number of images

  def num_images(self, split: str) -> int:
    return sum(self.counts.get(split, {}).values())


def _is_tarball(path: str) -> bool:
  return os.path.isfile(path) and tarfile.is_tarfile(path)


def _is_image_name(fname: str) -> bool:
  return (not fname.startswith(".")
          and fname.lower().endswith(EXTENSIONS))


def _split_parts(relpath: str) -> list[str]:
  parts = [p for p in relpath.replace("\\", "/").split("/") if p not in ("",
                                                                         ".")]
  return parts


def _folder_root(path: str) -> str:
  """For a directory: '' if it has train/ itself, else its single subfolder with train/."""
  if os.path.isdir(os.path.join(path, "train")):
    return ""
  subdirs = [d for d in sorted(os.listdir(path))
             if not d.startswith(".") and os.path.isdir(os.path.join(path, d))]
  if len(subdirs) == 1 and os.path.isdir(os.path.join(path, subdirs[0],
                                                      "train")):
    return subdirs[0]
  raise DatasetNotFoundError(f"No train/ folder found in image folder "
                             f"{path!r}. {LAYOUT_HELP}")


def _iter_dir(path: str, read: bool, others: list[str] | None = None):
  """Yields (split, class, file name, bytes|None) and (split, class, None, None) for class dirs;
  appends ``split/class/name`` of every other (not hidden) file in a class dir to ``others``."""
  root = _folder_root(path)
  base = os.path.join(path, root)
  for split in SPLITS:
    sdir = os.path.join(base, split)
    if not os.path.isdir(sdir):
      continue
    for cls in sorted(os.listdir(sdir)):
      cdir = os.path.join(sdir, cls)
      if cls.startswith(".") or not os.path.isdir(cdir):
        continue
      yield split, cls, None, None
      for fname in sorted(os.listdir(cdir)):
        fpath = os.path.join(cdir, fname)
        if not _is_image_name(fname):
          if others is not None and not fname.startswith("."):
            others.append(f"{split}/{cls}/{fname}")
        elif os.path.isfile(fpath):
          blob = None
          if read:
            with open(fpath, "rb") as f:
              blob = f.read()
          yield split, cls, fname, blob


def _iter_tar(path: str, read: bool, others: list[str] | None = None):
  """Same as _iter_dir for a tarball, in one sequential pass (no extraction).

  A truncated or corrupt archive raises DataError naming the file: a compressed one fails
  in the decompressor, a plain one lacks tar's end-of-archive blocks (tarfile itself stops
  at the cut without a word) or a member's data is short.
  """
  try:
    yield from _iter_tar_members(path, read, others)
  except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
    raise DataError(f"The archive {path!r} is truncated or corrupt ({type(e).__name__}: {e}). "
                    f"Copy or download it again; nothing was loaded or cached.") from e


def _iter_tar_members(path: str, read: bool, others: list[str] | None):
  root = None
  seen: set[tuple[str, str]] = set()
  with tarfile.open(path, "r:*") as tar:
    for member in tar:
      parts = _split_parts(member.name)
      if not parts:
        continue
      if parts[0] in SPLITS:
        this_root, rest = "", parts
      elif len(parts) >= 2 and parts[1] in SPLITS:
        this_root, rest = parts[0], parts[1:]
      else:
        continue
      if root is None:
        root = this_root
      elif root != this_root:
        raise DataError(
            f"Tarball {path!r} holds splits under more than one top-level "
            f"folder ({root!r} and {this_root!r}). {LAYOUT_HELP}")
      if len(rest) < 2 or rest[1].startswith("."):
        continue
      is_class_dir = len(rest) == 2 and member.isdir()
      is_image = (len(rest) == 3 and member.isfile()
                  and _is_image_name(rest[2]))
      if (others is not None and len(rest) == 3 and member.isfile() and not is_image
          and not rest[2].startswith(".")):
        others.append("/".join(rest))
      if (is_class_dir or is_image) and (rest[0], rest[1]) not in seen:
        seen.add((rest[0], rest[1]))
        yield rest[0], rest[1], None, None
      if is_image:
        blob = tar.extractfile(member).read() if read else None
        if read and len(blob) != member.size:
          raise tarfile.ReadError(f"{member.name} holds {len(blob)} of its {member.size} bytes")
        yield rest[0], rest[1], rest[2], blob
    # tar ends with two zero blocks; a plain archive cut at a member boundary lacks them.
    if _tar_compression(path) is None and os.path.getsize(path) < tar.offset + 2 * 512:
      raise tarfile.ReadError(f"no end-of-archive blocks after byte {tar.offset} (the file "
                              f"has {os.path.getsize(path)} bytes)")


def _tar_compression(path: str) -> str | None:
  """'gz', 'bz2', 'xz' from the file's magic bytes, or None for a plain tar."""
  with open(path, "rb") as f:
    head = f.read(6)
  for magic, kind in ((b"\x1f\x8b", "gz"), (b"BZh", "bz2"), (b"\xfd7zXZ", "xz")):
    if head.startswith(magic):
      return kind
  return None


def _iter_source(path: str, read: bool, others: list[str] | None = None):
  if os.path.isdir(path):
    return _iter_dir(path, read, others)
  if _is_tarball(path):
    return _iter_tar(path, read, others)
  if os.path.exists(path):
    raise DataError(f"Image folder path {path!r} is neither a directory nor "
                     f"a tar archive. {LAYOUT_HELP}")
  raise DatasetNotFoundError(f"Image folder {path!r} does not exist. "
                             f"{LAYOUT_HELP}")


def _check_path(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.exists(path):
    raise DatasetNotFoundError(f"Image folder {path!r} does not exist. "
                               f"{LAYOUT_HELP}")
  return path


def list_image_folder(path: str) -> ImageFolderListing:
  """Lists classes and per-split image counts without decoding any image.

  For a tarball this still decompresses it once (about a second for the
  19 MB CIFAR-10 JPEG copy) but reads no image bytes into memory.
  """
  path = _check_path(path)
  counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
  for split, cls, fname, _ in _iter_source(path, read=False):
    counts[split].setdefault(cls, 0)
    if fname is not None:
      counts[split][cls] += 1
  classes = tuple(sorted(set(counts["train"]) | set(counts["test"])))
  root = _folder_root(path) if os.path.isdir(path) else _tar_root(path)
  return ImageFolderListing(path=path, root=root, class_names=classes,
                            counts=counts)


def _tar_root(path: str) -> str:
  with tarfile.open(path, "r:*") as tar:
    for member in tar:
      parts = _split_parts(member.name)
      if parts and parts[0] in SPLITS:
        return ""
      if len(parts) >= 2 and parts[1] in SPLITS:
        return parts[0]
  return ""


def _decode_image(blob: bytes) -> np.ndarray:
  """Decodes one image: uint8 [H, W] for grayscale ('1', 'L', 'LA', a palette image whose
  pixels are all gray, and 16-bit 'I;16*' / 'I', whose high byte is kept, where PIL's convert
  would saturate at 255), else [H, W, 3]
  RGB (PIL reads 16-bit colour PNGs as their high bytes itself, so both agree)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(blob)) as im:
    if im.mode.startswith("I;16") or im.mode == "I":
      a = np.asarray(im).astype(np.int64)
      if a.min() < 0 or a.max() > 65535:
        raise DataError(f"a {im.mode} image with values in [{a.min()}, {a.max()}] is not a "
                        f"16-bit image")
      return (a >> 8).astype(np.uint8)
    if im.mode == "F":
      raise DataError("floating-point images (mode F) are not supported; save them as "
                      "8- or 16-bit PNG")
    if im.mode in ("1", "L", "LA"):
      return np.asarray(im.convert("L"), dtype=np.uint8)
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if im.mode in ("P", "PA") and (rgb == rgb[..., :1]).all():
      return rgb[..., 0]  # A palette of grays (GIF has no grayscale mode): grayscale.
    return rgb


def _left_out_warning(path: str, others: list[str]) -> str:
  """The warning about files in class folders that are not images, or "" when there are none."""
  if not others:
    return ""
  exts = sorted({os.path.splitext(o)[1].lower() or "(none)" for o in others})
  return (f"Image folder {path!r}: {len(others)} file(s) in class folders are not "
          f"images this loader reads and were left out (e.g. {others[0]}; endings: "
          f"{', '.join(exts)}; images end in {', '.join(EXTENSIONS)}). Convert them or "
          f"move them out of the class folders.")


def _decode_folder(path: str):
  """Decodes every image; returns ((x_tr, y_tr, x_te, y_te), class_names, left-out warning)."""
  entries: dict[str, list[tuple[str, str, np.ndarray]]] = {
      s: [] for s in SPLITS}
  class_dirs: dict[str, set[str]] = {s: set() for s in SPLITS}
  bar = progress.Progress(f"decoding {os.path.basename(path)}", unit="img")
  others: list[str] = []
  for split, cls, fname, blob in _iter_source(path, read=True, others=others):
    class_dirs[split].add(cls)
    if fname is None:
      continue
    bar.update()
    try:
      img = _decode_image(blob)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"Cannot decode {split}/{cls}/{fname} in {path!r}: "
                       f"{e}") from e
    entries[split].append((cls, fname, img))

  bar.close()
  for split in SPLITS:
    if not entries[split]:
      raise DatasetNotFoundError(
          f"Image folder {path!r} has no {split} images. {LAYOUT_HELP}")
  class_names = tuple(sorted(class_dirs["train"]))
  extra = sorted(class_dirs["test"] - class_dirs["train"])
  if extra:
    raise DataError(f"Image folder {path!r}: test classes {extra} have no "
                    f"train folder (train classes: {list(class_names)}).")
  for split in SPLITS:
    have = {e[0] for e in entries[split]}
    empty = sorted(class_dirs[split] - have)
    if empty:
      raise DataError(f"Image folder {path!r}: the class folder(s) {split}/{', '.join(empty)} "
                      f"hold no images; an empty folder would become a class of its own. "
                      f"Remove the folder or add its images.")
    missing = sorted(set(class_names) - have)
    if missing:
      raise DataError(f"Image folder {path!r}: the {split} split has no images of the "
                      f"class(es) {missing} (train classes: {list(class_names)}). Every class "
                      f"needs {split} images; add them or remove the class.")
  label_of = {c: i for i, c in enumerate(class_names)}

  all_imgs = [e[2] for s in SPLITS for e in entries[s]]
  gray = all(im.ndim == 2 for im in all_imgs)
  ref_split, ref = SPLITS[0], entries[SPLITS[0]][0]
  hw = ref[2].shape[:2]
  out = []
  for split in SPLITS:
    items = sorted(entries[split], key=lambda e: (label_of[e[0]], e[1]))
    imgs = []
    for cls, fname, im in items:
      if im.shape[:2] != hw:
        raise DataError(
            f"Image folder {path!r}: images differ in size: "
            f"{ref_split}/{ref[0]}/{ref[1]} is {hw[0]}x{hw[1]} but "
            f"{split}/{cls}/{fname} is {im.shape[0]}x{im.shape[1]} (HxW). "
            f"Resize them to one size first.")
      if gray:
        im = im[..., None]
      elif im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=-1)
      imgs.append(im)
    out.append(np.stack(imgs).astype(np.uint8))
    out.append(np.asarray([label_of[e[0]] for e in items], dtype=np.int32))
  return tuple(out), class_names, _left_out_warning(path, others)


def _source_key(path: str) -> str:
  """Identifies the source's contents: path, and the size, mtime and ctime of the archive or of
  every image the loader reads (class folders that are links followed, as the loader does), and
  the names of the other files in a directory's class folders (their warning is cached).
  The ctime changes with every copy, so an archive replaced by one of the same size whose
  mtime was kept (``cp -p``, ``rsync -a``) is decoded again."""
  h = hashlib.sha256()
  h.update(f"v{CACHE_VERSION}\0{path}\0".encode())
  if os.path.isdir(path):
    base = os.path.join(path, _folder_root(path))
    others: list[str] = []
    for split, cls, fname, _ in _iter_dir(path, read=False, others=others):
      if fname is None:
        continue
      st = os.stat(os.path.join(base, split, cls, fname))
      h.update(f"{split}/{cls}/{fname}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0"
               .encode())
    h.update("\0".join(["others"] + sorted(others)).encode())
  else:
    st = os.stat(path)
    h.update(f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0".encode())
  return h.hexdigest()


def _cache_file(path: str, key: str, cache_dir: str | None) -> str:
  cache_dir = os.path.expanduser(cache_dir)
  base = os.path.basename(path.rstrip(os.sep)) or "root"
  base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)
  return os.path.join(cache_dir, f"image_folder-{base}-{key[:20]}.npz")


_CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_cache(cache_file: str, key: str):
  try:
    with np.load(cache_file, allow_pickle=False) as z:
      if str(z["key"]) != key:
        return None
      arrays = tuple(z[k] for k in _CACHE_ARRAYS)
      class_names = tuple(str(c) for c in z["class_names"])
      left_out = str(z["left_out"])
  except (OSError, KeyError, ValueError, EOFError):
    return None
  return arrays, class_names, left_out


def _write_cache(cache_file: str, key: str, arrays, class_names, left_out: str) -> None:
  cache_dir = os.path.dirname(cache_file)
  tmp = None
  try:
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, key=np.asarray(key), class_names=np.asarray(class_names),
               left_out=np.asarray(left_out), **dict(zip(_CACHE_ARRAYS, arrays)))
    os.replace(tmp, cache_file)
    tmp = None
  except OSError as e:
    warnings.warn(f"Could not write the image folder cache {cache_file!r}: "
                  f"{e}")
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def load(path: str, cache_dir: str | None):
  path = _check_path(path)
  key = _source_key(path)
  cache_file = _cache_file(path, key, cache_dir)
  cached = _read_cache(cache_file, key) if os.path.exists(cache_file) else None
  if cached is None:
    cached = _decode_folder(path)
    _write_cache(cache_file, key, *cached)
  arrays, class_names, left_out = cached
  if left_out:
    warnings.warn(left_out, stacklevel=2)
  return arrays, class_names
