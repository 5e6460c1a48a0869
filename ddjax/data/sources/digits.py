"""``digits``: scikit-learn's bundled 8x8 handwritten digits with ddjax's fixed split.

Promises: 1,797 images (no download) split deterministically into 1,352 train and 445 test
images, the same for every user and seed (see :func:`load`).
"""

from __future__ import annotations

import numpy as np

from ddjax.data.sources.base import Splits
from ddjax.data.sources.mnist import MNIST_CLASS_NAMES


def load(name: str, argument: str, data_dir: str | None) -> Splits:
    """scikit-learn's 8x8 digits with a fixed stratified split.

    Per class, in class order, one ``np.random.default_rng(0)`` draws a permutation of the
    class's indices; the first quarter (rounded down) is the test set. This gives 1,352 train and
    445 test images, independent of any seed the user sets, so results are comparable. The
    arguments are unused: the data ships with scikit-learn.
    """
    # Imported here, not at the top: importing sklearn.datasets takes about 4 s (it pulls in
    # SciPy), which every ddjax command that imports ddjax.data would otherwise pay.
    from sklearn.datasets import load_digits

    del name, argument, data_dir

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # values 0..16
    labels = digits.target
    rng = np.random.default_rng(0)
    test_parts = []
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_parts.append(members[: len(members) // 4])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test_parts)] = True
    return Splits(
        images[~is_test],
        labels[~is_test],
        images[is_test],
        labels[is_test],
        class_names=MNIST_CLASS_NAMES,
        source="sklearn.datasets.load_digits",
    )
