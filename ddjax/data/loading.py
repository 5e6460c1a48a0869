"""Loading a dataset: a source's raw splits become a validated, normalised :class:`Dataset`.

Promises: :func:`load_dataset` treats every source alike: labels are checked against the class
list, ``train_limit``/``test_limit`` keep a class-balanced subset in file order, images are scaled
to [0, 1] and then normalised with the published constants (or the train split's own, after the
limit), or ZCA-whitened as MTT does. Nothing is downloaded; errors are :class:`DDJaxError`
naming the file or place and the problem.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ddjax.data.dataset import Dataset
from ddjax.data.normalisation import NORMALISATION, channel_statistics, to_unit_interval
from ddjax.data.sources import Splits, canonical_name, load_splits
from ddjax.data.streaming.records import (
    StreamingDataset,
    is_stream,
    open_stream,
    require_in_memory,
)
from ddjax.data.zca import fit_zca
from ddjax.errors import DDJaxError, check


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    zca: bool = False,
    zca_eps: float = 0.1,
    train_limit: int | None = None,
    test_limit: int | None = None,
    normalisation: str | None = None,
) -> Dataset:
    """Loads a dataset into memory, normalised (or ZCA-whitened) and validated.

    Args:
        name: a source name (see :mod:`ddjax.data.sources`): ``fashion_mnist``, ``mnist``,
            ``digits``, ``cifar10``, ``cifar100``, ``svhn``, another TFDS name or
            ``tfds:NAME``, ``folder:PATH``, ``npz:PATH``, ``synthetic[:key=value,...]``.
        data_dir: where to look first: a directory with IDX files for the MNIST family, and the
            TFDS data directory for TFDS datasets.
        zca: as MTT's ``--zca``: scale images to [0, 1] only, then whiten train and test with a
            :class:`ZCA` fitted on the (possibly limited) train set.
        zca_eps: the ZCA regulariser (MTT: 0.1).
        train_limit: keep at most this many train images, chosen class by class in round-robin
            (the first image of every class, then the second, ...) in file order, so that small
            limits stay balanced. For quick runs and tests.
        test_limit: the same for the test set.
        normalisation: override the normalisation constants: a key of :data:`NORMALISATION`
            (e.g. ``'tiny_imagenet'`` for ``folder:`` Tiny-ImageNet) or ``'computed'`` to use the
            train split's own statistics. Ignored with ``zca=True``.

    Returns:
        The :class:`Dataset`.

    Raises:
        DDJaxError: for an unknown name, data that cannot be found (naming where it looked), bad
            data (naming the file and the problem), or a ``stream:`` name (use
            :func:`ddjax.data.open_stream`).
    """
    check(isinstance(name, str) and name, f"dataset name must be a non-empty string, got {name!r}")
    require_in_memory(name, stage="load_dataset")
    splits = load_splits(name, data_dir)
    if normalisation is None:
        key = canonical_name(name)
        normalisation = key if key in NORMALISATION else "computed"
    check(
        normalisation == "computed" or normalisation in NORMALISATION,
        f"normalisation={normalisation!r} is unknown; use 'computed' or one of "
        f"{sorted(NORMALISATION)}",
    )
    return _finish(name, splits, zca, zca_eps, train_limit, test_limit, normalisation)


def _finish(
    name: str,
    splits: Splits,
    zca: bool,
    zca_eps: float,
    train_limit: int | None,
    test_limit: int | None,
    normalisation: str,
) -> Dataset:
    """Validates raw splits, applies limits, scales, normalises or whitens."""
    where = splits.source
    num_classes = len(splits.class_names)
    check(num_classes >= 1, f"{where}: no classes")
    prepared = {}
    for split, limit in (("train", train_limit), ("test", test_limit)):
        images = getattr(splits, f"{split}_images")
        labels = np.asarray(getattr(splits, f"{split}_labels"))
        check(
            np.issubdtype(labels.dtype, np.integer),
            f"{where}: y_{split} must hold integer labels, got {labels.dtype}",
        )
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            raise DDJaxError(
                f"{where}: y_{split}[{bad[0]}] = {labels[bad[0]]} is out of range "
                f"0..{num_classes - 1} ({num_classes} classes)"
            )
        if limit is not None:
            check(
                isinstance(limit, int | np.integer) and limit >= 1,
                f"{split}_limit must be a positive integer, got {limit!r}",
            )
            keep = _balanced_subset(labels, int(limit))
            images, labels = images[keep], labels[keep]
        prepared[split] = (to_unit_interval(images, f"{where}: x_{split}"), labels)

    train_images, train_labels = prepared["train"]
    test_images, test_labels = prepared["test"]
    counts = np.bincount(train_labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        limit_note = f" after train_limit={train_limit}" if train_limit is not None else ""
        raise DDJaxError(
            f"{where}: class {empty[0]} '{splits.class_names[empty[0]]}' has no train "
            f"images{limit_note}"
        )
    channels = train_images.shape[-1]
    check(
        test_images.shape[1:] == train_images.shape[1:],
        f"{where}: test images are {test_images.shape[1:]}, train images are "
        f"{train_images.shape[1:]}",
    )

    zca_transform = None
    if zca:
        zca_transform = fit_zca(train_images, zca_eps)
        train_images = zca_transform.apply(train_images)
        test_images = zca_transform.apply(test_images)
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        if normalisation == "computed":
            mean, std = channel_statistics(train_images)
        else:
            mean, std = NORMALISATION[normalisation]
            check(
                len(mean) == channels,
                f"{where}: normalisation {normalisation!r} has {len(mean)} channels, the images "
                f"have {channels}",
            )
        for images in (train_images, test_images):
            images -= np.asarray(mean, np.float32)
            images /= np.asarray(std, np.float32)
    return Dataset(
        name=name,
        x_train=train_images,
        y_train=train_labels.astype(np.int32),
        x_test=test_images,
        y_test=test_labels.astype(np.int32),
        class_names=tuple(splits.class_names),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        zca=zca_transform,
    )


def _balanced_subset(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the first ``limit`` examples in class round-robin order, in file order."""
    if limit >= len(labels):
        return np.arange(len(labels))
    # Rank of each example within its class (0 for the first of its class, ...).
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - starts
    chosen = np.lexsort((np.arange(len(labels)), rank))[:limit]
    return np.sort(chosen)


