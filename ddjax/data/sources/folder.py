"""``folder:PATH``: images in one sub-folder per class, including Tiny-ImageNet's raw layout.

Promises: the sorted class-folder names are the class names; the train/test split follows
:func:`list_folder`'s rules (``train``/``test``, ``train``/``val``, Tiny-ImageNet's annotated
``val``, or a deterministic 20% per class); :func:`list_folder` lists without opening an image
(cheap for ImageNet's 1.28 M files, and shared with the streaming source
:mod:`ddjax.data.streaming`); :func:`load` reads images as uint8 with one channel when all are
grayscale, else three, and refuses images of different sizes (no resizing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ddjax.data.sources.base import Splits
from ddjax.errors import DDJaxError, check

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
_FOLDER_TEST_FRACTION = 0.2
# PIL modes read as 8-bit grayscale, and as 8-bit RGB; 16-bit and float modes would need a
# scale ddjax cannot guess.
GRAYSCALE_MODES = ("1", "L", "LA")
COLOUR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr")


def load(name: str, path: str, data_dir: str | None) -> Splits:
    """Reads images from one sub-folder per class (sorted folder names are the class names).

    The files and labels are those of :func:`list_folder` (which documents the splits). All
    images must have the same size (no resizing is done); grayscale images are repeated to
    three channels when the folder also holds colour images. ``name`` and ``data_dir`` are
    unused.
    """
    del name, data_dir
    listing = list_folder(path)
    train_files, test_files = listing.train.paths(), listing.test.paths()
    images = _read_image_files(train_files + test_files, listing.root)
    train_images, test_images = images[: len(train_files)], images[len(train_files) :]
    arrays = (train_images, listing.train.labels, test_images, listing.test.labels)
    return Splits(*arrays, class_names=listing.class_names, source=f"folder {listing.root}")


@dataclasses.dataclass(frozen=True, eq=False)
class FileList:
    """Labelled image files under ``root``, stored compactly (ImageNet lists 1.28 M of them).

    File ``i`` is ``root / directories[directory_index[i]] / names[i]``. Names are bytes in one
    NumPy array (about 30 bytes a file rather than a ``Path`` object's few hundred), which also
    keeps the list cheap to pickle into data-loading worker processes.
    """

    root: Path
    directories: tuple[str, ...]
    directory_index: np.ndarray  # (N,) int32 into `directories`
    names: np.ndarray  # (N,) bytes (os.fsencode of the file name)
    labels: np.ndarray  # (N,) int64 class indices

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> Path:
        """The path of file ``i``."""
        return self.root / self.directories[self.directory_index[i]] / os.fsdecode(self.names[i])

    def paths(self) -> list[Path]:
        """Every file's path, in order."""
        return [self.path(i) for i in range(len(self))]

    def subset(self, keep: np.ndarray) -> FileList:
        """The files whose indices (or boolean mask) are ``keep``, in order."""
        return dataclasses.replace(
            self,
            directory_index=self.directory_index[keep],
            names=self.names[keep],
            labels=self.labels[keep],
        )


@dataclasses.dataclass(frozen=True, eq=False)
class FolderListing:
    """The class names and the labelled train and test files of a ``folder:PATH`` dataset."""

    root: Path
    class_names: tuple[str, ...]
    train: FileList
    test: FileList


def list_folder(path: str, *, held_out_split: bool = True) -> FolderListing:
    """Lists the images and labels of a folder dataset without opening any image.

    Splits, in order of preference:

    * ``PATH/train/<class>/`` for training, and for testing the first of ``PATH/test``,
      ``PATH/val`` whose sub-folders are all train classes (ImageNet's layout). Tiny-ImageNet's
      raw layout works as is: images may sit deeper inside a class folder
      (``train/<wnid>/images/*.JPEG``), its unlabelled ``test/images`` is skipped, and
      ``val/images`` is labelled from ``val/val_annotations.txt``.
    * Otherwise (only ``PATH/train``, or class folders directly in ``PATH``): with
      ``held_out_split``, a deterministic 20% of each class (rounded down; a permutation from
      ``np.random.default_rng(0)``, drawn class by class) is the test set; without, a
      :class:`DDJaxError` (a stream of ImageNet without its ``val`` folder is a wrong path more
      often than a wish).

    Files are listed with ``os.scandir`` (no ``stat`` of each file, no image opened) and sorted
    by their path components inside each class folder; hidden files and folders are skipped.

    Args:
        path: the dataset folder.
        held_out_split: whether a folder without a test split gets a 20% one.

    Returns:
        The :class:`FolderListing`.

    Raises:
        DDJaxError: for a missing folder, no class folders, an empty class folder, a bad
            Tiny-ImageNet annotation line, or no test split when ``held_out_split`` is False.
    """
    root = Path(path).expanduser()
    check(root.is_dir(), f"folder:{path}: not a directory")
    train_root = root / "train" if (root / "train").is_dir() else root
    class_names = _class_folders(train_root)
    check(class_names, f"folder:{path}: no class sub-folders in {train_root}")
    train = _class_folder_files(root, train_root, class_names)
    test: FileList | None = None
    if train_root != root:
        for split in ("test", "val"):
            candidate = root / split
            annotations = candidate / "val_annotations.txt"
            if annotations.is_file():
                test = _tiny_imagenet_val(root, candidate, annotations, class_names)
                break
            folders = _class_folders(candidate) if candidate.is_dir() else []
            if folders and set(folders) <= set(class_names):
                test = _class_folder_files(root, candidate, class_names, folders)
                break
    if test is None:
        check(
            held_out_split,
            f"folder:{path}: no test split: expected {root / 'val'} (or {root / 'test'}) with "
            f"one sub-folder per train class, or Tiny-ImageNet's val/val_annotations.txt",
        )
        rng = np.random.default_rng(0)
        is_test = np.zeros(len(train), bool)
        for c in range(len(class_names)):
            members = rng.permutation(np.flatnonzero(train.labels == c))
            is_test[members[: int(len(members) * _FOLDER_TEST_FRACTION)]] = True
        test, train = train.subset(is_test), train.subset(~is_test)
    return FolderListing(root, tuple(class_names), train, test)


def _class_folders(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(entry.name for entry in entries if entry.is_dir() and entry.name[0] != ".")


def _image_names(directory: str, prefix: str = "") -> list[str]:
    """Image files below ``directory`` as relative paths, in sorted path-component order.

    A depth-first walk over entries sorted by name visits files in the order of their path
    components (a sub-folder's files at the sub-folder's place), as ``sorted(Path.rglob())``
    would, but without a ``stat`` per file: ``DirEntry.is_file`` uses the type ``scandir``
    already read.
    """
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    names = []
    for entry in entries:
        if entry.name[0] == ".":
            continue
        if entry.is_dir(follow_symlinks=False):
            names += _image_names(entry.path, f"{prefix}{entry.name}/")
        elif os.path.splitext(entry.name)[1].lower() in _IMAGE_SUFFIXES and entry.is_file():
            names.append(prefix + entry.name)
    return names


def _file_list(root: Path, files: list[tuple[str, str]], labels: list[int]) -> FileList:
    """A :class:`FileList` of ``(directory relative to root, file name)`` pairs."""
    directories = list(dict.fromkeys(directory for directory, _ in files))
    number = {directory: i for i, directory in enumerate(directories)}
    return FileList(
        root=root,
        directories=tuple(directories),
        directory_index=np.asarray([number[d] for d, _ in files], np.int32),
        names=np.asarray([os.fsencode(name) for _, name in files], dtype=bytes),
        labels=np.asarray(labels, np.int64),
    )


def _class_folder_files(
    root: Path, directory: Path, class_names: Sequence[str], folders: Sequence[str] | None = None
) -> FileList:
    files: list[tuple[str, str]] = []
    labels: list[int] = []
    for name in class_names if folders is None else folders:
        found = _image_names(str(directory / name))
        check(found, f"class folder {directory / name} holds no images ({sorted(_IMAGE_SUFFIXES)})")
        base = os.path.relpath(directory / name, root)
        for relative in found:
            sub, _, file_name = relative.rpartition("/")
            files.append((os.path.join(base, sub) if sub else base, file_name))
        labels += [class_names.index(name)] * len(found)
    return _file_list(root, files, labels)


def _tiny_imagenet_val(
    root: Path, directory: Path, annotations: Path, class_names: Sequence[str]
) -> FileList:
    index = {name: c for c, name in enumerate(class_names)}
    images = directory / "images"
    with os.scandir(images) if images.is_dir() else contextlib.nullcontext(()) as entries:
        present = {entry.name for entry in entries}
    base = os.path.relpath(images, root)
    files, labels = [], []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split("\t")
        if not line.strip():
            continue
        check(
            len(fields) >= 2 and fields[1] in index,
            f"{annotations} line {line_number}: expected '<file>\\t<class>' with a class among "
            f"the train folders, got {line!r}",
        )
        check(
            fields[0] in present,
            f"{annotations} line {line_number}: {images / fields[0]} does not exist",
        )
        files.append((base, fields[0]))
        labels.append(index[fields[1]])
    return _file_list(root, files, labels)


def _read_image_files(files: Sequence[Path], root: Path) -> np.ndarray:
    """Reads same-sized images to uint8 NHWC: 1 channel if all are grayscale, else 3."""
    images: np.ndarray | None = None
    any_colour = False
    for i, file in enumerate(files):
        try:
            with Image.open(file) as picture:
                if picture.mode in GRAYSCALE_MODES:
                    pixels = np.asarray(picture.convert("L"))[..., None]
                elif picture.mode in COLOUR_MODES:
                    pixels = np.asarray(picture.convert("RGB"))
                else:
                    raise DDJaxError(
                        f"folder {root}: image {file} has PIL mode {picture.mode!r}; "
                        "use 8-bit grayscale or RGB images"
                    )
        except OSError as error:
            raise DDJaxError(f"folder {root}: cannot read image {file}: {error}") from error
        if images is None:
            images = np.zeros((len(files), *pixels.shape[:2], 3), np.uint8)
        if pixels.shape[:2] != images.shape[1:3]:
            raise DDJaxError(
                f"folder {root}: image {file} is {pixels.shape[1]}x{pixels.shape[0]} pixels but "
                f"{files[0]} is {images.shape[2]}x{images.shape[1]}; all images must have one "
                "size (ddjax does not resize)"
            )
        images[i] = pixels  # grayscale broadcasts to three channels
        any_colour |= pixels.shape[-1] == 3
    assert images is not None  # every class folder holds at least one image
    return images if any_colour else images[..., :1]
