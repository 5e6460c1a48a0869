"""Streaming datasets by name: ``stream:folder:PATH``, ``stream:tfds:NAME``, ``stream:NAME``.

Promises: :func:`open_stream` lists a dataset without decoding any image (a folder is listed with
``os.scandir`` through :func:`ddjax.data.sources.folder.list_folder`; a TFDS dataset is opened with
``tfds.data_source``, which reads array_record files on demand), and returns a
:class:`StreamingDataset` whose train and test splits are random-access record sources
(``len``, ``[i] -> (value, label)``, the value being the file's encoded bytes or a TFDS record's
uint8 image). Everything it needs to know is decided here, once: the class names, the
normalisation constants (published ones; a stream cannot compute its own) and the shape of an
image after the transforms. Stages that need the whole dataset in memory refuse ``stream:``
names through :func:`require_in_memory`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ddjax.data.normalisation import NORMALISATION
from ddjax.data.sources import SOURCES, canonical_name, folder, tfds
from ddjax.errors import DDJaxError, check

STREAM_PREFIX = "stream:"
# torchvision's ImageNet evaluation resizes the shorter side to 256 before a 224 centre crop.
IMAGENET_EVAL_RESIZE = 256 / 224


def is_stream(name: str) -> bool:
    """Whether the dataset name asks for a stream (``stream:...``)."""
    return isinstance(name, str) and name.startswith(STREAM_PREFIX)


def require_in_memory(name: str, *, stage: str) -> None:
    """Refuses a streaming dataset name for a stage that needs the whole dataset in memory.

    Herding and k-center selection, trajectory matching and the other distillation methods
    index the whole train set; they call this on their config's dataset name before doing any
    work. :func:`ddjax.data.load_dataset` calls it too.

    Args:
        name: the dataset name from the config.
        stage: what is refusing, for the message (e.g. ``'select'``, ``'distill'``).

    Raises:
        DDJaxError: for a ``stream:`` name, saying which name to use instead.
    """
    if is_stream(name):
        raise DDJaxError(
            f"dataset {name!r}: {stage} needs the whole dataset in memory and cannot read a "
            f"stream; name it without 'stream:' ({name[len(STREAM_PREFIX) :]!r}) to load it "
            "whole (streams feed experts, squeeze, recover, relabel and evaluate)"
        )


class Records(Protocol):
    """A split of a streaming dataset: random access to raw records, nothing decoded.

    ``records[i]`` is ``(value, label)``: ``value`` the encoded image file (``bytes``) or a
    decoded ``uint8`` ``(H, W, C)`` array, ``label`` the class index. ``describe(i)`` names the
    record in error messages. Instances are pickled into data-loading worker processes.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[bytes | np.ndarray, int]: ...

    def describe(self, index: int) -> str: ...


@dataclasses.dataclass(frozen=True, eq=False)
class FolderRecords:
    """Image files of a folder split: ``[i] -> (file bytes, label)``."""

    files: folder.FileList

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        return self.files.path(index).read_bytes(), int(self.files.labels[index])

    def describe(self, index: int) -> str:
        return f"image {self.files.path(index)}"


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsRecords:
    """A TFDS data source split: ``[i] -> (uint8 image, label)`` (TFDS decodes the image)."""

    source: Any
    where: str

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        example = self.source[index]
        return np.asarray(example["image"]), int(example["label"])

    def describe(self, index: int) -> str:
        return f"{self.where} record {index}"


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingDataset:
    """A dataset read record by record: what :func:`open_stream` returns.

    Attributes:
        name: the name it was opened with (``'stream:...'``).
        class_names: one name per class.
        train: the train split's :class:`Records`.
        test: the test split's :class:`Records` (a folder's ``val``/``test``, TFDS
            ``validation`` or else ``test``).
        mean: per-channel mean subtracted from images in [0, 1].
        std: per-channel standard deviation divided by.
        image_size: the side of the square images the transforms produce, or ``None`` for every
            image's own size (then all images must have one size, :attr:`image_shape`).
        eval_resize: the evaluation transform resizes the shorter side to
            ``round(image_size * eval_resize)`` before the centre crop (ImageNet's 256/224);
            ``None``: no resize, only the centre crop.
        image_shape: ``(H, W, C)`` of one image after the transforms.
        workers: the grain worker processes a stage's pipelines use by default (the config's
            ``dataset.workers``; 0: decode in the reading process).
    """

    name: str
    class_names: tuple[str, ...]
    train: Records
    test: Records
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None
    eval_resize: float | None
    image_shape: tuple[int, int, int]
    workers: int = 0

    @property
    def zca(self) -> None:
        """Always ``None``: a stream is mean/std-normalised, never whitened (as a ``Dataset``
        without ZCA, for code that reads either)."""
        return None

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)