def load_from_config(section, *, stage: str = "load_dataset") -> Dataset:
    """The dataset a config's ``dataset`` section names (:func:`ddjax.config.dataset_section`):
    ``name``, ``data_dir``, ``zca`` and the optional ``normalisation`` and ``train_limit``.
    ``stage`` names the stage in the refusal of a stream (:func:`require_in_memory`)."""
    require_in_memory(section.name, stage=stage)
    for field, unset in (("image_size", None), ("workers", 0)):
        check(
            section.get(field, unset) == unset,
            f"config.dataset.{field} applies to streams (stream:NAME) only; {section.name!r} "
            f"is loaded whole at its own size: unset it",
        )
    return load_dataset(
        section.name,
        data_dir=section.data_dir or None,
        zca=section.zca,
        normalisation=section.get("normalisation") or None,
        train_limit=section.get("train_limit"),
    )


def open_from_config(section, *, stage: str) -> Dataset | StreamingDataset:
    """The dataset of a config's ``dataset`` section for a stage that can stream.

    A ``stream:`` name opens a :class:`StreamingDataset` (``image_size``, ``normalisation``,
    ``data_dir``; ZCA and ``train_limit`` are refused, being whole-dataset operations); any
    other name is loaded into memory by :func:`load_from_config`.

    Args:
        section: ``config.dataset``.
        stage: the stage asking, for error messages.
    """
    if not is_stream(section.name):
        return load_from_config(section)
    check(
        not section.zca,
        f"config.dataset.zca: {stage} cannot whiten a stream (ZCA is fitted on the whole train "
        "set); set --config.dataset.zca=false",
    )
    check(
        section.get("train_limit") is None,
        f"config.dataset.train_limit: {stage} reads a stream whole; unset it (or use the "
        "name without 'stream:' to load a limited subset into memory)",
    )
    workers = section.get("workers", 0)
    check(
        isinstance(workers, int) and workers >= 0,
        f"config.dataset.workers={workers!r} must be an integer >= 0",
    )
    image_size = section.get("image_size")
    stream = open_stream(
        section.name,
        data_dir=section.data_dir or None,
        image_size=224 if image_size is None else image_size,
        normalisation=section.get("normalisation") or None,
    )
    return dataclasses.replace(stream, workers=workers)
