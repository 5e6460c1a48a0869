"""``npz:PATH``: a dataset saved as one NumPy ``.npz`` archive.

Promises: reads arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (images uint8 in 0..255
or floats in [0, 1], NHW or NHWC; integer labels) and optionally ``class_names``; without class
names the classes are named ``'0'``, ``'1'``, ... up to the largest label. Never unpickles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddjax.data.sources.base import Splits
from ddjax.errors import DDJaxError, check


def load(name: str, path: str, data_dir: str | None) -> Splits:
    """Reads the archive at ``path`` (``name`` and ``data_dir`` are unused)."""
    del name, data_dir
    file = Path(path).expanduser()
    check(file.is_file(), f"npz:{path}: file not found")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise DDJaxError(f"npz:{path}: cannot read ({error})") from error
    missing = [key for key in ("x_train", "y_train", "x_test", "y_test") if key not in arrays]
    check(not missing, f"{file}: missing arrays {missing} (has {sorted(arrays)})")
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        check(
            images.ndim in (3, 4),
            f"{file}: x_{split} must be NHW or NHWC, got shape {images.shape}",
        )
        if images.ndim == 3:
            arrays[f"x_{split}"] = images[..., None]
        check(
            labels.ndim == 1 and len(labels) == len(images),
            f"{file}: y_{split} must have shape ({len(images)},) to match x_{split}, "
            f"got {labels.shape}",
        )
        check(
            np.issubdtype(labels.dtype, np.integer),
            f"{file}: y_{split} must hold integer labels, got dtype {labels.dtype}",
        )
    labels_max = max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0))
    if "class_names" in arrays:
        class_names = tuple(str(name) for name in arrays["class_names"].reshape(-1))
    else:
        class_names = tuple(str(c) for c in range(int(labels_max) + 1))
    return Splits(
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        class_names=class_names,
        source=str(file),
    )
