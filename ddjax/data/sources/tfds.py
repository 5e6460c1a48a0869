"""TensorFlow Datasets image-classification datasets, read without TensorFlow.

Promises: any TFDS dataset with ``image`` and ``label`` (ClassLabel) features that has been
prepared once as array_record (``tfds build NAME --file_format=array_record``) is read with
``tfds.data_source``; ddjax never downloads or prepares. TFDS is an optional dependency
(``pip install 'ddjax[tfds]'``): it is imported only when a TFDS dataset is read, and its absence
is a :class:`DDJaxError` that says how to install it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ddjax.data.sources.base import Splits
from ddjax.errors import DDJaxError, check

# TFDS names for ddjax's own dataset names, where they differ.
TFDS_NAMES = {"svhn": "svhn_cropped"}
# Records decoded per ``__getitems__`` call when reading a TFDS data source.
_TFDS_CHUNK = 1024


def _import_tfds():
    # Imported on first use: TFDS is an optional dependency (the 'tfds' extra), and importing it
    # is slow; sources other than TFDS must work without it.
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DDJaxError(
            "this dataset is read through TensorFlow Datasets, which is not installed: "
            "pip install 'ddjax[tfds]'"
        ) from error
    return tfds


def load_prefixed(name: str, argument: str, data_dir: str | None) -> Splits:
    """``tfds:NAME``: the TFDS dataset ``argument``, even where ddjax has its own reader."""
    del name
    check(argument, "tfds: needs a TFDS dataset name, e.g. tfds:cifar10")
    return load_tfds(argument, data_dir)


def load_tfds(name: str, data_dir: str | None) -> Splits:
    """Reads a prepared TFDS image-classification dataset through ``tfds.data_source``."""
    opened = open_tfds(name, data_dir)
    train = _read_tfds_source(opened.train, f"{opened.source} split 'train'")
    test = _read_tfds_source(opened.test, f"{opened.source} split '{opened.test_split}'")
    return Splits(*train, *test, class_names=opened.class_names, source=opened.source)


class OpenedTfds(NamedTuple):
    """A TFDS dataset's train and test random-access sources, opened but not read."""

    train: Any  # tfds data source: len(), [i] -> {'image': uint8 HWC, 'label': int}
    test: Any
    test_split: str
    class_names: tuple[str, ...]
    image_shape: tuple[int | None, ...]  # the 'image' feature's shape; None where it varies
    source: str  # names the dataset and the place, for error messages


def open_tfds(
    name: str, data_dir: str | None, test_splits: Sequence[str] = ("test", "validation")
) -> OpenedTfds:
    """Opens a prepared TFDS image-classification dataset without reading any record.

    Args:
        name: the TFDS name.
        data_dir: the TFDS data directory (``None``: TFDS's default).
        test_splits: the splits to evaluate on, in order of preference; the first the dataset
            has is used (datasets without a 'test' split, e.g. imagenette, evaluate on
            'validation'; ImageNet's 'test' split has no labels, so its streams prefer
            'validation'). Under ``tfds.testing.mock_data`` the split list is empty and the
            first is assumed.

    Raises:
        DDJaxError: for an unknown name, a dataset not prepared in ``data_dir``, one that is
            not image classification, or one without any of ``test_splits``.
    """
    tfds = _import_tfds()
    place = data_dir or "TFDS's default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"

    def open_split(split: str):
        try:
            # download=False: preparing needs TensorFlow; ddjax only reads prepared data.
            return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except tfds.core.registered.DatasetNotFoundError as error:
            raise DDJaxError(
                f"unknown dataset {name!r}: not a ddjax source (fashion_mnist, mnist, digits, "
                "cifar10, cifar100, svhn, folder:PATH, npz:PATH, synthetic) nor a TFDS name"
            ) from error
        except Exception as error:  # TFDS raises assorted types for "not prepared here"
            raise DDJaxError(
                f"TFDS dataset {name!r} split {split!r} cannot be read from {place} "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                f"Prepare it once where TensorFlow is installed: tfds build {name} "
                f"--file_format=array_record [--data_dir=DIR], then pass data_dir=DIR"
            ) from error

    train_source = open_split("train")
    info = train_source.dataset_info
    features = info.features
    check(
        "image" in features and "label" in features,
        f"TFDS dataset {name!r} is not an image-classification dataset: ddjax needs 'image' and "
        f"'label' features, it has {sorted(features.keys())}",
    )
    class_names = getattr(features["label"], "names", None)
    check(
        class_names is not None,
        f"TFDS dataset {name!r}: its 'label' feature is not a ClassLabel with class names",
    )
    available = set(info.splits.keys())
    test_split = next((s for s in test_splits if s in available), None)
    check(
        test_split is not None or not available,
        f"TFDS dataset {name!r} has no split among {list(test_splits)} to evaluate on "
        f"(it has {sorted(available)})",
    )
    test_split = test_split or test_splits[0]
    return OpenedTfds(
        train=train_source,
        test=open_split(test_split),
        test_split=test_split,
        class_names=tuple(class_names),
        image_shape=tuple(features["image"].shape),
        source=f"TFDS '{name}' in {place}",
    )


def _read_tfds_source(source, where: str) -> tuple[np.ndarray, np.ndarray]:
    count = len(source)
    check(count > 0, f"{where} is empty")
    images = None
    labels = np.empty(count, np.int64)
    batched = True
    for start in range(0, count, _TFDS_CHUNK):
        keys = list(range(start, min(count, start + _TFDS_CHUNK)))
        if batched:
            try:
                examples = source.__getitems__(keys)
            except TypeError:
                # The data source that tfds.testing.mock_data installs (TFDS 4.9) has a broken
                # __getitems__; one record at a time reads the same examples.
                batched = False
        if not batched:
            examples = [source[key] for key in keys]
        for key, example in zip(keys, examples, strict=True):
            image = np.asarray(example["image"])
            if image.ndim == 2:
                image = image[..., None]
            if images is None:
                images = np.empty((count, *image.shape), image.dtype)
            if image.shape != images.shape[1:]:
                raise DDJaxError(
                    f"{where}: example {key} is {image.shape}, example 0 is {images.shape[1:]}; "
                    "ddjax needs images of one size (prepare a resized config of the dataset)"
                )
            images[key] = image
            labels[key] = int(example["label"])
    return images, labels
