"""The MNIST family (``fashion_mnist``, ``mnist``): where their files are looked for, in order.

Promises: the first place that holds the data wins, in this order: IDX files in ``data_dir``,
``data_dir/<name>`` or ``data_dir/<name-with-dashes>``; TFDS's array_record copy in ``data_dir``;
the directory where Debian's ``dataset-fashion-mnist`` package installs them
(:data:`DEBIAN_DIRS`); TFDS's default data directory. A directory the user names always wins over
the system locations. When nothing is found the error names every place looked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ddjax.data.sources.base import Splits
from ddjax.data.sources.idx import read_idx_directory
from ddjax.data.sources.tfds import load_tfds
from ddjax.errors import DDJaxError

MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Where Debian's dataset packages install the IDX files.
DEBIAN_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}


def load(name: str, argument: str, data_dir: str | None) -> Splits:
    """Reads ``fashion_mnist`` or ``mnist`` (``name``) from the first place that has it.

    Args:
        name: ``'fashion_mnist'`` or ``'mnist'``.
        argument: unused (these sources answer only to their bare name).
        data_dir: the user's directory, looked in first; None for the system locations only.

    Returns:
        The splits, with the dataset's class names.

    Raises:
        DDJaxError: naming every place looked and how to install the data, when none has it.
    """
    del argument
    class_names = FASHION_MNIST_CLASS_NAMES if name == "fashion_mnist" else MNIST_CLASS_NAMES
    # A directory the user names wins over the system locations, in either format.
    places: list[tuple[str, Path | str | None]] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        places += [("idx", root), ("idx", root / name), ("idx", root / name.replace("_", "-"))]
        places.append(("tfds", data_dir))
    places.append(("idx", Path(DEBIAN_DIRS[name])))
    if data_dir is None:
        places.append(("tfds", None))
    looked, tfds_reasons = [], []
    for kind, place in places:
        if kind == "idx":
            looked.append(f"IDX files in {place}")
            splits = read_idx_directory(place, len(class_names)) if place.is_dir() else None
        else:
            looked.append(f"TFDS '{name}' in {place or 'the default TFDS data_dir'}")
            try:
                splits = load_tfds(name, place)
            except DDJaxError as error:  # not prepared there: reported below if nothing is found
                tfds_reasons.append(str(error))
                splits = None
        if splits is not None:
            return dataclasses.replace(splits, class_names=class_names)
    how = (
        "install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)"
        if name == "fashion_mnist"
        else "download the four MNIST IDX files (train-images-idx3-ubyte.gz, ...)"
    )
    raise DDJaxError(
        f"{name}: no data found. Looked for {'; '.join(looked)} (IDX files: "
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte, optionally .gz). To fix: {how}, or put the IDX files in a "
        "directory and pass it as data_dir (--config.data_dir=DIR). "
        f"TFDS said: {' | '.join(tfds_reasons)}"
    )
