"""``folder:PATH``: images in one sub-folder per class, including Tiny-ImageNet's raw layout.

Promises: the sorted class-folder names are the class names; the train/test split follows
:func:`load`'s rules (``train``/``test``, ``train``/``val``, Tiny-ImageNet's annotated ``val``,
or a deterministic 20% per class); images are read as uint8 with one channel when all are
grayscale, else three; images of different sizes are refused (no resizing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ddjax.data.sources.base import Splits
from ddjax.errors import DDJaxError, check

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
_FOLDER_TEST_FRACTION = 0.2


def load(name: str, path: str, data_dir: str | None) -> Splits:
    """Reads images from one sub-folder per class (sorted folder names are the class names).

    Splits, in order of preference:

    * ``PATH/train/<class>/`` for training, and for testing the first of ``PATH/test``,
      ``PATH/val`` whose sub-folders are all train classes. Tiny-ImageNet's raw layout works as
      is: images may sit deeper inside a class folder (``train/<wnid>/images/*.JPEG``), its
      unlabelled ``test/images`` is skipped, and ``val/images`` is labelled from
      ``val/val_annotations.txt``.
    * Otherwise (only ``PATH/train``, or class folders directly in ``PATH``): a deterministic 20%
      of each class (rounded down; a permutation from ``np.random.default_rng(0)``, drawn class by
      class) is the test set.

    All images must have the same size (no resizing is done); grayscale images are repeated to
    three channels when the folder also holds colour images. ``name`` and ``data_dir`` are
    unused.
    """
    del name, data_dir
    root = Path(path).expanduser()
    check(root.is_dir(), f"folder:{path}: not a directory")
    train_root = root / "train" if (root / "train").is_dir() else root
    class_names = _class_folders(train_root)
    check(class_names, f"folder:{path}: no class sub-folders in {train_root}")
    train_files, train_labels = _class_folder_files(train_root, class_names)
    test_files: list[Path] | None = None
    if train_root != root:
        for split in ("test", "val"):
            candidate = root / split
            annotations = candidate / "val_annotations.txt"
            if annotations.is_file():
                test_files, test_labels = _tiny_imagenet_val(candidate, annotations, class_names)
                break
            folders = _class_folders(candidate) if candidate.is_dir() else []
            if folders and set(folders) <= set(class_names):
                test_files, test_labels = _class_folder_files(candidate, class_names, folders)
                break
    if test_files is None:
        rng = np.random.default_rng(0)
        is_test = np.zeros(len(train_files), bool)
        for c in range(len(class_names)):
            members = rng.permutation(np.flatnonzero(train_labels == c))
            is_test[members[: int(len(members) * _FOLDER_TEST_FRACTION)]] = True
        test_files = [file for file, test in zip(train_files, is_test, strict=True) if test]
        test_labels = train_labels[is_test]
        train_files = [file for file, test in zip(train_files, is_test, strict=True) if not test]
        train_labels = train_labels[~is_test]
    images = _read_image_files(train_files + test_files, root)
    train_images, test_images = images[: len(train_files)], images[len(train_files) :]
    arrays = (train_images, train_labels, test_images, test_labels)
    return Splits(*arrays, class_names=tuple(class_names), source=f"folder {root}")


def _class_folders(directory: Path) -> list[str]:
    return sorted(
        entry.name for entry in directory.iterdir() if entry.is_dir() and entry.name[0] != "."
    )


def _image_files(directory: Path) -> list[Path]:
    return sorted(
        file
        for file in directory.rglob("*")
        if file.suffix.lower() in _IMAGE_SUFFIXES and file.is_file() and file.name[0] != "."
    )


def _class_folder_files(
    directory: Path, class_names: Sequence[str], folders: Sequence[str] | None = None
) -> tuple[list[Path], np.ndarray]:
    files: list[Path] = []
    labels: list[int] = []
    for name in class_names if folders is None else folders:
        found = _image_files(directory / name)
        check(found, f"class folder {directory / name} holds no images ({sorted(_IMAGE_SUFFIXES)})")
        files += found
        labels += [class_names.index(name)] * len(found)
    return files, np.asarray(labels, np.int64)


def _tiny_imagenet_val(
    directory: Path, annotations: Path, class_names: Sequence[str]
) -> tuple[list[Path], np.ndarray]:
    index = {name: c for c, name in enumerate(class_names)}
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
        file = directory / "images" / fields[0]
        check(file.is_file(), f"{annotations} line {line_number}: {file} does not exist")
        files.append(file)
        labels.append(index[fields[1]])
    return files, np.asarray(labels, np.int64)


def _read_image_files(files: Sequence[Path], root: Path) -> np.ndarray:
    """Reads same-sized images to uint8 NHWC: 1 channel if all are grayscale, else 3."""
    images: np.ndarray | None = None
    any_colour = False
    for i, file in enumerate(files):
        try:
            with Image.open(file) as picture:
                if picture.mode in ("1", "L", "LA"):
                    pixels = np.asarray(picture.convert("L"))[..., None]
                elif picture.mode in ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr"):
                    pixels = np.asarray(picture.convert("RGB"))
                else:  # 16-bit and float modes would need a scale ddjax cannot guess
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