def open_stream(
    name: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = 224,
    normalisation: str | None = None,
    eval_resize: float | None = IMAGENET_EVAL_RESIZE,
) -> StreamingDataset:
    """Opens a dataset to be streamed (lists or opens it; decodes nothing).

    Args:
        name: ``stream:SOURCE`` (or ``SOURCE``): ``folder:PATH`` (ImageNet's
            ``train/<class>/*.JPEG`` + ``val/<class>/*.JPEG``, or Tiny-ImageNet's raw layout;
            see :func:`ddjax.data.sources.folder.list_folder`, a test split is required),
            ``tfds:NAME`` or a TFDS name such as ``imagenet2012`` (prepared once as
            array_record; read without TensorFlow).
        data_dir: the TFDS data directory.
        image_size: the side of the square crops the transforms produce (ImageNet: 224), or
            ``None`` to keep every image's own size (for datasets of one image size, e.g.
            Tiny-ImageNet at 64x64; the shape is then read from the first train image's header
            or the TFDS feature).
        normalisation: a key of :data:`ddjax.data.NORMALISATION`; by default the published
            constants of the dataset (ImageNet's for TFDS ImageNet datasets). Required for
            ``folder:PATH`` (e.g. ``'imagenet'``): a stream cannot compute its own.
        eval_resize: the evaluation resize ratio (shorter side ``round(image_size *
            eval_resize)`` before the centre crop), ``None`` for none; at least 1.

    Returns:
        The :class:`StreamingDataset`.

    Raises:
        DDJaxError: for a source that cannot stream (``digits``, ``npz:``, ``synthetic``), a
            missing folder, an empty class folder, no test split, an unknown or unprepared TFDS
            dataset, or missing normalisation constants.
    """
    check(isinstance(name, str) and name, f"dataset name must be a non-empty string, got {name!r}")
    check(
        image_size is None or (isinstance(image_size, int) and image_size >= 1),
        f"image_size must be a positive integer or None, got {image_size!r}",
    )
    check(
        eval_resize is None or (isinstance(eval_resize, int | float) and eval_resize >= 1),
        f"eval_resize must be a number >= 1 or None, got {eval_resize!r}",
    )
    full_name = name if is_stream(name) else STREAM_PREFIX + name
    source_name = full_name[len(STREAM_PREFIX) :]
    prefix, _, argument = source_name.partition(":")
    if prefix == "folder":
        listing = folder.list_folder(argument, held_out_split=False)
        class_names = listing.class_names
        train, test = FolderRecords(listing.train), FolderRecords(listing.test)
        stored_shape: tuple[int | None, ...] = (None, None, 3)
        key = None
    else:
        check(
            prefix not in SOURCES or prefix == "tfds",
            f"dataset {full_name!r}: '{prefix}' is read whole into memory and cannot stream; "
            "streams read folder:PATH, tfds:NAME or a TFDS name (e.g. stream:imagenet2012). "
            f"Use {source_name!r} without 'stream:'",
        )
        tfds_name = argument if prefix == "tfds" else tfds.TFDS_NAMES.get(source_name, source_name)
        check(tfds_name, "stream:tfds: needs a TFDS dataset name, e.g. stream:tfds:imagenet2012")
        opened = tfds.open_tfds(tfds_name, data_dir, test_splits=("validation", "test"))
        class_names = opened.class_names
        train = TfdsRecords(opened.train, f"{opened.source} split 'train'")
        test = TfdsRecords(opened.test, f"{opened.source} split '{opened.test_split}'")
        stored_shape = opened.image_shape
        key = canonical_name(tfds_name)
    mean, std = _normalisation(full_name, key, normalisation)
    channels = stored_shape[-1] or 3
    check(
        len(mean) == channels,
        f"dataset {full_name!r}: normalisation {normalisation or key!r} has {len(mean)} "
        f"channels, the images have {channels}",
    )
    if image_size is not None:
        image_shape = (image_size, image_size, channels)
    elif isinstance(train, FolderRecords):
        with Image.open(train.files.path(0)) as first:  # reads the header, not the pixels
            image_shape = (first.height, first.width, channels)
    else:
        check(
            None not in stored_shape,
            f"dataset {full_name!r}: its images vary in size {stored_shape}; pass image_size",
        )
        image_shape = tuple(stored_shape)
    return StreamingDataset(
        name=full_name,
        class_names=tuple(class_names),
        train=train,
        test=test,
        mean=mean,
        std=std,
        image_size=image_size,
        eval_resize=None if eval_resize is None else float(eval_resize),
        image_shape=image_shape,
    )


def _normalisation(
    name: str, key: str | None, normalisation: str | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a stream uses: the named constants, or the dataset's published ones."""
    valid = sorted(NORMALISATION)
    if normalisation is None:
        if key is not None and key.startswith("imagenet"):
            normalisation = "imagenet"
        elif key in NORMALISATION:
            normalisation = key
        else:
            raise DDJaxError(
                f"dataset {name!r} has no published normalisation constants and a stream cannot "
                f"compute its own; pass normalisation= one of {valid} (e.g. 'imagenet')"
            )
    check(
        normalisation in NORMALISATION,
        f"normalisation={normalisation!r} is unknown for a stream; use one of {valid}",
    )
    return NORMALISATION[normalisation]
