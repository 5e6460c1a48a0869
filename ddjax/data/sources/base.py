"""What a source hands to :func:`ddjax.data.load_dataset`: raw splits, and the source's signature.

Promises: a source returns one :class:`Splits` with raw images (uint8 in 0..255 or floats in
[0, 1], NHWC) and integer labels, unnormalised and unlimited; :mod:`ddjax.data.loading` does all
validation of ranges, limits, normalisation and ZCA, so that every source gets them the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """Raw images (uint8 0..255 or float in [0, 1], NHWC) and labels, before normalisation."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str  # names the file or place, for error messages


@dataclasses.dataclass(frozen=True)
class Source:
    """One family of datasets, as registered in :data:`ddjax.data.sources.SOURCES`.

    Attributes:
        load: ``load(argument, data_dir) -> Splits``. ``argument`` is what follows ``NAME:`` in
            the dataset name (empty when there is none); ``data_dir`` is ``load_dataset``'s.
        takes_argument: True for a source addressed as ``NAME:ARGUMENT`` (``folder:PATH``); it
            also answers to its bare ``NAME`` with an empty argument. False for a source that
            answers only to its exact name (``digits``); ``digits:x`` then goes to TFDS.
    """

    load: Callable[[str, str | None], Splits]
    takes_argument: bool = False
